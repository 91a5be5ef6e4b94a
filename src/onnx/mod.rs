//! ONNX models in memory: the generated protobuf types, lossless load/save
//! with external data, tensor conversions and a graph index.

pub mod attr;
pub mod builder;
pub mod error;
pub mod external;
pub mod graph;
pub mod io;
pub mod limits;
pub mod tensor_proto;
pub mod value_info;

/// Protobuf types generated from `proto/onnx.proto` (the complete ONNX IR).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use error::OnnxError;
pub use graph::GraphIndex;
pub use io::{SaveOptions, load_model, load_model_bytes, save_model, save_model_with};
pub use proto::{GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
pub use tensor_proto::{Storage, to_proto, to_tensor};
pub use value_info::{Dim, ValueSpec};

/// The opset `model` imports for the default (ONNX) domain, when it says.
pub fn default_opset(model: &ModelProto) -> Option<i64> {
    model
        .opset_import
        .iter()
        .find(|o| o.domain().is_empty() || o.domain() == "ai.onnx")
        .and_then(|o| o.version)
}

/// The graph of `model`, or [`OnnxError::NoGraph`] naming `origin`.
pub fn graph_of<'a>(model: &'a ModelProto, origin: &str) -> Result<&'a GraphProto, OnnxError> {
    model.graph.as_ref().ok_or_else(|| OnnxError::NoGraph {
        path: origin.into(),
    })
}

/// The graph of `model`, mutable, or [`OnnxError::NoGraph`] naming `origin`.
pub fn graph_of_mut<'a>(
    model: &'a mut ModelProto,
    origin: &str,
) -> Result<&'a mut GraphProto, OnnxError> {
    model.graph.as_mut().ok_or_else(|| OnnxError::NoGraph {
        path: origin.into(),
    })
}
