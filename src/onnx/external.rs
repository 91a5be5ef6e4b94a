//! External tensor data: resolving it into memory on load, and spilling large
//! tensors to a side file on save when a model would pass protobuf's 2 GB limit.

use super::error::{OnnxError, Result};
use super::proto::tensor_proto::DataLocation;
use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto,
};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

/// Calls `f` on every `TensorProto` a model holds: initializers, sparse
/// initializers, tensor attributes, and those of subgraphs, functions and
/// training graphs, recursively.
pub fn for_each_tensor_mut(
    model: &mut ModelProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    if let Some(g) = model.graph.as_mut() {
        visit_graph(g, f)?;
    }
    for func in &mut model.functions {
        visit_nodes(&mut func.node, f)?;
        for a in &mut func.attribute_proto {
            visit_attribute(a, f)?;
        }
    }
    for info in &mut model.training_info {
        for g in [info.initialization.as_mut(), info.algorithm.as_mut()]
            .into_iter()
            .flatten()
        {
            visit_graph(g, f)?;
        }
    }
    Ok(())
}

fn visit_graph(
    g: &mut GraphProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    for t in &mut g.initializer {
        f(t)?;
    }
    for s in &mut g.sparse_initializer {
        for t in [s.values.as_mut(), s.indices.as_mut()]
            .into_iter()
            .flatten()
        {
            f(t)?;
        }
    }
    visit_nodes(&mut g.node, f)
}

fn visit_nodes(
    nodes: &mut [NodeProto],
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    for n in nodes {
        for a in &mut n.attribute {
            visit_attribute(a, f)?;
        }
    }
    Ok(())
}

fn visit_attribute(
    a: &mut AttributeProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    if let Some(t) = a.t.as_mut() {
        f(t)?;
    }
    for t in &mut a.tensors {
        f(t)?;
    }
    for s in a
        .sparse_tensor
        .iter_mut()
        .chain(a.sparse_tensors.iter_mut())
    {
        for t in [s.values.as_mut(), s.indices.as_mut()]
            .into_iter()
            .flatten()
        {
            f(t)?;
        }
    }
    for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
        visit_graph(g, f)?;
    }
    Ok(())
}

/// The parsed `external_data` entries of one tensor.
struct ExternalRef {
    location: String,
    offset: u64,
    length: Option<u64>,
}

fn parse_ref(model_path: &Path, t: &TensorProto) -> Result<ExternalRef> {
    let err = |reason: String| OnnxError::ExternalData {
        path: model_path.to_path_buf(),
        tensor: t.name().to_string(),
        reason,
    };
    let mut location = None;
    let mut offset = 0;
    let mut length = None;
    for e in &t.external_data {
        let number = |v: &str| {
            v.parse::<u64>().map_err(|_| {
                err(format!(
                    "'{}' is not a non-negative integer: '{v}'",
                    e.key()
                ))
            })
        };
        match e.key() {
            "location" => location = Some(e.value().to_string()),
            "offset" => offset = number(e.value())?,
            "length" => length = Some(number(e.value())?),
            _ => {}
        }
    }
    let location =
        location.ok_or_else(|| err("no 'location' entry; the model is malformed".into()))?;
    Ok(ExternalRef {
        location,
        offset,
        length,
    })
}

/// Checks that `location` is a plain relative path that stays inside `base`,
/// and returns the full path.
fn safe_join(model_path: &Path, tensor: &str, base: &Path, location: &str) -> Result<PathBuf> {
    let err = |reason: String| OnnxError::ExternalData {
        path: model_path.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    };
    let rel = Path::new(location);
    let escapes = rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if location.is_empty() || escapes {
        return Err(err(format!(
            "location '{location}' is not a relative path inside the model's folder; external data files must sit next to the model"
        )));
    }
    let full = base.join(rel);
    let canonical_base = base.canonicalize().map_err(|e| {
        err(format!(
            "cannot resolve the model folder {}: {e}",
            base.display()
        ))
    })?;
    let canonical = full.canonicalize().map_err(|e| {
        err(format!(
            "cannot open '{}': {e}; copy the data file next to the model",
            full.display()
        ))
    })?;
    if !canonical.starts_with(&canonical_base) {
        return Err(err(format!(
            "location '{location}' resolves to {} outside the model's folder (through a link); refusing to read it",
            canonical.display()
        )));
    }
    Ok(canonical)
}

/// Replaces every external tensor of `model` by its bytes read from the data
/// files next to `model_path` (in `base_dir`), so the model is self-contained in memory.
pub fn resolve(model: &mut ModelProto, model_path: &Path, base_dir: &Path) -> Result<()> {
    let mut files: HashMap<PathBuf, std::fs::File> = HashMap::new();
    for_each_tensor_mut(model, &mut |t| {
        if t.data_location() != DataLocation::External {
            return Ok(());
        }
        let r = parse_ref(model_path, t)?;
        let name = t.name().to_string();
        let full = safe_join(model_path, &name, base_dir, &r.location)?;
        let err = |reason: String| OnnxError::ExternalData {
            path: model_path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        if !files.contains_key(&full) {
            let f = std::fs::File::open(&full)
                .map_err(|e| err(format!("cannot open '{}': {e}", full.display())))?;
            files.insert(full.clone(), f);
        }
        let file = files.get_mut(&full).expect("just inserted");
        let size = file
            .metadata()
            .map_err(|e| err(format!("cannot stat '{}': {e}", full.display())))?
            .len();
        let length = r.length.unwrap_or(size.saturating_sub(r.offset));
        let end = r.offset.saturating_add(length);
        if end > size {
            return Err(err(format!(
                "offset {} + length {length} runs past the end of '{}' ({size} bytes); the data file is truncated or belongs to another model",
                r.offset, r.location
            )));
        }
        let mut buf = vec![0u8; length as usize];
        file.seek(SeekFrom::Start(r.offset))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| err(format!("reading '{}' failed: {e}", full.display())))?;
        t.raw_data = Some(buf);
        t.external_data.clear();
        t.data_location = None;
        Ok(())
    })
}

/// Moves the raw data of every tensor of at least `min_bytes` into one side
/// file named `data_file_name` (written by the caller from the returned bytes),
/// aligning each tensor to 64 bytes. Returns the side file's content.
pub fn spill(model: &mut ModelProto, data_file_name: &str, min_bytes: usize) -> Result<Vec<u8>> {
    const ALIGN: usize = 64;
    let mut blob = Vec::new();
    for_each_tensor_mut(model, &mut |t| {
        let Some(raw) = t.raw_data.as_ref() else {
            return Ok(());
        };
        if raw.len() < min_bytes {
            return Ok(());
        }
        let pad = (ALIGN - blob.len() % ALIGN) % ALIGN;
        blob.resize(blob.len() + pad, 0);
        let offset = blob.len();
        blob.extend_from_slice(raw);
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        };
        t.external_data = vec![
            entry("location", data_file_name.to_string()),
            entry("offset", offset.to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.raw_data = None;
        t.data_location = Some(DataLocation::External as i32);
        Ok(())
    })?;
    Ok(blob)
}
