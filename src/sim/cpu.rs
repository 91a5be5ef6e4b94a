//! The CPU executor users get: the native engine (our kernels) for models
//! made only of the operators it runs (deploy models included, with exact
//! integer layers), the rten engine for everything else. The choice is
//! made per prepared model, so a calibration session with taps and a plain
//! inference session of the same model may differ only in speed.

use super::error::SimError;
use super::native::{NativeModel, NativeSession, Plan};
use super::{Executor, RtenExecutor, Session, SessionOptions};
use crate::onnx::ModelProto;

/// Runs models on the CPU with the fastest engine that can run them.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuExecutor;

impl Executor for CpuExecutor {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn prepare(
        &self,
        model: &ModelProto,
        opts: &SessionOptions,
    ) -> Result<Box<dyn Session>, SimError> {
        if let Some(native) = NativeModel::build(model, opts)? {
            return Ok(Box::new(NativeSession::new(native)));
        }
        RtenExecutor.prepare(model, opts)
    }
}

/// The native engine alone: an error for a model it does not run (for
/// tests and benchmarks that must know which engine ran).
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeExecutor;

impl Executor for NativeExecutor {
    fn name(&self) -> &'static str {
        "cpu-native"
    }

    fn prepare(
        &self,
        model: &ModelProto,
        opts: &SessionOptions,
    ) -> Result<Box<dyn Session>, SimError> {
        match NativeModel::build(model, opts)? {
            Some(native) => Ok(Box::new(NativeSession::new(native))),
            None => Err(SimError::Load {
                reason: "the native engine does not run one of this model's operators (or their attributes); use the cpu executor, which falls back to rten".into(),
            }),
        }
    }
}

/// How [`CpuExecutor`] runs `model` prepared with `opts`: how many steps
/// run on the native engine, how many nodes were computed when preparing
/// (shape folding), which nodes run alone on rten and why, or whether the
/// whole model does.
pub fn engine_plan(model: &ModelProto, opts: &SessionOptions) -> Result<Plan, SimError> {
    Ok(NativeModel::plan(model, opts)?.1)
}
