//! `ascend-quant compare`: how each layer's output moves between a float
//! model and its quantized version, as a table, JSON or an HTML page.

use super::Failure;
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
    #[arg(long = "data", required = true)]
    pub data: Vec<String>,
    /// Samples per batch (default: the model's batch size, else 1).
    #[arg(long)]
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
}

/// Runs `compare`.
pub fn execute(args: &CompareArgs) -> Result<(), Failure> {
    let c = compare_models(&CompareOptions {
        float: args.float.clone(),
        quant: args.quant.clone(),
        data: args.data.clone(),
        batch_size: args.batch_size,
        layer: args.layer.clone(),
        html: args.html.clone(),
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&c).context("serializing the comparison")?
        );
    } else {
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
        if let Some(p) = &args.html {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}
