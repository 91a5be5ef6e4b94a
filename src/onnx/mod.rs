//! ONNX models in memory: the generated protobuf types, lossless load/save
//! with external data, tensor conversions and a graph index.

pub mod builder;
pub mod error;
pub mod external;
pub mod graph;
pub mod io;
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
