//! The one error type of the library API, sorted by who can fix it.

use crate::data::DataError;
use crate::onnx::OnnxError;
use crate::quant::config::ConfigError;
use crate::quant::error::QuantError;
use crate::sim::SimError;

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The options do not make sense together, or an output cannot be written.
    #[error("{0}")]
    Usage(String),
    /// The model could not be read or is malformed.
    #[error(transparent)]
    Model(#[from] OnnxError),
    /// A data file could not be read or is malformed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A configuration file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Calibration or quantization failed.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// The simulator failed.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The NPU (runtime, device or atc) failed: the input does not explain it.
    #[error("{0}")]
    Device(String),
    /// Training diverged.
    #[error("{0}")]
    Training(String),
}

impl PipelineError {
    /// Whether the user's input (options, model, data, config) is at fault,
    /// rather than the machine or a device.
    pub fn is_input_error(&self) -> bool {
        match self {
            PipelineError::Usage(_)
            | PipelineError::Model(_)
            | PipelineError::Data(_)
            | PipelineError::Config(_) => true,
            PipelineError::Quant(QuantError::Sim(s)) | PipelineError::Sim(s) => s.is_input_error(),
            PipelineError::Quant(_) => true,
            PipelineError::Device(_) | PipelineError::Training(_) => false,
        }
    }
}
