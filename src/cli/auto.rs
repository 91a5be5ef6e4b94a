//! `ascend-quant auto`: accuracy-based automatic quantization. Parses the
//! arguments, calls [`crate::pipeline::auto::run`] and prints the outcome.

use super::Failure;
use super::calibrate::{CalibrateArgs, with_progress};
use super::exit::ExitCode;
use crate::auto::MetricName;
use crate::pipeline::auto::{AutoOptions, run};
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `auto`.
#[derive(Debug, clap::Args)]
pub struct AutoArgs {
    /// Calibration options, as for `calibrate`.
    #[command(flatten)]
    pub calib: CalibrateArgs,
    /// Evaluation data (same forms as --data); repeatable.
    #[arg(long = "eval-data")]
    pub eval_data: Vec<String>,
    /// Evaluation sentences, one per line (tokenized as --texts), instead of --eval-data.
    #[arg(long, value_name = "FILE")]
    pub eval_texts: Option<PathBuf>,
    /// A folder of evaluation images (preprocessed as --images), instead of --eval-data.
    #[arg(long, value_name = "DIR")]
    pub eval_images: Option<PathBuf>,
    /// Labels (.npy of integers, one per evaluation sample) for the top1 metric.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// The metric to hold (default: top1 with --labels, else top1-agreement).
    #[arg(long, value_enum)]
    pub metric: Option<MetricName>,
    /// The output the metric scores (default: the first float32 output),
    /// e.g. a sentence encoder's pooled embedding.
    #[arg(long, value_name = "NAME")]
    pub metric_output: Option<String>,
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
    #[arg(long, default_value_t = 16, value_parser = super::at_least_one())]
    pub sensitivity_samples: usize,
}

/// Runs `auto`.
pub fn execute(args: &AutoArgs) -> Result<(), Failure> {
    args.calib.texts.check_used(args.eval_texts.as_ref())?;
    if args.calib.html.is_some() {
        return Err(super::exit::usage(
            "--html is a page about one calibration: run calibrate --html on auto's chosen configuration".into(),
        ));
    }
    let opts = AutoOptions {
        calib: args.calib.to_options()?,
        eval_data: args.eval_data.clone(),
        eval_images: args
            .eval_images
            .as_deref()
            .map(|d| args.calib.images.source(d))
            .transpose()?,
        eval_texts: args
            .eval_texts
            .as_deref()
            .map(|f| args.calib.texts.source(f))
            .transpose()?,
        labels: args.labels.clone(),
        metric: args.metric,
        metric_output: args.metric_output.clone(),
        max_drop: args.max_drop,
        evaluator: args.evaluator.clone(),
        evaluator_timeout: Duration::from_secs(args.evaluator_timeout),
        sensitivity_samples: args.sensitivity_samples,
    };
    let quiet = args.calib.quiet;
    let r = with_progress(quiet, "calibrating", |p| run(&opts, p))?;
    if args.calib.json {
        println!("{}", r.report_json);
    }
    if !quiet {
        eprintln!(
            "{}: {} = {:.3} (float {:.3}, target {:.3}) with {} of {} layers in float after {} configurations",
            if r.passed {
                "target met"
            } else {
                "target NOT met"
            },
            r.metric,
            r.score,
            r.float_score,
            r.target,
            r.rolled_back.len(),
            r.ranked,
            r.configurations,
        );
        for p in &r.written {
            eprintln!("wrote {}", p.display());
        }
    }
    if !r.passed {
        return Err(Failure {
            code: ExitCode::Accuracy,
            error: anyhow::anyhow!(
                "no configuration reached {} >= {:.3} (best {:.3} with {} layers in float); the best one was written anyway",
                r.metric,
                r.target,
                r.score,
                r.rolled_back.len()
            ),
        });
    }
    Ok(())
}
