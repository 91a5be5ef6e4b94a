//! Running models on an Ascend NPU: [`atc`] compiles ONNX models to offline
//! models, [`executor`] runs them through the safe AscendCL wrapper
//! ([`crate::acl`]) behind the simulator's `Executor`/`Session` traits.

pub mod atc;
pub mod executor;

pub use executor::NpuExecutor;
