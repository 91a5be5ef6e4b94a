//! The files a run writes: their names, and writing them all or none.

use super::error::PipelineError;
use crate::fsutil::Staging;
use crate::onnx::{Dim, ModelProto, SaveOptions, save_model_with};
use crate::sim::feedable_input_names;
use prost::Message;
use std::path::{Path, PathBuf};

/// The four files of a quantization run with output prefix `PREFIX`.
#[derive(Clone, Debug)]
pub struct OutputFiles {
    /// `PREFIX_deploy_model.onnx`.
    pub deploy: PathBuf,
    /// `PREFIX_fake_quant_model.onnx`.
    pub fake_quant: PathBuf,
    /// `PREFIX_record.txt`.
    pub record: PathBuf,
    /// `PREFIX_quant_report.json`.
    pub report: PathBuf,
}

impl OutputFiles {
    /// The files of prefix `prefix`.
    pub fn new(prefix: &Path) -> OutputFiles {
        OutputFiles {
            deploy: with_suffix(prefix, "_deploy_model.onnx"),
            fake_quant: with_suffix(prefix, "_fake_quant_model.onnx"),
            record: with_suffix(prefix, "_record.txt"),
            report: with_suffix(prefix, "_quant_report.json"),
        }
    }
}

/// `PREFIX` + `suffix` as a path.
pub fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", prefix.display()))
}

/// The folder the files of `prefix` go to.
pub fn output_folder(prefix: &Path) -> PathBuf {
    match prefix.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The first axis of the first input, when the model fixes it.
pub fn declared_batch(model: &ModelProto) -> Option<usize> {
    let g = model.graph.as_ref()?;
    let name = feedable_input_names(model).into_iter().next()?;
    let v = g.input.iter().find(|v| v.name() == name)?;
    match crate::onnx::ValueSpec::from_proto(v).shape?.first()? {
        Dim::Fixed(n) if *n > 0 => Some(*n),
        _ => None,
    }
}

/// Fails early, before any work, when the output folder cannot take files.
pub fn check_writable(prefix: &Path) -> Result<(), PipelineError> {
    let dir = output_folder(prefix);
    std::fs::create_dir_all(&dir).map_err(|e| {
        PipelineError::Usage(format!(
            "cannot create output folder {}: {e}",
            dir.display()
        ))
    })?;
    Staging::new(&dir).map_err(|e| {
        PipelineError::Usage(format!(
            "output folder {} is not writable: {e}; choose another --output",
            dir.display()
        ))
    })?;
    Ok(())
}

fn file_name(path: &Path) -> Result<String, PipelineError> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| PipelineError::Usage(format!("{} is not a file name", path.display())))
}

/// Writes a run's models and text files so that they appear all together or
/// not at all (see [`Staging`]): each is written into a staging folder beside
/// the outputs, then renamed into place. A model too large for one protobuf
/// file is staged with its large tensors in a `<file>.data` beside it, which
/// moves with it. Every path must be in the folder of `prefix`.
pub fn write_outputs(
    models: &[(&Path, &ModelProto)],
    texts: &[(&Path, &[u8])],
    prefix: &Path,
) -> Result<Vec<PathBuf>, PipelineError> {
    write_outputs_with(models, texts, prefix, &SaveOptions::default())
}

/// [`write_outputs`] with explicit model-saving options (the inline limit).
pub fn write_outputs_with(
    models: &[(&Path, &ModelProto)],
    texts: &[(&Path, &[u8])],
    prefix: &Path,
    save: &SaveOptions,
) -> Result<Vec<PathBuf>, PipelineError> {
    let folder = output_folder(prefix);
    let fail = |e: String| {
        PipelineError::Usage(format!(
            "writing the outputs under {} failed: {e}; nothing was written",
            prefix.display()
        ))
    };
    let staging = Staging::new(&folder).map_err(|e| fail(e.to_string()))?;
    for (path, model) in models {
        let name = file_name(path)?;
        if model.encoded_len() > save.inline_limit {
            save_model_with(model, &staging.path(&name), save).map_err(|e| fail(e.to_string()))?;
        } else {
            staging
                .write(&name, &model.encode_to_vec())
                .map_err(|e| fail(e.to_string()))?;
        }
    }
    for (path, bytes) in texts {
        staging
            .write(&file_name(path)?, bytes)
            .map_err(|e| fail(e.to_string()))?;
    }
    staging.commit().map_err(|e| fail(e.to_string()))
}
