//! One `calibrate` job: options in, deploy model, fake-quant model, record
//! and report out.

use super::Progress;
use super::backend::select_backend;
use super::error::PipelineError;
use super::inputs::{CalibrateOptions, RunInputs, gather, layer_names};
use super::outputs::{OutputFiles, write_outputs};
use crate::onnx::load_model;
use crate::quant::calibrate::{RunSettings, calibrate as run_calibration};
use crate::quant::config::QuantConfig;
use crate::quant::retrain_config::RetrainConfig;
use crate::report::{LayerReport, QuantReport};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a calibration produced.
pub struct CalibrateResult {
    /// The report (also written as `PREFIX_quant_report.json`).
    pub report: QuantReport,
    /// The report as written.
    pub report_json: String,
    /// The files written.
    pub written: Vec<PathBuf>,
}

/// Runs post-training quantization as `opts` say and writes its four files
/// (all or none).
pub fn calibrate(
    opts: &CalibrateOptions,
    progress: Progress<'_>,
) -> Result<CalibrateResult, PipelineError> {
    let started = Instant::now();
    let inputs = gather(opts)?;
    let dynamic_batch = inputs.dynamic_batch();
    let RunInputs {
        model,
        config,
        data,
        batch_size,
        ..
    } = inputs;
    let (executor, backend_line) =
        select_backend(opts.backend, opts.acl_lib.as_deref(), &opts.output)?;
    (progress.message)(&format!("backend: {backend_line}"));
    let run = RunSettings {
        batch_size,
        dynamic_batch,
        progress: progress.batches,
        similarity_samples: opts.similarity_samples,
    };
    let outcome = run_calibration(&model, &config, &data, executor.as_ref(), &run)?;
    let files = OutputFiles::new(&opts.output);
    let record_text = crate::quant::record::write_record(&outcome.factors);
    let layers = outcome
        .factors
        .iter()
        .map(|f| {
            let lc = config.layer(&f.layer.name).ok_or_else(|| {
                PipelineError::Usage(format!("layer '{}' has no configuration", f.layer.name))
            })?;
            Ok(LayerReport {
                name: f.layer.name.clone(),
                op_type: f.layer.op_type.clone(),
                act_algo: lc.act_algo.name().into(),
                asymmetric: config.asymmetric(lc),
                scale_d: f.act.scale,
                offset_d: f.act.offset,
                scale_w: f.scale_w.clone(),
                cosine: outcome
                    .cosine
                    .get(&f.layer.name)
                    .copied()
                    .unwrap_or(f64::NAN),
            })
        })
        .collect::<Result<Vec<_>, PipelineError>>()?;
    let report = QuantReport {
        model: opts.model.display().to_string(),
        outputs: [
            &files.deploy,
            &files.fake_quant,
            &files.record,
            &files.report,
        ]
        .iter()
        .map(|p| p.display().to_string())
        .collect(),
        batches: outcome.batches_used,
        batch_size,
        backend: backend_line,
        similarity_samples: opts.similarity_samples.min(data.samples()),
        fused_batch_norms: outcome.preparation.fused.clone(),
        layers,
        skipped: outcome
            .candidates
            .iter()
            .filter(|c| !c.quantizable)
            .cloned()
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
        phase_seconds: outcome.timings,
    };
    let report_json = serde_json::to_string_pretty(&report)
        .map_err(|e| PipelineError::Usage(format!("serializing the report: {e}")))?;
    let written = write_outputs(
        &[
            (&files.deploy, &outcome.deploy),
            (&files.fake_quant, &outcome.fake_quant),
        ],
        &[
            (&files.record, record_text.as_bytes()),
            (&files.report, report_json.as_bytes()),
        ],
        &opts.output,
    )?;
    Ok(CalibrateResult {
        report,
        report_json,
        written,
    })
}

/// Writes the default per-layer configuration of `model` to `output`: AMCT's
/// quantization JSON, or its retrain (QAT) JSON when `retrain`; returns the
/// number of layers.
pub fn default_config(model: &Path, output: &Path, retrain: bool) -> Result<usize, PipelineError> {
    let model = load_model(model)?;
    let names = layer_names(&model)?;
    let json = if retrain {
        RetrainConfig::default_for(&names).to_json()
    } else {
        QuantConfig::default_for(&names).to_json()
    };
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| PipelineError::Usage(format!("serializing the config: {e}")))?;
    crate::fsutil::write_atomic(output, text.as_bytes())
        .map_err(|e| PipelineError::Usage(format!("cannot write {}: {e}", output.display())))?;
    Ok(names.len())
}
