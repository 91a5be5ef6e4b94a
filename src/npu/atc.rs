//! Compiling ONNX models to Ascend offline models (`.om`) with CANN's `atc`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `atc` could not be found or failed.
#[derive(Debug, thiserror::Error)]
pub enum AtcError {
    /// No `atc` executable in any searched place.
    #[error(
        "atc not found (searched: {0}); install the CANN toolkit and source its set_env.sh, or set ASCEND_QUANT_ATC"
    )]
    NotFound(String),
    /// `atc` ran and failed; the end of its log says why.
    #[error("atc failed ({status}) compiling {model}:\n{log}")]
    Failed {
        /// The model given to atc.
        model: String,
        /// Its exit status.
        status: String,
        /// The last lines of its output.
        log: String,
    },
    /// `atc` could not be started, or reported success without writing the model.
    #[error("atc: {0}")]
    Other(String),
}

/// Finds `atc`: `ASCEND_QUANT_ATC`, the toolkit's `bin` folders, then `PATH`.
pub fn find_atc() -> Result<PathBuf, AtcError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("ASCEND_QUANT_ATC").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    for var in ["ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(v).join("bin/atc"));
        }
    }
    candidates.push(PathBuf::from(
        "/usr/local/Ascend/ascend-toolkit/latest/bin/atc",
    ));
    candidates.push(PathBuf::from("/usr/local/Ascend/cann/bin/atc"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("atc")));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            AtcError::NotFound(
                candidates
                    .iter()
                    .take(4)
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
                    + ", PATH",
            )
        })
}

/// Compiles `model` to `<output>.om` for `soc_version`; returns the `.om` path.
///
/// atc writes into a temporary folder beside the destination and the `.om`
/// is renamed into place only when atc succeeded, so a failed or interrupted
/// compilation leaves no partial `.om` (and an existing one untouched).
pub fn compile(
    model: &Path,
    output: &Path,
    soc_version: &str,
    input_shape: Option<&str>,
) -> Result<PathBuf, AtcError> {
    let atc = find_atc()?;
    let om = PathBuf::from(format!("{}.om", output.display()));
    let folder = match om.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let work = tempfile::Builder::new()
        .prefix(".atc-")
        .tempdir_in(&folder)
        .map_err(|e| AtcError::Other(format!("cannot write into {}: {e}", folder.display())))?;
    let staged = work.path().join("model");
    let mut cmd = Command::new(&atc);
    cmd.arg(format!("--model={}", model.display()))
        .arg("--framework=5")
        .arg(format!("--output={}", staged.display()))
        .arg(format!("--soc_version={soc_version}"))
        .arg("--log=error");
    if let Some(shape) = input_shape {
        cmd.arg(format!("--input_shape={shape}"));
    }
    let out = cmd
        .output()
        .map_err(|e| AtcError::Other(format!("cannot run {}: {e}", atc.display())))?;
    let log: String = {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    if !out.status.success() {
        return Err(AtcError::Failed {
            model: model.display().to_string(),
            status: out.status.to_string(),
            log,
        });
    }
    let staged_om = work.path().join("model.om");
    if !staged_om.is_file() {
        return Err(AtcError::Other(format!(
            "reported success but wrote no model for {}; its log:\n{log}",
            om.display()
        )));
    }
    std::fs::rename(&staged_om, &om)
        .map_err(|e| AtcError::Other(format!("cannot write {}: {e}", om.display())))?;
    Ok(om)
}
