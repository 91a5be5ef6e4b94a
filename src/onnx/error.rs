//! Errors raised while reading, converting or writing ONNX models.

use std::path::PathBuf;

/// Everything that can go wrong between an ONNX file on disk and the in-memory model.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// A file could not be read or written.
    #[error("{path}: {action} failed: {error}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What was being done ("read", "write", ...).
        action: &'static str,
        /// The operating-system error (in the message, not chained after it).
        error: std::io::Error,
    },
    /// The bytes are not a protobuf `ModelProto` (truncated, or another kind of file).
    #[error(
        "{path}: not a valid ONNX model ({error}); the file may be truncated or not an ONNX file: re-export or re-copy it"
    )]
    Decode {
        /// The file concerned.
        path: PathBuf,
        /// What the protobuf decoder reported (in the message, not chained after it).
        error: prost::DecodeError,
    },
    /// The model has no graph.
    #[error("{path}: the model holds no graph; re-export it with a graph")]
    NoGraph {
        /// The file concerned.
        path: PathBuf,
    },
    /// A tensor's stored data disagrees with its declared type or dims.
    #[error("tensor '{tensor}': {reason}")]
    TensorData {
        /// The tensor's name.
        tensor: String,
        /// What is inconsistent.
        reason: String,
    },
    /// A tensor element type that ascend-quant cannot convert.
    #[error(
        "tensor '{tensor}': element type {dtype} is not supported (supported: float32, float16, float64, int8, uint8, int32, int64, uint64, bool)"
    )]
    UnsupportedDType {
        /// The tensor's name.
        tensor: String,
        /// The ONNX type name.
        dtype: String,
    },
    /// External data that cannot be resolved safely.
    #[error("{path}: external data of tensor '{tensor}': {reason}")]
    ExternalData {
        /// The model file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The graph's nodes cannot be ordered: some value depends on itself.
    #[error(
        "graph '{graph}' has a cycle through node '{node}' ({op_type}); an ONNX graph must be acyclic"
    )]
    Cycle {
        /// The graph's name.
        graph: String,
        /// One node on the cycle.
        node: String,
        /// That node's operator.
        op_type: String,
    },
    /// Two nodes (or a node and an initializer/input) define the same value.
    #[error(
        "graph '{graph}': value '{value}' is produced twice (by {first} and {second}); ONNX values must have one producer"
    )]
    DuplicateProducer {
        /// The graph's name.
        graph: String,
        /// The value's name.
        value: String,
        /// The first definition.
        first: String,
        /// The second definition.
        second: String,
    },
    /// A node whose inputs or attributes contradict each other or the ONNX
    /// operator's definition.
    #[error("node '{node}': {reason}")]
    Invalid {
        /// The node's name.
        node: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A shape or size so large that working with it would exhaust memory.
    #[error("{what} needs {size}, more than the limit of {limit}; {hint}")]
    TooLarge {
        /// What would be allocated (naming the node or tensor).
        what: String,
        /// The size it needs, readable ("2.0 TiB", "2^40 elements").
        size: String,
        /// The limit.
        limit: String,
        /// How to proceed.
        hint: String,
    },
}

/// Result type of the `onnx` module.
pub type Result<T, E = OnnxError> = std::result::Result<T, E>;
