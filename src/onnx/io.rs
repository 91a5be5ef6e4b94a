//! Loading ONNX models from files or bytes, and saving them atomically.

use super::error::{OnnxError, Result};
use super::external;
use super::proto::ModelProto;
use crate::fsutil;
use prost::Message;
use std::path::{Path, PathBuf};

/// Largest serialized size protobuf allows for one message (2 GiB - 1).
pub const PROTOBUF_LIMIT: usize = i32::MAX as usize;

/// Reads an ONNX model and brings any external tensor data into memory.
///
/// External data locations are resolved relative to the model's folder; a
/// location that leaves that folder, or a range past the data file's end, is
/// an error naming the tensor.
pub fn load_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io {
        path: path.to_path_buf(),
        action: "read",
        error: source,
    })?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    load_model_bytes(&bytes, path, Some(&base))
}

/// Decodes a model from bytes. `origin` names the source in errors;
/// `base_dir` is where external data files live (`None` refuses external data).
pub fn load_model_bytes(
    bytes: &[u8],
    origin: &Path,
    base_dir: Option<&Path>,
) -> Result<ModelProto> {
    let mut model = ModelProto::decode(bytes).map_err(|source| OnnxError::Decode {
        path: origin.to_path_buf(),
        error: source,
    })?;
    if model.graph.is_none() {
        return Err(OnnxError::NoGraph {
            path: origin.to_path_buf(),
        });
    }
    match base_dir {
        Some(base) => external::resolve(&mut model, origin, base)?,
        None => external::for_each_tensor_mut(&mut model, &mut |t| {
            if t.data_location() == super::proto::tensor_proto::DataLocation::External {
                return Err(OnnxError::ExternalData {
                    path: origin.to_path_buf(),
                    tensor: t.name().to_string(),
                    reason: "the model was given as bytes, so its external data files cannot be found; load it from its file".into(),
                });
            }
            Ok(())
        })?,
    }
    external::for_each_tensor_mut(&mut model, &mut check_raw_size)?;
    Ok(model)
}

/// Checks that a tensor's `raw_data` holds exactly as many bytes as its dims
/// and element type need, so corruption is caught at load with the tensor's name.
fn check_raw_size(t: &mut super::proto::TensorProto) -> Result<()> {
    let (Some(raw), Some(dtype)) = (
        t.raw_data.as_ref(),
        crate::tensor::DType::from_onnx_code(t.data_type()),
    ) else {
        return Ok(());
    };
    let (_, count) = super::tensor_proto::dims_of(t)?;
    let expected = count.saturating_mul(dtype.size_of());
    if raw.len() != expected {
        return Err(OnnxError::TensorData {
            tensor: t.name().to_string(),
            reason: format!(
                "raw_data holds {} bytes but dims {:?} of {dtype} need {expected} bytes; the model is corrupt, re-export it",
                raw.len(),
                t.dims
            ),
        });
    }
    Ok(())
}

/// How [`save_model_with`] lays out a model on disk.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Serialized size above which tensors are moved to an external data file.
    pub inline_limit: usize,
    /// Tensors smaller than this stay inline even when spilling.
    pub min_external_bytes: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        // Keep a margin below protobuf's hard limit for the graph's own structure.
        SaveOptions {
            inline_limit: PROTOBUF_LIMIT - (64 << 20),
            min_external_bytes: 1024,
        }
    }
}

/// Saves a model to `path` atomically, inline unless it would be too large.
pub fn save_model(model: &ModelProto, path: &Path) -> Result<()> {
    save_model_with(model, path, &SaveOptions::default())
}

/// Saves a model to `path` atomically. When the serialized model would
/// exceed `opts.inline_limit`, large tensors go to `<file name>.data` beside
/// it (also written atomically, before the model that refers to it).
pub fn save_model_with(model: &ModelProto, path: &Path, opts: &SaveOptions) -> Result<()> {
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| OnnxError::Io {
            path: p,
            action: "write",
            error: source,
        }
    };
    if model.encoded_len() <= opts.inline_limit {
        return fsutil::write_atomic(path, &model.encode_to_vec()).map_err(io_err(path));
    }
    let file_name = path
        .file_name()
        .map(|n| format!("{}.data", n.to_string_lossy()))
        .unwrap_or_else(|| "model.onnx.data".into());
    let mut spilled = model.clone();
    let blob = external::spill(&mut spilled, &file_name, opts.min_external_bytes)?;
    if spilled.encoded_len() > PROTOBUF_LIMIT {
        return Err(OnnxError::TensorData {
            tensor: "(whole model)".into(),
            reason: format!(
                "{} bytes even with large tensors stored externally, over protobuf's 2 GB limit; the graph itself is too large",
                spilled.encoded_len()
            ),
        });
    }
    let data_path = path.with_file_name(&file_name);
    fsutil::write_atomic(&data_path, &blob).map_err(io_err(&data_path))?;
    fsutil::write_atomic(path, &spilled.encode_to_vec()).map_err(io_err(path))
}
