//! Errors of a quantization run.

use crate::data::DataError;
use crate::onnx::OnnxError;
use crate::sim::SimError;

/// Everything that can stop a calibration.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The model could not be read, indexed or rewritten.
    #[error(transparent)]
    Model(#[from] OnnxError),
    /// The calibration data could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The simulator failed.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// Weights or bias could not be quantized.
    #[error(transparent)]
    Weights(#[from] super::weights::WeightError),
    /// Calibration data or a computed value is unusable; says which and how to fix it.
    #[error("{0}")]
    Input(String),
}
