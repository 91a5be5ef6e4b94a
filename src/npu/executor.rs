//! The NPU backend: runs models on an Ascend device through atc and
//! AscendCL, behind the same `Executor`/`Session` traits as the CPU simulator.
//!
//! A model is compiled once per distinct input shape (atc needs fixed
//! shapes), cached under the output folder by a hash of the model bytes and
//! the shapes, loaded, and executed batch by batch; the values asked for come
//! back as graph outputs (taps are added as outputs before compiling).

use super::atc::compile;
use crate::acl::{Acl, AclFailure, Context, Device, OmModel};
use crate::onnx::{ModelProto, ValueSpec};
use crate::sim::{Executor, Session, SessionOptions, SimError, ValueRole, rewrite_for_execution};
use crate::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Runs models on NPU 0.
pub struct NpuExecutor {
    acl: Acl,
    _device: Device,
    context: Context,
    soc: String,
    cache: PathBuf,
}

fn runtime(e: impl std::fmt::Display) -> SimError {
    SimError::Run {
        reason: format!("NPU: {e}"),
    }
}

impl NpuExecutor {
    /// Opens the runtime (`acl_lib` or the standard search), device 0 and a
    /// context; compiled models are cached under `cache`.
    pub fn new(acl_lib: Option<&Path>, cache: &Path) -> Result<NpuExecutor, AclFailure> {
        let acl = Acl::load(acl_lib)?;
        if acl.device_count()? == 0 {
            return Err(AclFailure::Usage(
                "the Ascend runtime loaded but reports no device".into(),
            ));
        }
        let soc = acl
            .soc_name()
            .ok_or_else(|| AclFailure::Usage("the runtime does not report its SoC name".into()))?;
        let device = acl.device(0)?;
        let context = device.context()?;
        Ok(NpuExecutor {
            acl,
            _device: device,
            context,
            soc,
            cache: cache.to_path_buf(),
        })
    }

    /// The SoC the models are compiled for.
    pub fn soc(&self) -> &str {
        &self.soc
    }

    /// The runtime in use.
    pub fn acl(&self) -> &Acl {
        &self.acl
    }
}

impl Executor for NpuExecutor {
    fn name(&self) -> &'static str {
        "npu"
    }

    fn prepare(
        &self,
        model: &ModelProto,
        opts: &SessionOptions,
    ) -> Result<Box<dyn Session>, SimError> {
        let prepared = rewrite_for_execution(
            model,
            &SessionOptions {
                dynamic_batch: false,
                ..opts.clone()
            },
        )?;
        let graph = prepared.graph.as_ref().ok_or_else(|| SimError::Load {
            reason: "the model holds no graph".into(),
        })?;
        let inputs = crate::sim::feedable_inputs(&prepared);
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name().to_string()).collect();
        std::fs::create_dir_all(&self.cache).map_err(|e| {
            runtime(format!(
                "cannot create the model cache {}: {e}",
                self.cache.display()
            ))
        })?;
        Ok(Box::new(NpuSession {
            bytes: prepared.encode_to_vec(),
            inputs,
            user_outputs: model
                .graph
                .as_ref()
                .map(|g| g.output.iter().map(ValueSpec::from_proto).collect())
                .unwrap_or_default(),
            outputs,
            context: self.context.clone(),
            soc: self.soc.clone(),
            cache: self.cache.clone(),
            compiled: Mutex::new(HashMap::new()),
        }))
    }
}

struct NpuSession {
    bytes: Vec<u8>,
    inputs: Vec<ValueSpec>,
    user_outputs: Vec<ValueSpec>,
    outputs: Vec<String>,
    context: Context,
    soc: String,
    cache: PathBuf,
    compiled: Mutex<HashMap<String, OmModel>>,
}

impl NpuSession {
    /// The `.om` for these input shapes, compiled (or taken from the cache) and loaded.
    fn model_for(&self, atc_shape: &str) -> Result<OmModel, SimError> {
        let key = cache_key(&self.bytes, atc_shape, &self.soc);
        let om = self.cache.join(format!("{key}.om"));
        if !om.is_file() {
            compile_into_cache(&self.bytes, &self.cache, &key, &self.soc, atc_shape)?;
        }
        self.context.load_model_file(&om).map_err(runtime)
    }
}

/// The cache file stem of a compiled model: a SHA-256 over the model bytes,
/// the input shapes and the SoC, stable across Rust releases and machines.
pub fn cache_key(model: &[u8], atc_shape: &str, soc: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [model, atc_shape.as_bytes(), soc.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` where atc can read them and compiles them to
/// `cache/<key>.om` (atomically: see [`compile`]).
fn compile_into_cache(
    bytes: &[u8],
    cache: &Path,
    key: &str,
    soc: &str,
    atc_shape: &str,
) -> Result<(), SimError> {
    let work = tempfile::Builder::new()
        .prefix(".onnx-")
        .tempdir_in(cache)
        .map_err(|e| {
            runtime(format!(
                "cannot use the model cache {}: {e}",
                cache.display()
            ))
        })?;
    let onnx = work.path().join("model.onnx");
    std::fs::write(&onnx, bytes)
        .map_err(|e| runtime(format!("cannot write {}: {e}", onnx.display())))?;
    compile(&onnx, &cache.join(key), soc, Some(atc_shape)).map_err(runtime)?;
    Ok(())
}

fn to_bytes(t: &Tensor) -> Result<Vec<u8>, SimError> {
    Ok(match t {
        Tensor::F32(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Tensor::I32(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Tensor::I64(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Tensor::I8(a) => a.iter().map(|&v| v as u8).collect(),
        Tensor::U8(a) => a.iter().copied().collect(),
        other => {
            return Err(runtime(format!(
                "{} inputs are not supported on the NPU path",
                other.dtype()
            )));
        }
    })
}

fn from_bytes(bytes: &[u8], dims: &[usize], dtype: i32) -> Result<Tensor, SimError> {
    let shape = IxDyn(dims);
    let count: usize = dims.iter().product();
    let take = |w: usize| bytes.chunks_exact(w).take(count);
    let bad = |e: ndarray::ShapeError| runtime(e);
    Ok(match dtype {
        0 => Tensor::F32(
            ArrayD::from_shape_vec(
                shape,
                take(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                    .collect(),
            )
            .map_err(bad)?,
        ),
        3 => Tensor::I32(
            ArrayD::from_shape_vec(
                shape,
                take(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4")))
                    .collect(),
            )
            .map_err(bad)?,
        ),
        9 => Tensor::I64(
            ArrayD::from_shape_vec(
                shape,
                take(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
                    .collect(),
            )
            .map_err(bad)?,
        ),
        2 => Tensor::I8(
            ArrayD::from_shape_vec(shape, take(1).map(|c| c[0] as i8).collect()).map_err(bad)?,
        ),
        4 => {
            Tensor::U8(ArrayD::from_shape_vec(shape, take(1).map(|c| c[0]).collect()).map_err(bad)?)
        }
        other => {
            return Err(runtime(format!(
                "output data type {other} is not supported"
            )));
        }
    })
}

impl Session for NpuSession {
    fn inputs(&self) -> &[ValueSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[ValueSpec] {
        &self.user_outputs
    }

    fn run(&self, feeds: &[(&str, &Tensor)], fetch: &[&str]) -> Result<Vec<Tensor>, SimError> {
        let ordered: Vec<&Tensor> = self
            .inputs
            .iter()
            .map(|spec| {
                feeds
                    .iter()
                    .find(|(n, _)| *n == spec.name)
                    .map(|(_, t)| *t)
                    .ok_or_else(|| SimError::UnknownValue {
                        name: spec.name.clone(),
                        role: ValueRole::Input,
                        hint: "the NPU path runs from the graph inputs only".into(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let atc_shape = self
            .inputs
            .iter()
            .zip(&ordered)
            .map(|(spec, t)| {
                format!(
                    "{}:{}",
                    spec.name,
                    t.shape()
                        .iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            })
            .collect::<Vec<_>>()
            .join(";");
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if !compiled.contains_key(&atc_shape) {
            let m = self.model_for(&atc_shape)?;
            compiled.insert(atc_shape.clone(), m);
        }
        let model = compiled.get_mut(&atc_shape).expect("just inserted");
        let mut in_bufs = Vec::new();
        for t in &ordered {
            let bytes = to_bytes(t)?;
            let mut b = self.context.alloc(bytes.len()).map_err(runtime)?;
            b.copy_from_host(&bytes).map_err(runtime)?;
            in_bufs.push(b);
        }
        let mut out_bufs = model
            .outputs()
            .iter()
            .map(|o| self.context.alloc(o.size))
            .collect::<Result<Vec<_>, _>>()
            .map_err(runtime)?;
        model
            .execute(
                &in_bufs.iter().collect::<Vec<_>>(),
                &mut out_bufs.iter_mut().collect::<Vec<_>>(),
            )
            .map_err(runtime)?;
        fetch
            .iter()
            .map(|name| {
                // A graph input asked for (a tap on the model's input) is what was fed.
                if let Some((_, t)) = feeds.iter().find(|(n, _)| n == name) {
                    return Ok((*t).clone());
                }
                let k = self.outputs.iter().position(|o| o == name).ok_or_else(|| {
                    SimError::UnknownValue {
                        name: name.to_string(),
                        role: ValueRole::Output,
                        hint: format!(
                            "the compiled model's outputs are: {}",
                            self.outputs.join(", ")
                        ),
                    }
                })?;
                let desc = model.outputs().get(k).ok_or_else(|| {
                    runtime(format!(
                        "the .om has fewer outputs than the ONNX model ({} > {})",
                        k + 1,
                        model.outputs().len()
                    ))
                })?;
                let mut bytes = vec![0u8; desc.size];
                out_bufs[k].copy_to_host(&mut bytes).map_err(runtime)?;
                let dims: Vec<usize> = desc.dims.iter().map(|&d| d.max(0) as usize).collect();
                from_bytes(&bytes, &dims, desc.dtype)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::cache_key;

    #[test]
    fn cache_key_is_a_length_prefixed_sha256() {
        // Worked out with Python's hashlib over the same length-prefixed parts.
        assert_eq!(
            cache_key(b"model-bytes", "x:1,3,8,8", "Ascend310P3"),
            "4af35cb5cebe2fb22931217e888c9557f0471750120616b3c76c6f489dad7235"
        );
        // The prefixes keep part boundaries apart.
        assert_ne!(cache_key(b"ab", "c", "d"), cache_key(b"a", "bc", "d"));
    }
}
