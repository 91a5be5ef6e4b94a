//! `ascend-quant convert-qat`: a QDQ model (QuantizeLinear/DequantizeLinear)
//! into Ascend's deploy and fake-quant models. Parses and prints; the work
//! is `pipeline::convert`.

use super::Failure;
use crate::pipeline::convert::{ConvertOptions, convert_qat};
use crate::report::counted;
use std::path::PathBuf;

/// Arguments of `convert-qat`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// The QDQ ONNX model (from onnxruntime's quantize_static, a PyTorch QAT export, NNCF...).
    #[arg(long)]
    pub model: PathBuf,
    /// Output prefix: writes PREFIX_deploy_model.onnx, PREFIX_fake_quant_model.onnx,
    /// PREFIX_record.txt and PREFIX_quant_report.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Print nothing but errors.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `convert-qat`.
pub fn execute(args: &ConvertArgs) -> Result<(), Failure> {
    let report = convert_qat(&ConvertOptions {
        model: args.model.clone(),
        output: args.output.clone(),
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    }
    if !args.quiet {
        for l in report.layers.iter().chain(&report.tensor_quantize) {
            eprintln!(
                "{:<36} {:<14} int8  scale_d {:.5e} offset {:>4}",
                l.name, l.op_type, l.scale_d, l.offset_d
            );
        }
        for f in &report.float_ops {
            eprintln!("{:<36} {:<14} float: {}", f.node, f.op_type, f.reason);
        }
        eprintln!(
            "{} and {} converted to int8, {} in float, {:.2} s",
            counted(report.layers.len(), "layer", "layers"),
            counted(report.tensor_quantize.len(), "tensor", "tensors"),
            counted(report.float_ops.len(), "operator", "operators"),
            report.seconds
        );
        for o in &report.outputs {
            eprintln!("wrote {o}");
        }
    }
    Ok(())
}
