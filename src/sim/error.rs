//! Errors of the CPU simulator.

/// What can go wrong preparing or running a model on the CPU simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The model is not runnable (an unsupported operator, a bad attribute, a broken graph).
    #[error("the CPU engine cannot load the model: {reason}")]
    Load {
        /// What the engine reported, naming the node.
        reason: String,
    },
    /// A fed or fetched name that is neither a graph input/output nor a kept value.
    #[error("'{name}' is not {role} of the model; {hint}")]
    UnknownValue {
        /// The name given.
        name: String,
        /// "an input" or "an output".
        role: &'static str,
        /// What the valid names are.
        hint: String,
    },
    /// A fed tensor whose element type or shape disagrees with the model.
    #[error("input '{name}': {reason}")]
    InputMismatch {
        /// The input's name.
        name: String,
        /// The disagreement and what the model expects.
        reason: String,
    },
    /// The engine failed while running.
    #[error("the CPU engine failed while running the model: {reason}")]
    Run {
        /// What the engine reported.
        reason: String,
    },
}

impl SimError {
    /// Whether the caller's input (model or data) is at fault, rather than the engine.
    pub fn is_input_error(&self) -> bool {
        !matches!(self, SimError::Run { .. })
    }
}
