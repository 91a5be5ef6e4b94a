//! One `compare` job: a float model and its quantized version, layer by
//! layer, optionally as a self-contained HTML page.

use super::error::PipelineError;
use super::outputs::declared_batch;
use crate::data::Dataset;
use crate::onnx::load_model;
use crate::report::compare::{Comparison, compare};
use crate::report::html::render;
use crate::sim::{RtenExecutor, feedable_input_names};
use std::path::PathBuf;

/// What `compare` takes.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// The float model.
    pub float: PathBuf,
    /// The quantized model (fake-quant or deploy).
    pub quant: PathBuf,
    /// Data files (same forms as calibration data).
    pub data: Vec<String>,
    /// Samples per batch (default: the model's batch size, else 1).
    pub batch_size: Option<usize>,
    /// Layer whose input histogram the page shows (default: the worst quantized one).
    pub layer: Option<String>,
    /// Where to write the HTML page, if wanted.
    pub html: Option<PathBuf>,
}

/// Compares the two models on the data; writes the HTML page when asked.
pub fn compare_models(opts: &CompareOptions) -> Result<Comparison, PipelineError> {
    let float = load_model(&opts.float)?;
    let quant = load_model(&opts.quant)?;
    let data = Dataset::from_specs(&opts.data, &feedable_input_names(&float))?;
    let declared = declared_batch(&float);
    let batch_size = opts.batch_size.unwrap_or(declared.unwrap_or(1)).max(1);
    let dynamic = declared.is_some_and(|d| d != batch_size);
    let c = compare(
        &RtenExecutor,
        &float,
        &quant,
        &data,
        batch_size,
        dynamic,
        opts.layer.as_deref(),
    )?;
    if let Some(path) = &opts.html {
        let page = render(
            &c,
            &opts.float.display().to_string(),
            &opts.quant.display().to_string(),
        );
        crate::fsutil::write_atomic(path, page.as_bytes())
            .map_err(|e| PipelineError::Usage(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(c)
}
