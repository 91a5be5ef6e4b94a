//! `ascend-quant compare`: how each layer's output moves between a float
//! model and its quantized version, as a table, JSON or an HTML page.

use super::Failure;
use super::calibrate::with_progress;
use super::exit::usage;
use crate::pipeline::compare::sibling_record;
use crate::pipeline::{CompareOptions, compare_models};
use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `compare`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// The float model.
    #[arg(long)]
    pub float: PathBuf,
    /// The quantized model (fake-quant or deploy).
    #[arg(long)]
    pub quant: PathBuf,
    /// Data to run (FILE.npy, NAME=FILE.npy or FILE.npz); repeatable.
    #[arg(long = "data", required_unless_present_any = ["images", "texts"])]
    pub data: Vec<String>,
    /// Image folders and their preprocessing.
    #[command(flatten)]
    pub images: super::images::ImageArgs,
    /// Sentences and their tokenizer.
    #[command(flatten)]
    pub texts: super::texts::TextArgs,
    /// Samples per batch (default: the model's batch size, else 1).
    #[arg(long, value_parser = super::at_least_one())]
    pub batch_size: Option<usize>,
    /// Layer whose input activations the HTML histogram shows (default: the worst quantized one).
    #[arg(long)]
    pub layer: Option<String>,
    /// Write a self-contained HTML report here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also find where the error comes from: each layer quantized alone,
    /// its activation and its weight apart, scored on the model's outputs.
    #[arg(long)]
    pub analyze: bool,
    /// The record with the quantized model's factors (default: PREFIX_record.txt
    /// beside PREFIX_fake_quant_model.onnx / PREFIX_deploy_model.onnx).
    #[arg(long, requires = "analyze")]
    pub record: Option<PathBuf>,
    /// Samples the analysis runs on.
    #[arg(long, default_value_t = 64, requires = "analyze", value_parser = super::at_least_one())]
    pub analyze_samples: usize,
}

/// Runs `compare`.
pub fn execute(args: &CompareArgs) -> Result<(), Failure> {
    args.texts.check_used(None)?;
    let record = match (&args.record, args.analyze) {
        (Some(r), _) => Some(r.clone()),
        (None, true) => Some(sibling_record(&args.quant).ok_or_else(|| {
            usage(format!(
                "--analyze needs the quantized model's record: give --record FILE ({} is not named PREFIX_fake_quant_model.onnx or PREFIX_deploy_model.onnx)",
                args.quant.display()
            ))
        })?),
        (None, false) => None,
    };
    let opts = CompareOptions {
        float: args.float.clone(),
        quant: args.quant.clone(),
        data: super::calibrate::data_source(&args.data, None, "", None, &args.images, &args.texts)?,
        batch_size: args.batch_size,
        layer: args.layer.clone(),
        html: args.html.clone(),
        analyze: record,
        analyze_samples: args.analyze_samples,
    };
    let quiet = args.json;
    let c = with_progress(quiet, "analysing", |p| compare_models(&opts, p.batches))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&c).context("serializing the comparison")?
        );
    } else {
        if !c.outputs.is_empty() {
            println!(
                "{:<44} {:>12} {:>12} {:>14}",
                "output", "cosine mean", "cosine min", "NN agreement"
            );
            for o in &c.outputs {
                let nn = o
                    .nn_agreement
                    .map_or("-".to_string(), |v| format!("{v:.4}"));
                println!(
                    "{:<44} {:>12.6} {:>12.6} {:>14}",
                    o.name, o.cosine_mean, o.cosine_min, nn
                );
            }
            println!();
        }
        println!(
            "{:<44} {:<14} {:>5} {:>10} {:>12} {:>12}",
            "layer", "op", "quant", "cosine", "rel. L2", "max abs"
        );
        for l in &c.layers {
            println!(
                "{:<44} {:<14} {:>5} {:>10.6} {:>12.4e} {:>12.4e}",
                l.name,
                l.op_type,
                if l.quantized { "yes" } else { "no" },
                l.cosine,
                l.relative_l2,
                l.max_abs
            );
        }
        if let Some(a) = &c.analysis {
            println!(
                "\nerror in the outputs with one layer quantized ({} samples; all layers: cosine {:.6}, MSE {:.4e}), worst first:",
                a.samples, a.all_layers.cosine, a.all_layers.mse
            );
            println!(
                "{:<44} {:<14} {:>12} {:>12} {:>12} {:>12} {:>8}  inputs",
                "layer", "op", "act cosine", "act MSE", "wts cosine", "wts MSE", "clipped"
            );
            for l in &a.layers {
                let clipped = a
                    .histograms
                    .iter()
                    .find(|h| h.layer == l.name)
                    .map_or(0.0, |h| h.clipped);
                let (wc, wm) = l.weight.map_or(("-".to_string(), "-".to_string()), |w| {
                    (format!("{:.6}", w.cosine), format!("{:.4e}", w.mse))
                });
                println!(
                    "{:<44} {:<14} {:>12.6} {:>12.4e} {:>12} {:>12} {:>7.3}%  {}",
                    l.name,
                    l.op_type,
                    l.activation.cosine,
                    l.activation.mse,
                    wc,
                    wm,
                    100.0 * clipped,
                    l.inputs.join(", ")
                );
            }
        }
        if let Some(p) = &args.html {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}
