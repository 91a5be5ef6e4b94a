//! `ascend-quant run`: runs a model on the CPU simulator and saves its outputs.

use super::Failure;
use crate::onnx::load_model;
use crate::tensor::format_shape;
use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The ONNX model to run.
    pub model: PathBuf,
    /// An input as NAME=FILE.npy (or just FILE.npy for a single-input model), or
    /// FILE.npz holding every input by name; repeatable.
    #[arg(long = "input", short = 'i', required = true)]
    pub inputs: Vec<String>,
    /// Where to write one OUTPUT_NAME.npy per model output.
    #[arg(long, default_value = ".")]
    pub output_dir: PathBuf,
    /// Print a JSON list of the written outputs instead of text.
    #[arg(long)]
    pub json: bool,
    /// Compute AscendQuant with its scale at fp16 precision, as a device
    /// does under FORCE_FP16_QUANT (for deploy models made by AMCT in that
    /// mode; ascend-quant's own say so in their metadata).
    #[arg(long)]
    pub fp16_quant: bool,
}

/// Runs `run`.
pub fn execute(args: &RunArgs) -> Result<(), Failure> {
    let mut model = load_model(&args.model)?;
    if args.fp16_quant {
        crate::deploy_format::fp16_quant::mark(&mut model);
    }
    let written = crate::pipeline::run::run(&model, &args.inputs, &args.output_dir)
        .with_context(|| format!("running {}", args.model.display()))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&written).context("serializing the result")?
        );
    } else {
        for w in &written {
            println!(
                "{:<32} {:<8} {:<20} {}",
                w.name,
                w.dtype,
                format_shape(&w.shape),
                w.file
            );
        }
    }
    Ok(())
}
