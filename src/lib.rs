//! ascend-quant: quantizes ONNX models for Huawei Ascend NPUs.
//!
//! The library reads float ONNX models losslessly ([`onnx`]), runs them on a
//! CPU simulator with access to every intermediate value ([`sim`]) or on an
//! Ascend NPU ([`npu`], over the safe AscendCL wrapper [`acl`]), calibrates
//! them ([`quant`]) and writes Ascend deploy and fake-quant models in the
//! format of [`deploy_format`]. The jobs the commands run are library calls:
//! [`calibrate`], [`pipeline::auto::run`], [`pipeline::compare_models`]; see
//! `examples/calibrate.rs`.
#![warn(missing_docs)]

pub mod acl;
pub mod auto;
pub mod choice;
pub mod cli;
pub mod convert;
pub mod data;
pub mod deploy_format;
pub mod fsutil;
pub mod npu;
pub mod onnx;
pub mod ops;
pub mod pipeline;
pub mod quant;
pub mod report;
pub mod sim;
pub mod similarity;
pub mod tensor;
pub mod train;

pub use pipeline::{CalibrateOptions, PipelineError, Progress, calibrate};
pub use tensor::{DType, Tensor};
