//! The one place a job's result becomes files. `calibrate`, `auto`, `qat`
//! and `convert-qat` all end the same way: the deploy model, the fake-quant
//! model and AMCT's record are built from the prepared model and its
//! factors, and written together with the job's report (and any other text
//! files it keeps) all or none.

use super::error::PipelineError;
use super::outputs::{OutputFiles, write_outputs};
use crate::onnx::ModelProto;
use crate::quant::calibrate::Outcome;
use crate::quant::emit::{LayerFactors, deploy_and_fake_quant};
use crate::quant::record::write_record_with_tensors;
use crate::quant::tensor_quant::TensorFactors;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a job quantized: the prepared float model and the factors that
/// apply to it.
#[derive(Clone, Copy)]
pub struct Quantized<'a> {
    /// The float model after preparation.
    pub prepared: &'a ModelProto,
    /// The quantized layers.
    pub factors: &'a [LayerFactors],
    /// The quantized tensors (inputs of MaxPool / Add).
    pub tensors: &'a [TensorFactors],
    /// Emit the models with FORCE_FP16_QUANT.
    pub fp16_quant: bool,
}

impl<'a> Quantized<'a> {
    /// Every quantized layer and tensor of a calibration run.
    pub fn of(outcome: &'a Outcome) -> Quantized<'a> {
        Quantized {
            prepared: &outcome.prepared,
            factors: &outcome.factors,
            tensors: &outcome.tensors,
            fp16_quant: outcome.fp16_quant,
        }
    }
}

/// A job's own text files: each path with its bytes (its report first).
pub type JobTexts = Vec<(PathBuf, Vec<u8>)>;

/// Builds the deploy model, the fake-quant model and the record of `q`,
/// then asks `texts` for the job's own files (given the seconds building
/// took, for its report) and writes everything under `prefix`, all or
/// none. Returns the paths written: the two models, the record, then the
/// job's files in order.
pub fn write_artifacts(
    prefix: &Path,
    q: Quantized<'_>,
    texts: impl FnOnce(f64) -> Result<JobTexts, PipelineError>,
) -> Result<Vec<PathBuf>, PipelineError> {
    let started = Instant::now();
    let (deploy, fake_quant) =
        deploy_and_fake_quant(q.prepared, q.factors, q.tensors, q.fp16_quant)?;
    let record = write_record_with_tensors(q.factors, q.tensors);
    let texts = texts(started.elapsed().as_secs_f64())?;
    let files = OutputFiles::new(prefix);
    let mut text_refs: Vec<(&Path, &[u8])> = vec![(&files.record, record.as_bytes())];
    text_refs.extend(texts.iter().map(|(p, b)| (p.as_path(), b.as_slice())));
    write_outputs(
        &[(&files.deploy, &deploy), (&files.fake_quant, &fake_quant)],
        &text_refs,
        prefix,
    )
}
