//! One `calibrate` job: options in, deploy model, fake-quant model, record
//! and report out.

use super::Progress;
use super::artifacts::{Quantized, write_artifacts};
use super::backend::select_backend;
use super::error::PipelineError;
use super::inputs::{CalibrateOptions, DataSource, RunInputs, gather, layer_names, read_config};
use super::outputs::{OutputFiles, check_writable, declared_batch, output_folder, with_suffix};
use crate::onnx::load_model;
use crate::quant::calibrate::{
    Outcome, RunSettings, calibrate as run_calibration, finish as finish_models,
};
use crate::quant::config::QuantConfig;
use crate::quant::from_record::calibrated_from_record;
use crate::quant::record::read_record;
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
    if let Some(record) = &opts.record {
        return calibrate_from_record(opts, record, progress, started);
    }
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
    let outcome = run_calibration(model, &config, &data, executor.as_ref(), &run)?;
    let samples = opts.similarity_samples.min(data.samples());
    let histograms = match &opts.html {
        Some(_) => Some(crate::report::calibration_page::input_histograms(
            executor.as_ref(),
            &outcome.prepared,
            &outcome.factors,
            &data,
            (batch_size, dynamic_batch),
            PAGE_SAMPLES,
        )?),
        None => None,
    };
    finish(
        opts,
        &config,
        outcome,
        (batch_size, samples),
        backend_line,
        histograms,
        started,
    )
}

/// Calibration samples the `--html` page's histograms are drawn from.
const PAGE_SAMPLES: usize = 16;

/// `calibrate --record`: the factors come from the user's record; data, when
/// given, only serves the per-layer similarity.
fn calibrate_from_record(
    opts: &CalibrateOptions,
    record_path: &Path,
    progress: Progress<'_>,
    started: Instant,
) -> Result<CalibrateResult, PipelineError> {
    check_writable(&opts.output)?;
    if let Some(page) = &opts.html {
        check_writable(page)?;
    }
    let model = load_model(&opts.model)?;
    let config = read_config(opts, &model)?;
    let file = record_path.display().to_string();
    let text = std::fs::read_to_string(record_path)
        .map_err(|e| PipelineError::Usage(format!("{file}: cannot read the record: {e}")))?;
    let record = read_record(&text)
        .map_err(|e| PipelineError::Usage(format!("{file}: not a valid record file: {e}")))?;
    let data = match &opts.data {
        DataSource::Files(f) if f.is_empty() => None,
        source => Some(source.open(&model)?),
    };
    let declared = declared_batch(&model);
    let batch_size = super::inputs::batch_size(opts, &config, declared)?;
    let calibrated = calibrated_from_record(model, &config, &record, &file)?;
    (progress.message)(&format!(
        "{} layer(s) from {file}",
        calibrated.factors.len()
    ));
    let run = RunSettings {
        batch_size,
        dynamic_batch: declared.is_some_and(|d| d != batch_size),
        progress: progress.batches,
        similarity_samples: opts.similarity_samples,
    };
    let samples = data
        .as_ref()
        .map_or(0, |d| opts.similarity_samples.min(d.samples()));
    let outcome = finish_models(calibrated, data.as_ref(), &run)?;
    let histograms = match (&opts.html, &data) {
        (Some(_), Some(data)) => Some(crate::report::calibration_page::input_histograms(
            &crate::sim::CpuExecutor,
            &outcome.prepared,
            &outcome.factors,
            data,
            (batch_size, run.dynamic_batch),
            PAGE_SAMPLES,
        )?),
        _ => None,
    };
    finish(
        opts,
        &config,
        outcome,
        (batch_size, samples),
        format!("none (factors from {file})"),
        histograms,
        started,
    )
}

/// Writes the files of a finished run and reports them.
fn finish(
    opts: &CalibrateOptions,
    config: &QuantConfig,
    outcome: Outcome,
    (batch_size, similarity_samples): (usize, usize),
    backend_line: String,
    histograms: Option<Vec<crate::report::compare::ActivationHistogram>>,
    started: Instant,
) -> Result<CalibrateResult, PipelineError> {
    let from_record = opts.record.is_some();
    let files = OutputFiles::new(&opts.output);
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
                act_algo: if from_record {
                    "record".into()
                } else {
                    lc.act_algo.name().into()
                },
                asymmetric: if from_record {
                    f.act.offset != 0
                } else {
                    config.asymmetric(lc)
                },
                scale_d: f.act.scale,
                offset_d: f.act.offset,
                scale_w: f.scale_w.clone(),
                cosine: outcome
                    .cosine
                    .get(&f.layer.name)
                    .copied()
                    .unwrap_or(f64::NAN),
                nuq: f.nuq.clone(),
            })
        })
        .collect::<Result<Vec<_>, PipelineError>>()?;
    // ATC's --compress_weight_conf list: the layers whose weights NUQ reduced.
    let nuq_layers: Vec<&str> = outcome
        .factors
        .iter()
        .filter(|f| f.nuq.as_ref().is_some_and(|n| n.note.is_none()))
        .map(|f| f.layer.name.as_str())
        .collect();
    let nuq_list = (!nuq_layers.is_empty()).then(|| {
        (
            with_suffix(&opts.output, "_nuq_layer_record.txt"),
            format!("{}\n", nuq_layers.join(";")),
        )
    });
    let mut outputs = vec![
        files.deploy.clone(),
        files.fake_quant.clone(),
        files.record.clone(),
        files.report.clone(),
    ];
    if let Some((path, _)) = &nuq_list {
        outputs.push(path.clone());
    }
    let tensor_quantize = outcome
        .tensors
        .iter()
        .map(|t| {
            let tc = config.tensor_quantize.iter().find(|c| c.key() == t.key);
            LayerReport {
                name: t.key.clone(),
                op_type: t.op_type.clone(),
                act_algo: tc.map_or("record".into(), |c| c.act_algo.name().into()),
                asymmetric: t.act.offset != 0
                    || tc.is_some_and(|c| c.asymmetric.unwrap_or(config.activation_offset)),
                scale_d: t.act.scale,
                offset_d: t.act.offset,
                scale_w: Vec::new(),
                cosine: f64::NAN,
                nuq: None,
            }
        })
        .collect();
    let report_path = files.report.clone();
    let html = opts.html.clone();
    let mut built = None;
    let mut written = write_artifacts(&opts.output, Quantized::of(&outcome), |building| {
        let report = QuantReport {
            model: opts.model.display().to_string(),
            outputs: outputs.iter().map(|p| p.display().to_string()).collect(),
            batches: outcome.batches_used,
            batch_size,
            backend: backend_line,
            similarity_samples,
            fused_batch_norms: outcome.preparation.fused.clone(),
            layers,
            tensor_quantize,
            bias_correction: outcome.bias_correction.clone(),
            adaround: outcome.adaround.clone(),
            skipped: outcome
                .candidates
                .iter()
                .filter(|c| !c.quantizable)
                .cloned()
                .collect(),
            seconds: started.elapsed().as_secs_f64(),
            phase_seconds: [outcome.timings[0], building, outcome.timings[1]],
        };
        let report_json = serde_json::to_string_pretty(&report)
            .map_err(|e| PipelineError::Usage(format!("serializing the report: {e}")))?;
        let mut texts = vec![(report_path, report_json.clone().into_bytes())];
        if let Some((path, text)) = nuq_list {
            texts.push((path, text.into_bytes()));
        }
        // The page goes with the other files when it sits beside them (all
        // or none), else it is written on its own once they are in place.
        let page = html.map(|path| {
            let text = crate::report::calibration_page::render(
                &report,
                histograms.as_deref().unwrap_or(&[]),
            );
            (path, text)
        });
        let mut apart = None;
        if let Some((path, text)) = page {
            if output_folder(&path) == output_folder(&opts.output) {
                texts.push((path, text.into_bytes()));
            } else {
                apart = Some((path, text));
            }
        }
        built = Some((report, report_json, apart));
        Ok(texts)
    })?;
    let (report, report_json, apart) = built.expect("the texts were built before writing");
    if let Some((path, text)) = apart {
        crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|e| {
            PipelineError::Usage(format!(
                "{}: writing the page failed: {e} (the models and record were written)",
                path.display()
            ))
        })?;
        written.push(path);
    }
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
