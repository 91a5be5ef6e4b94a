//! One `auto` job: calibrate once, rank the layers, search the smallest set
//! to keep in float that holds the metric, and write the models, record,
//! report, reproducible config, ranking and history (all or none).

use super::artifacts::{Quantized, write_artifacts};
use super::outputs::{OutputFiles, output_folder, with_suffix};
use super::{CalibrateOptions, PipelineError, Progress, RunInputs, gather, select_backend};
use crate::auto::{
    Evaluator, ExternalEvaluator, InternalEvaluator, Metric, layer_sensitivities, search,
};
use crate::data::read_labels;
use crate::quant::bias_correction::correct_biases;
use crate::quant::calibrate::{RunSettings, observe_layers};
use crate::quant::emit::{
    LayerFactors, ModelKind, add_tensor_quantization, fake_quant_model, simulation_model,
};
use crate::report::metric::MetricName;
use crate::sim::CpuExecutor;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What `auto` takes: the calibration options plus the accuracy target.
#[derive(Clone, Debug)]
pub struct AutoOptions {
    /// Calibration options, as for `calibrate`.
    pub calib: CalibrateOptions,
    /// Evaluation data (same forms as calibration data).
    pub eval_data: Vec<String>,
    /// Evaluation images, instead of `eval_data`.
    pub eval_images: Option<crate::data::ImageSource>,
    /// Evaluation sentences, tokenized as the calibration's (`--eval-texts`).
    pub eval_texts: Option<crate::data::TextSource>,
    /// Labels (.npy of integers, one per evaluation sample) for the top1 metric.
    pub labels: Option<PathBuf>,
    /// The metric to hold (default: top1 with labels, else top1-agreement).
    pub metric: Option<MetricName>,
    /// The output the metric scores (default: the first float32 output).
    pub metric_output: Option<String>,
    /// Allowed drop of the metric, in points.
    pub max_drop: f64,
    /// External evaluator command (`{model}` is the model path); its last output line is the metric.
    pub evaluator: Option<String>,
    /// How long one evaluator run may take.
    pub evaluator_timeout: Duration,
    /// Calibration samples used to rank layer sensitivity.
    pub sensitivity_samples: usize,
}

/// What an `auto` run found.
pub struct AutoResult {
    /// The metric's name.
    pub metric: &'static str,
    /// The float model's score.
    pub float_score: f64,
    /// The score to reach.
    pub target: f64,
    /// The best score reached.
    pub score: f64,
    /// Whether it reached the target (else the best configuration was still written).
    pub passed: bool,
    /// Layers kept in float.
    pub rolled_back: Vec<String>,
    /// Layers ranked.
    pub ranked: usize,
    /// Configurations evaluated.
    pub configurations: usize,
    /// The report as written.
    pub report_json: String,
    /// The files written.
    pub written: Vec<PathBuf>,
}

fn subset(factors: &[LayerFactors], rolled_back: &[String]) -> Vec<LayerFactors> {
    factors
        .iter()
        .filter(|f| !rolled_back.contains(&f.layer.name))
        .cloned()
        .collect()
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// Runs accuracy-based automatic quantization as `opts` say.
pub fn run(opts: &AutoOptions, progress: Progress<'_>) -> Result<AutoResult, PipelineError> {
    let started = Instant::now();
    let inputs = gather(&opts.calib)?;
    let dynamic_batch = inputs.dynamic_batch();
    let RunInputs {
        model,
        mut config,
        data,
        batch_size,
        ..
    } = inputs;
    let metric = match (opts.metric, &opts.labels) {
        (Some(MetricName::Top1) | None, Some(l)) => Metric::Top1(read_labels(l)?),
        (Some(MetricName::Top1), None) => {
            return Err(PipelineError::Usage("--metric top1 needs --labels".into()));
        }
        (Some(MetricName::Cosine), _) => Metric::Cosine,
        (Some(MetricName::Mse), _) => Metric::Mse,
        (Some(MetricName::NnAgreement), _) => Metric::NnAgreement,
        (Some(MetricName::Top1Agreement) | None, _) => Metric::Top1Agreement,
    };
    let eval = super::inputs::open_eval(
        &opts.eval_data,
        opts.eval_images.as_ref(),
        opts.eval_texts.as_ref(),
        &model,
    )?;
    if eval.is_none() && opts.evaluator.is_none() {
        return Err(PipelineError::Usage(
            "give --eval-data or --eval-images (or --evaluator)".into(),
        ));
    }
    let run = RunSettings {
        batch_size,
        dynamic_batch,
        progress: progress.batches,
        similarity_samples: 0,
    };
    let (executor, _) = select_backend(
        opts.calib.backend,
        opts.calib.acl_lib.as_deref(),
        &opts.calib.output,
    )?;
    let mut calibrated = observe_layers(model, &config, &data, executor.as_ref(), &run)?;
    // Bias correction: the search evaluates candidates corrected with every
    // layer quantized; the chosen subset is corrected again below, from the
    // uncorrected biases, exactly as `calibrate --config` would.
    let uncorrected = calibrated.factors.clone();
    if config.bias_correction {
        (progress.message)("correcting biases");
        correct_biases(
            &CpuExecutor,
            &calibrated.prepared,
            &mut calibrated.factors,
            &data,
            &run,
            calibrated.batches_used,
        )?;
    }
    let mut evaluator: Box<dyn Evaluator> = match (&opts.evaluator, &eval) {
        (Some(cmd), _) => Box::new(ExternalEvaluator::new(
            cmd.clone(),
            opts.evaluator_timeout,
            output_folder(&opts.calib.output),
        )),
        (None, Some(e)) => Box::new(
            InternalEvaluator::new(&CpuExecutor, e, batch_size, dynamic_batch, metric.clone())
                .scoring(opts.metric_output.clone()),
        ),
        (None, None) => {
            return Err(PipelineError::Usage(
                "give --eval-data (or --evaluator)".into(),
            ));
        }
    };
    let float_score = evaluator.float_score(&calibrated.prepared)?;
    let target = float_score - opts.max_drop;
    let ranking = layer_sensitivities(
        &CpuExecutor,
        &calibrated.prepared,
        &calibrated.factors,
        &data,
        batch_size,
        dynamic_batch,
        opts.sensitivity_samples,
    )?;
    let ranked: Vec<String> = ranking.iter().map(|r| r.name.clone()).collect();
    (progress.message)(&format!(
        "float {} = {float_score:.3}; target >= {target:.3}; {} layers ranked",
        metric.name(),
        ranked.len()
    ));
    let prepared = &calibrated.prepared;
    let outcome = search(
        &ranked,
        target,
        |rolled_back| -> Result<f64, PipelineError> {
            let chosen = subset(&calibrated.factors, rolled_back);
            // Build only the model the evaluator runs.
            // Tensor quantizations are kept in every candidate: the search is over layers.
            let candidate = if evaluator.wants_fake_quant() {
                let mut m = fake_quant_model(prepared, &chosen)?;
                add_tensor_quantization(&mut m, &calibrated.tensors, ModelKind::FakeQuant)?;
                if calibrated.fp16_quant {
                    crate::quant::fp16_quant::apply_to_fake_quant(&mut m);
                }
                m
            } else {
                let mut m = simulation_model(prepared, &chosen)?;
                if calibrated.fp16_quant {
                    crate::quant::fp16_quant::apply_to_simulation(&mut m);
                }
                add_tensor_quantization(&mut m, &calibrated.tensors, ModelKind::Simulation)?;
                m
            };
            // A candidate that cannot reach the target is stopped early;
            // its score is then the best it could still have had.
            let score = evaluator.evaluate_against(&candidate, target)?;
            (progress.message)(&format!(
                "  {} in float: {} = {score:.3}",
                rolled_back.len(),
                metric.name()
            ));
            Ok(score)
        },
    )?;
    drop(evaluator);
    let mut chosen = subset(&calibrated.factors, &outcome.rolled_back);
    if config.bias_correction {
        chosen = subset(&uncorrected, &outcome.rolled_back);
        correct_biases(
            &CpuExecutor,
            &calibrated.prepared,
            &mut chosen,
            &data,
            &run,
            calibrated.batches_used,
        )?;
    }
    for (name, layer) in &mut config.layers {
        if outcome.rolled_back.contains(name) {
            layer.quant_enable = false;
        }
    }
    config.batch_num = Some(calibrated.batches_used);
    let prefix = &opts.calib.output;
    let files = OutputFiles::new(prefix);
    let config_path = with_suffix(prefix, "_auto_config.json");
    let ranking_path = with_suffix(prefix, "_auto_ranking.json");
    let history_path = with_suffix(prefix, "_auto_history.json");
    let report = json!({
        "model": opts.calib.model.display().to_string(),
        "metric": metric.name(),
        "float_metric": float_score,
        "target": target,
        "final_metric": outcome.metric,
        "target_met": outcome.passed,
        "rolled_back": outcome.rolled_back,
        "quantized_layers": chosen.len(),
        "configurations_evaluated": outcome.history.len(),
        "calibration_seconds": calibrated.seconds,
        "seconds": started.elapsed().as_secs_f64(),
        "reproduce": format!(
            "ascend-quant calibrate --model {} --config {} ...",
            opts.calib.model.display(),
            config_path.display()
        ),
    });
    let report_json = pretty(&report);
    let ranking_json = serde_json::to_value(&ranking)
        .map_err(|e| PipelineError::Usage(format!("serializing the ranking: {e}")))?;
    let history_json = serde_json::to_value(&outcome.history)
        .map_err(|e| PipelineError::Usage(format!("serializing the history: {e}")))?;
    let texts = vec![
        (files.report.clone(), report_json.clone().into_bytes()),
        (config_path, pretty(&config.to_json()).into_bytes()),
        (ranking_path, pretty(&ranking_json).into_bytes()),
        (history_path, pretty(&history_json).into_bytes()),
    ];
    let quantized = Quantized {
        prepared,
        factors: &chosen,
        tensors: &calibrated.tensors,
        fp16_quant: calibrated.fp16_quant,
    };
    let written = write_artifacts(prefix, quantized, |_| Ok(texts))?;
    Ok(AutoResult {
        metric: metric.name(),
        float_score,
        target,
        score: outcome.metric,
        passed: outcome.passed,
        rolled_back: outcome.rolled_back,
        ranked: ranked.len(),
        configurations: outcome.history.len(),
        report_json,
        written,
    })
}
