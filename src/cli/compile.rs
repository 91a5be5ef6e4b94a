//! `ascend-quant compile`: a deploy model to an Ascend offline model with atc.

use super::Failure;
use super::exit::usage;
use crate::acl::Acl;
use crate::npu::atc::compile;
use std::path::PathBuf;

/// Arguments of `compile`.
#[derive(Debug, clap::Args)]
pub struct CompileArgs {
    /// The ONNX model (usually PREFIX_deploy_model.onnx).
    #[arg(long)]
    pub model: PathBuf,
    /// Target chip, e.g. Ascend310P3 (default: the SoC of this machine's NPU).
    #[arg(long)]
    pub soc_version: Option<String>,
    /// Input shapes "name:n,c,h,w;..." for atc.
    #[arg(long)]
    pub input_shape: Option<String>,
    /// Output path without `.om` (default: the model path without `.onnx`).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// Runs `compile`.
pub fn execute(args: &CompileArgs) -> Result<(), Failure> {
    if !args.model.is_file() {
        return Err(usage(format!(
            "{}: no such model file",
            args.model.display()
        )));
    }
    let soc = match &args.soc_version {
        Some(s) => s.clone(),
        None => Acl::load(None)
            .ok()
            .and_then(|a| a.soc_name())
            .ok_or_else(|| usage("--soc-version is needed: no Ascend runtime here reports its SoC (see `ascend-quant devices`)".into()))?,
    };
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| args.model.with_extension(""));
    let om =
        compile(&args.model, &output, &soc, args.input_shape.as_deref()).map_err(|e| Failure {
            code: super::ExitCode::Runtime,
            error: e.into(),
        })?;
    println!("wrote {}", om.display());
    Ok(())
}
