//! The library API behind the commands: one call per job, from options to
//! files on disk and a report. `cli/` parses arguments into these options
//! and prints what comes back; programs use the same calls
//! (`ascend_quant::calibrate`, `ascend_quant::pipeline::auto::run`, ...).

pub mod artifacts;
pub mod auto;
pub mod backend;
pub mod calibrate;
pub mod compare;
pub mod convert;
pub mod error;
pub mod inputs;
pub mod outputs;
pub mod qat;
pub mod run;

pub use backend::{Backend, select_backend};
pub use calibrate::{CalibrateResult, calibrate, default_config};
pub use compare::{CompareOptions, compare_models};
pub use error::PipelineError;
pub use inputs::{CalibrateOptions, ConfigSource, DataSource, RunInputs, gather};
pub use outputs::{OutputFiles, declared_batch, write_outputs};

/// How a long job reports what it is doing; every callback may do nothing.
#[derive(Clone, Copy)]
pub struct Progress<'a> {
    /// Called after each calibration batch with (done, total).
    pub batches: &'a (dyn Fn(usize, usize) + Sync),
    /// One line for the user (the backend chosen, a candidate's score...).
    pub message: &'a (dyn Fn(&str) + Sync),
    /// The current state of a long loop (a training step's loss, speed and
    /// ETA): shown in place on a terminal, as a line otherwise.
    pub status: &'a (dyn Fn(&str) + Sync),
}

fn ignore_batches(_: usize, _: usize) {}
fn ignore_message(_: &str) {}

impl Progress<'static> {
    /// Reports nothing.
    pub fn silent() -> Progress<'static> {
        Progress {
            batches: &ignore_batches,
            message: &ignore_message,
            status: &ignore_message,
        }
    }
}
