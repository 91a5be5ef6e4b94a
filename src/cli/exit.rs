//! Exit codes and the classification of failures into them.

use crate::data::DataError;
use crate::onnx::OnnxError;
use crate::pipeline::PipelineError;
use crate::quant::config::ConfigError;
use crate::quant::error::QuantError;
use crate::sim::SimError;

/// The process exit codes, stable for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// Success.
    Ok = 0,
    /// Bad input or usage: the model, the data, the arguments or the output place.
    Usage = 1,
    /// A failure at run time that the input does not explain.
    Runtime = 2,
    /// The accuracy target was not met (automatic quantization).
    Accuracy = 3,
}

/// A failed command: the error to print and the exit code to return.
#[derive(Debug)]
pub struct Failure {
    /// What to exit with.
    pub code: ExitCode,
    /// What to tell the user.
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    /// Classifies an error by the library error types in its chain.
    fn from(e: E) -> Self {
        let error: anyhow::Error = e.into();
        let code = error
            .chain()
            .find_map(|cause| {
                if let Some(p) = cause.downcast_ref::<PipelineError>() {
                    Some(if p.is_input_error() {
                        ExitCode::Usage
                    } else {
                        ExitCode::Runtime
                    })
                } else if let Some(q) = cause.downcast_ref::<QuantError>() {
                    Some(match q {
                        QuantError::Sim(s) if !s.is_input_error() => ExitCode::Runtime,
                        _ => ExitCode::Usage,
                    })
                } else if cause.is::<crate::acl::AclError>() || cause.is::<crate::acl::AclFailure>()
                {
                    Some(ExitCode::Runtime)
                } else if let Some(s) = cause.downcast_ref::<SimError>() {
                    Some(if s.is_input_error() {
                        ExitCode::Usage
                    } else {
                        ExitCode::Runtime
                    })
                } else if cause.is::<OnnxError>()
                    || cause.is::<DataError>()
                    || cause.is::<ConfigError>()
                {
                    Some(ExitCode::Usage)
                } else {
                    None
                }
            })
            .unwrap_or(ExitCode::Runtime);
        Failure { code, error }
    }
}

/// Builds a usage failure from a message.
pub fn usage(message: String) -> Failure {
    Failure {
        code: ExitCode::Usage,
        error: anyhow::anyhow!(message),
    }
}
