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

/// The error and its causes on one line, `outer: cause: …`, each cause said
/// once: a cause whose text the line already holds (an error that prints
/// its source in its own message and also chains it) is left out.
pub fn render(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Builds a usage failure from a message.
pub fn usage(message: String) -> Failure {
    Failure {
        code: ExitCode::Usage,
        error: anyhow::anyhow!(message),
    }
}

#[cfg(test)]
mod tests {
    use super::render;

    #[derive(Debug, thiserror::Error)]
    #[error("model.onnx: read failed: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(Repeats(io)).context("loading the model");
        let line = render(&e);
        assert_eq!(
            line,
            "loading the model: model.onnx: read failed: No such file or directory"
        );
        assert_eq!(line.matches("No such file").count(), 1);
        // Distinct causes are all kept, in order.
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(render(&e), "outer: middle: inner");
    }
}
