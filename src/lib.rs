//! ascend-quant: quantizes ONNX models for Huawei Ascend NPUs.
//!
//! The library reads float ONNX models losslessly ([`onnx`]), runs them on a
//! CPU simulator with access to every intermediate value ([`sim`]), and (in
//! later modules) calibrates and writes Ascend deploy and fake-quant models.
#![warn(missing_docs)]

pub mod acl;
pub mod auto;
pub mod cli;
pub mod data;
pub mod deploy_format;
pub mod fsutil;
pub mod npu;
pub mod onnx;
pub mod quant;
pub mod report;
pub mod sim;
pub mod similarity;
pub mod tensor;

pub use tensor::{DType, Tensor};
