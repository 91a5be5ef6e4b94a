//! Accuracy-based automatic quantization: find the layers that hurt the
//! metric and keep them in float until the drop is within the user's bound.
//!
//! Calibration statistics are computed once (every layer's factors from the
//! float model) and reused for every configuration tried; a configuration is
//! just the set of layers kept in float.

pub mod evaluator;
pub mod search;
pub mod sensitivity;

pub use crate::report::metric::{Metric, MetricName};
pub use evaluator::{Evaluator, ExternalEvaluator, InternalEvaluator};
pub use search::{SearchOutcome, Trial, search};
pub use sensitivity::{LayerSensitivity, layer_sensitivities};
