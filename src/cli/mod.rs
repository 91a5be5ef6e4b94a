//! The command-line interface: one file per subcommand, and the mapping of
//! failures to stable exit codes.

mod auto;
mod calibrate;
mod choices;
mod compare;
mod compile;
mod completions;
mod convert;
mod devices;
mod exit;
mod images;
mod inspect;
mod qat;
mod run;
mod texts;

pub use exit::{ExitCode, Failure};

use clap::{Parser, Subcommand};
use std::ffi::OsString;

/// The version and the git commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ASCEND_QUANT_COMMIT"),
    ")"
);

/// Quantize ONNX models for Huawei Ascend NPUs.
#[derive(Debug, Parser)]
#[command(name = "ascend-quant", version = VERSION, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a model's opset, inputs, outputs, operators and quantizable layers.
    Inspect(inspect::InspectArgs),
    /// Print a shell completion script: `ascend-quant completions bash > /etc/bash_completion.d/ascend-quant`.
    Completions(completions::CompletionsArgs),
    /// Run a model on the CPU simulator and write its outputs as .npy files.
    Run(run::RunArgs),
    /// Post-training quantization: calibrate and write deploy and fake-quant models.
    Calibrate(calibrate::CalibrateArgs),
    /// Write the default per-layer quantization config of a model (AMCT JSON).
    Config(calibrate::ConfigArgs),
    /// Accuracy-based automatic quantization: keep the layers that hurt in float.
    #[command(mut_arg("html", |a| a.hide(true)))]
    Auto(auto::AutoArgs),
    /// Quantization-aware training on the CPU (learnable clips, checkpoints, resume).
    Qat(qat::QatArgs),
    /// Convert a QDQ (QuantizeLinear/DequantizeLinear) model into Ascend's deploy and fake-quant models.
    ConvertQat(convert::ConvertArgs),
    /// Compare a float model with its quantized version layer by layer.
    Compare(compare::CompareArgs),
    /// Show the Ascend runtime, SoC and NPUs of this machine.
    Devices(devices::DevicesArgs),
    /// Compile a deploy model to an Ascend offline model (.om) with atc.
    Compile(compile::CompileArgs),
}

/// A parser of counts that must be at least 1 (`--batch-size 0` is refused,
/// not taken as 1).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// Parses `args`, runs the command and returns the process exit code.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::Usage as i32
            } else {
                ExitCode::Ok as i32
            };
        }
    };
    let result = match cli.command {
        Command::Inspect(a) => inspect::execute(&a),
        Command::Completions(a) => {
            print!("{}", completions::script(a.shell));
            Ok(())
        }
        Command::Run(a) => run::execute(&a),
        Command::Calibrate(a) => calibrate::execute(&a),
        Command::Config(a) => calibrate::execute_config(&a),
        Command::Auto(a) => auto::execute(&a),
        Command::Qat(a) => qat::execute(&a),
        Command::ConvertQat(a) => convert::execute(&a),
        Command::Compare(a) => compare::execute(&a),
        Command::Devices(a) => devices::execute(&a),
        Command::Compile(a) => compile::execute(&a),
    };
    match result {
        Ok(()) => ExitCode::Ok as i32,
        Err(f) => {
            eprintln!("error: {}", exit::render(&f.error));
            f.code as i32
        }
    }
}
