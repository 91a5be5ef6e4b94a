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
        /// Whether it was fed (an input) or fetched (an output).
        role: ValueRole,
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

/// Whether a value is fed to a model or fetched from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueRole {
    /// Fed to the model.
    Input,
    /// Fetched from the model.
    Output,
}

impl ValueRole {
    /// "inputs" or "outputs", for lists of names.
    pub fn plural(self) -> &'static str {
        match self {
            ValueRole::Input => "inputs",
            ValueRole::Output => "outputs",
        }
    }
}

impl std::fmt::Display for ValueRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ValueRole::Input => "an input",
            ValueRole::Output => "an output",
        })
    }
}

impl SimError {
    /// Whether the caller's input (model or data) is at fault, rather than the engine.
    pub fn is_input_error(&self) -> bool {
        !matches!(self, SimError::Run { .. })
    }
}

/// The hint of an [`SimError::UnknownValue`]: the names the model declares
/// for that role, and the kept values.
pub fn names_hint(declared: &[crate::onnx::ValueSpec], keep: &[String], role: ValueRole) -> String {
    let names: Vec<&str> = declared.iter().map(|s| s.name.as_str()).collect();
    let kept = if keep.is_empty() {
        String::new()
    } else {
        format!(" (or kept values: {})", keep.join(", "))
    };
    format!(
        "the model's {} are: {}{kept}",
        role.plural(),
        names.join(", ")
    )
}
