//! One `compare` job: a float model and its quantized version, layer by
//! layer, optionally as a self-contained HTML page.

use super::error::PipelineError;
use super::inputs::layer_names;
use super::outputs::declared_batch;
use crate::onnx::load_model;
use crate::quant::calibrate::RunSettings;
use crate::quant::config::QuantConfig;
use crate::quant::from_record::calibrated_from_record;
use crate::quant::record::read_record;
use crate::report::analyze::analyze;
use crate::report::compare::{Comparison, compare};
use crate::report::html::render;
use crate::sim::CpuExecutor;
use std::path::PathBuf;

/// What `compare` takes.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// The float model.
    pub float: PathBuf,
    /// The quantized model (fake-quant or deploy).
    pub quant: PathBuf,
    /// The data (same forms as calibration data).
    pub data: super::inputs::DataSource,
    /// Samples per batch (default: the model's batch size, else 1).
    pub batch_size: Option<usize>,
    /// Layer whose input histogram the page shows (default: the worst quantized one).
    pub layer: Option<String>,
    /// Where to write the HTML page, if wanted.
    pub html: Option<PathBuf>,
    /// Also analyse where the error comes from, with the factors of this
    /// record (each layer quantized alone, activation and weight apart).
    pub analyze: Option<PathBuf>,
    /// Samples the analysis runs on.
    pub analyze_samples: usize,
}

/// The record next to a quantized model written by ascend-quant
/// (`PREFIX_fake_quant_model.onnx` or `PREFIX_deploy_model.onnx` →
/// `PREFIX_record.txt`), if the name has that form.
pub fn sibling_record(quant: &std::path::Path) -> Option<PathBuf> {
    let name = quant.file_name()?.to_str()?;
    let prefix = name
        .strip_suffix("_fake_quant_model.onnx")
        .or_else(|| name.strip_suffix("_deploy_model.onnx"))?;
    Some(quant.with_file_name(format!("{prefix}_record.txt")))
}

/// Compares the two models on the data; writes the HTML page when asked.
pub fn compare_models(
    opts: &CompareOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Comparison, PipelineError> {
    let float = load_model(&opts.float)?;
    let quant = load_model(&opts.quant)?;
    let data = opts.data.open(&float)?;
    let declared = declared_batch(&float);
    let batch_size = opts.batch_size.unwrap_or(declared.unwrap_or(1)).max(1);
    let dynamic = declared.is_some_and(|d| d != batch_size);
    let mut c = compare(
        &CpuExecutor,
        &float,
        &quant,
        &data,
        batch_size,
        dynamic,
        opts.layer.as_deref(),
    )?;
    if let Some(record_path) = &opts.analyze {
        let file = record_path.display().to_string();
        let text = std::fs::read_to_string(record_path).map_err(|e| {
            PipelineError::Usage(format!(
                "{file}: cannot read the record the analysis needs: {e} (give it with --record)"
            ))
        })?;
        let record = read_record(&text)
            .map_err(|e| PipelineError::Usage(format!("{file}: not a valid record file: {e}")))?;
        let names = layer_names(&float)?;
        let calibrated =
            calibrated_from_record(float, &QuantConfig::default_for(&names), &record, &file)?;
        let run = RunSettings {
            batch_size,
            dynamic_batch: dynamic,
            progress,
            similarity_samples: opts.analyze_samples,
        };
        c.analysis = Some(analyze(
            &CpuExecutor,
            &calibrated.prepared,
            &calibrated.factors,
            &data,
            &run,
        )?);
    }
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
