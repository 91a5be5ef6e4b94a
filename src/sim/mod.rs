//! The CPU simulator: runs ONNX models on the host, with access to any
//! intermediate value (calibration taps) and the ability to start a run
//! from an intermediate value (replaying one layer).
//!
//! Callers use the [`Executor`] and [`Session`] traits. [`CpuExecutor`] runs
//! a model on the native engine (our own kernels, `native.rs`) when it is
//! made of the operators that engine runs, else on [`RtenExecutor`] (the
//! `rten` crate); `docs/engine.md` says why and what each costs.

pub mod ascend;
mod conv3d;
mod cpu;
mod error;
mod exact_conv;
mod fold;
mod foreign;
pub mod kernels;
mod native;
mod native_deploy;
mod native_ops;
mod per_sample;
mod prepare;
mod rten_adapt;
mod rten_engine;
mod steps;

pub use cpu::{CpuExecutor, NativeExecutor, engine_plan};
pub use error::{SimError, ValueRole};
pub use native::Plan;
pub use per_sample::baked_batch;
pub use prepare::{feedable_inputs, rewrite_for_execution};
pub use rten_adapt::adapt_for_rten;
pub use rten_engine::RtenExecutor;

use crate::onnx::{ModelProto, ValueSpec};
use crate::tensor::Tensor;

/// How a model is prepared for execution.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Intermediate values the caller will fetch or feed by name. Naming them
    /// here keeps the engine's optimizer from fusing them away.
    pub keep: Vec<String>,
    /// Let axis 0 of every graph input and output take any size, so a model
    /// exported with batch 1 can run bigger batches where its ops allow it.
    pub dynamic_batch: bool,
    /// Let the engine fuse and rewrite operators for speed.
    pub optimize: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            keep: Vec::new(),
            dynamic_batch: false,
            optimize: true,
        }
    }
}

/// Something that can turn an ONNX model into a runnable [`Session`].
pub trait Executor {
    /// A short name for messages and reports ("cpu").
    fn name(&self) -> &'static str;
    /// Prepares `model` for repeated runs.
    fn prepare(
        &self,
        model: &ModelProto,
        opts: &SessionOptions,
    ) -> Result<Box<dyn Session>, SimError>;
}

/// A model ready to run, any number of times, from any thread.
pub trait Session: Send + Sync {
    /// The graph inputs to feed (initializers excluded).
    fn inputs(&self) -> &[ValueSpec];
    /// The graph outputs, in declaration order.
    fn outputs(&self) -> &[ValueSpec];
    /// Runs the model on `feeds` (graph inputs, or kept intermediate values)
    /// and returns the values named in `fetch`, in that order.
    fn run(&self, feeds: &[(&str, &Tensor)], fetch: &[&str]) -> Result<Vec<Tensor>, SimError>;
    /// Runs like [`Session::run`] but hands each fetched value to `visit`
    /// (with its index in `fetch`) instead of returning it: a session that can
    /// does so as soon as the value is computed and frees it after its last
    /// use, so a caller that only reduces the values never holds them all.
    /// This default runs, then visits ([`run_then_visit`]).
    fn run_visiting(
        &self,
        feeds: &[(&str, &Tensor)],
        fetch: &[&str],
        visit: &mut Visitor<'_>,
    ) -> Result<(), SimError> {
        run_then_visit(self, feeds, fetch, visit)
    }
}

/// [`Session::run_visiting`] for a session that cannot visit as it goes: a
/// whole run, then every fetched value in turn.
pub fn run_then_visit<S: Session + ?Sized>(
    session: &S,
    feeds: &[(&str, &Tensor)],
    fetch: &[&str],
    visit: &mut Visitor<'_>,
) -> Result<(), SimError> {
    for (k, value) in session.run(feeds, fetch)?.iter().enumerate() {
        visit(k, value);
    }
    Ok(())
}

/// What [`Session::run_visiting`] calls with each fetched value.
pub type Visitor<'a> = dyn FnMut(usize, &Tensor) + Send + 'a;

/// The names of the inputs a caller must feed to run `model` (initializers excluded).
pub fn feedable_input_names(model: &ModelProto) -> Vec<String> {
    prepare::feedable_inputs(model)
        .into_iter()
        .map(|s| s.name)
        .collect()
}
