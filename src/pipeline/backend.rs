//! Choosing where calibration runs: the CPU simulator or an Ascend NPU.

use super::error::PipelineError;
use crate::npu::NpuExecutor;
use crate::sim::{CpuExecutor, Executor};
use std::path::Path;

/// Where calibration runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The NPU when one is usable, else the CPU simulator.
    #[default]
    Auto,
    /// The CPU simulator.
    Cpu,
    /// An Ascend NPU through AscendCL (atc compiles the model).
    Npu,
}

impl crate::choice::Choice for Backend {
    const ALL: &'static [Self] = &[Backend::Auto, Backend::Cpu, Backend::Npu];

    fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Cpu => "cpu",
            Backend::Npu => "npu",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Backend::Auto => "The NPU when one is usable, else the CPU simulator",
            Backend::Cpu => "The CPU simulator",
            Backend::Npu => "An Ascend NPU through AscendCL (atc compiles the model)",
        }
    }
}

/// The executor for `backend` and a one-line description of the choice.
/// Compiled NPU models are cached in `.ascend-quant-cache` beside `output`.
pub fn select_backend(
    backend: Backend,
    acl_lib: Option<&Path>,
    output: &Path,
) -> Result<(Box<dyn Executor>, String), PipelineError> {
    let cache = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(".ascend-quant-cache");
    // The runtime first: without it, a missing atc is not the reason.
    let npu = || -> Result<NpuExecutor, String> {
        let n = NpuExecutor::new(acl_lib, &cache).map_err(|e| e.to_string())?;
        crate::npu::atc::find_atc().map_err(|e| e.to_string())?;
        Ok(n)
    };
    match backend {
        Backend::Cpu => Ok((Box::new(CpuExecutor), "cpu simulator".into())),
        Backend::Npu => {
            let n = npu().map_err(|e| PipelineError::Device(format!("--backend npu: {e}")))?;
            let line = format!("npu ({}, device 0)", n.soc());
            Ok((Box::new(n), line))
        }
        Backend::Auto => match npu() {
            Ok(n) => {
                let line = format!("npu ({}, device 0)", n.soc());
                Ok((Box::new(n), line))
            }
            Err(e) => {
                let why = e.split(" (searched").next().unwrap_or(&e).to_string();
                Ok((Box::new(CpuExecutor), format!("cpu simulator ({why})")))
            }
        },
    }
}
