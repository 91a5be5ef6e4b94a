//! `ascend-quant auto`: accuracy-based automatic quantization.

use super::Failure;
use super::calibrate::{CalibrateArgs, RunInputs, gather, output_paths, write_outputs};
use super::exit::{ExitCode, usage};
use crate::auto::{
    Evaluator, ExternalEvaluator, InternalEvaluator, Metric, layer_sensitivities, search,
};
use crate::data::{Dataset, read_npy};
use crate::quant::calibrate::{RunSettings, observe_layers};
use crate::quant::emit::{LayerFactors, deploy_model, fake_quant_model, simulation_model};
use crate::quant::record::write_record;
use crate::sim::{RtenExecutor, feedable_input_names};
use crate::tensor::Tensor;
use anyhow::Context;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The metric choices of `--metric`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricName {
    /// Top-1 accuracy against --labels.
    Top1,
    /// Agreement of the top-1 class with the float model.
    Top1Agreement,
    /// Mean cosine similarity of the outputs with the float model's (x100).
    Cosine,
    /// Mean squared error relative to the float outputs' power (x100, negated).
    Mse,
}

/// Arguments of `auto`.
#[derive(Debug, clap::Args)]
pub struct AutoArgs {
    /// Calibration options, as for `calibrate`.
    #[command(flatten)]
    pub calib: CalibrateArgs,
    /// Evaluation data (same forms as --data); repeatable.
    #[arg(long = "eval-data")]
    pub eval_data: Vec<String>,
    /// Labels (.npy of integers, one per evaluation sample) for the top1 metric.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// The metric to hold (default: top1 with --labels, else top1-agreement).
    #[arg(long, value_enum)]
    pub metric: Option<MetricName>,
    /// Allowed drop of the metric, in points.
    #[arg(long, default_value_t = 0.5)]
    pub max_drop: f64,
    /// External evaluator command; `{model}` becomes the model path; its last output line is the metric.
    #[arg(long)]
    pub evaluator: Option<String>,
    /// Seconds one evaluator run may take.
    #[arg(long, default_value_t = 600)]
    pub evaluator_timeout: u64,
    /// Calibration samples used to rank layer sensitivity.
    #[arg(long, default_value_t = 16)]
    pub sensitivity_samples: usize,
}

fn labels(path: &Path) -> Result<Vec<i64>, Failure> {
    Ok(match read_npy(path)? {
        Tensor::I64(a) => a.iter().copied().collect(),
        Tensor::I32(a) => a.iter().map(|&v| i64::from(v)).collect(),
        Tensor::U8(a) => a.iter().map(|&v| i64::from(v)).collect(),
        other => {
            return Err(usage(format!(
                "{}: labels must be integers, got {}",
                path.display(),
                other.dtype()
            )));
        }
    })
}

fn subset(factors: &[LayerFactors], rolled_back: &[String]) -> Vec<LayerFactors> {
    factors
        .iter()
        .filter(|f| !rolled_back.contains(&f.layer.name))
        .cloned()
        .collect()
}

/// Runs `auto`.
pub fn execute(args: &AutoArgs) -> Result<(), Failure> {
    let started = Instant::now();
    let RunInputs {
        model,
        mut config,
        data,
        batch_size,
        declared,
    } = gather(&args.calib)?;
    let quiet = args.calib.quiet;
    let dynamic_batch = declared.is_some_and(|d| d != batch_size);
    let metric = match (args.metric, &args.labels) {
        (Some(MetricName::Top1) | None, Some(l)) => Metric::Top1(labels(l)?),
        (Some(MetricName::Top1), None) => return Err(usage("--metric top1 needs --labels".into())),
        (Some(MetricName::Cosine), _) => Metric::Cosine,
        (Some(MetricName::Mse), _) => Metric::Mse,
        (Some(MetricName::Top1Agreement) | None, _) => Metric::Top1Agreement,
    };
    let eval = if args.eval_data.is_empty() {
        if args.evaluator.is_none() {
            return Err(usage("give --eval-data (or --evaluator)".into()));
        }
        None
    } else {
        Some(Dataset::from_specs(
            &args.eval_data,
            &feedable_input_names(&model),
        )?)
    };
    let run = RunSettings {
        batch_size,
        dynamic_batch,
        progress: &|_, _| {},
        similarity_samples: 0,
    };
    let (executor, _) = super::calibrate::select_backend(
        args.calib.backend,
        args.calib.acl_lib.as_deref(),
        &args.calib.output,
    )?;
    let calibrated = observe_layers(&model, &config, &data, executor.as_ref(), &run)?;
    let scratch = args
        .calib
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut evaluator: Box<dyn Evaluator> = match (&args.evaluator, &eval) {
        (Some(cmd), _) => Box::new(ExternalEvaluator::new(
            cmd.clone(),
            Duration::from_secs(args.evaluator_timeout),
            scratch,
        )),
        (None, Some(e)) => Box::new(InternalEvaluator::new(
            &RtenExecutor,
            e,
            batch_size,
            dynamic_batch,
            metric.clone(),
        )),
        (None, None) => unreachable!("checked above"),
    };
    let float_score = evaluator.float_score(&calibrated.prepared)?;
    let target = float_score - args.max_drop;
    let ranking = layer_sensitivities(
        &RtenExecutor,
        &calibrated.prepared,
        &calibrated.factors,
        &data,
        batch_size,
        dynamic_batch,
        args.sensitivity_samples,
    )?;
    let ranked: Vec<String> = ranking.iter().map(|r| r.name.clone()).collect();
    if !quiet {
        eprintln!(
            "float {} = {float_score:.3}; target >= {target:.3}; {} layers ranked",
            metric.name(),
            ranked.len()
        );
    }
    let prepared = &calibrated.prepared;
    let outcome = search(&ranked, target, |rolled_back| -> Result<f64, Failure> {
        let chosen = subset(&calibrated.factors, rolled_back);
        // Build only the model the evaluator runs.
        let candidate = if evaluator.wants_fake_quant() {
            fake_quant_model(prepared, &chosen)?
        } else {
            simulation_model(prepared, &chosen)?
        };
        let score = evaluator.evaluate(&candidate)?;
        if !quiet {
            eprintln!(
                "  {} in float: {} = {score:.3}",
                rolled_back.len(),
                metric.name()
            );
        }
        Ok(score)
    })?;
    let chosen = subset(&calibrated.factors, &outcome.rolled_back);
    for (name, layer) in &mut config.layers {
        if outcome.rolled_back.contains(name) {
            layer.quant_enable = false;
        }
    }
    config.batch_num = calibrated.batches_used;
    let prefix = args.calib.output.display().to_string();
    let [deploy, fake, record, report_path] = output_paths(&args.calib.output);
    let config_path = PathBuf::from(format!("{prefix}_auto_config.json"));
    let ranking_path = PathBuf::from(format!("{prefix}_auto_ranking.json"));
    let history_path = PathBuf::from(format!("{prefix}_auto_history.json"));
    let report = json!({
        "model": args.calib.model.display().to_string(),
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
        "reproduce": format!("ascend-quant calibrate --model {} --config {} --batch-size {batch_size} ...", args.calib.model.display(), config_path.display()),
    });
    let text = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("plain JSON");
    let deploy_model = deploy_model(prepared, &chosen)?;
    let fake_model = fake_quant_model(prepared, &chosen)?;
    let texts: Vec<(PathBuf, Vec<u8>)> = vec![
        (record, write_record(&chosen).into_bytes()),
        (report_path.clone(), text(&report).into_bytes()),
        (config_path, text(&config.to_json()).into_bytes()),
        (
            ranking_path,
            text(&serde_json::to_value(&ranking).context("ranking")?).into_bytes(),
        ),
        (
            history_path,
            text(&serde_json::to_value(&outcome.history).context("history")?).into_bytes(),
        ),
    ];
    let text_refs: Vec<(&Path, &[u8])> = texts
        .iter()
        .map(|(p, b)| (p.as_path(), b.as_slice()))
        .collect();
    write_outputs(
        &[(&deploy, &deploy_model), (&fake, &fake_model)],
        &text_refs,
        &args.calib.output,
    )?;
    let written: Vec<&Path> = [deploy.as_path(), fake.as_path()]
        .into_iter()
        .chain(texts.iter().map(|(p, _)| p.as_path()))
        .collect();
    if args.calib.json {
        println!("{}", text(&report));
    }
    if !quiet {
        eprintln!(
            "{}: {} = {:.3} (float {float_score:.3}, target {target:.3}) with {} of {} layers in float after {} configurations, {:.1} s",
            if outcome.passed {
                "target met"
            } else {
                "target NOT met"
            },
            metric.name(),
            outcome.metric,
            outcome.rolled_back.len(),
            ranked.len(),
            outcome.history.len(),
            started.elapsed().as_secs_f64()
        );
        for p in &written {
            eprintln!("wrote {}", p.display());
        }
    }
    if !outcome.passed {
        return Err(Failure {
            code: ExitCode::Accuracy,
            error: anyhow::anyhow!(
                "no configuration reached {} >= {target:.3} (best {:.3} with {} layers in float); the best one was written anyway",
                metric.name(),
                outcome.metric,
                outcome.rolled_back.len()
            ),
        });
    }
    Ok(())
}
