//! Owning, safe types over the AscendCL runtime. Every handle frees itself in
//! `Drop`, and ownership encodes the order the runtime requires: a stream,
//! buffer or model keeps its context alive, a context keeps its device set,
//! and the device keeps the runtime initialised — so teardown always runs
//! stream → context → device reset → finalize.

use super::error::AclError;
use super::result::{context, dataset, device, init, memory, model, stream};
use ascendcl_sys as sys;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// The runtime could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AclLoadError(pub String);

/// Either failure of the wrapper.
#[derive(Debug, thiserror::Error)]
pub enum AclFailure {
    /// No usable runtime.
    #[error(transparent)]
    Load(#[from] AclLoadError),
    /// A call failed.
    #[error(transparent)]
    Call(#[from] AclError),
    /// The caller's request does not fit the model or buffer.
    #[error("{0}")]
    Usage(String),
    /// A buffer given to [`OmModel::execute`] is smaller than the model's tensor.
    #[error(
        "{role} {index} of the model needs {needed} bytes but its device buffer holds {got}; allocate it with the size the model description gives"
    )]
    BufferTooSmall {
        /// "input" or "output".
        role: IoRole,
        /// Position among the model's inputs or outputs.
        index: usize,
        /// Bytes the model reads or writes.
        needed: usize,
        /// Bytes the buffer holds.
        got: usize,
    },
    /// A buffer given to [`OmModel::execute`] belongs to another context.
    #[error(
        "{role} {index}: the device buffer was allocated in another context than the model's; allocate it from the model's context"
    )]
    ForeignBuffer {
        /// "input" or "output".
        role: IoRole,
        /// Position among the model's inputs or outputs.
        index: usize,
    },
    /// The model's description gives no size for a tensor (dynamic shape), so
    /// the safe [`OmModel::execute`] cannot bound what the device writes.
    #[error(
        "{role} {index} ('{name}') of the model has a dynamic size; compile the model with fixed shapes, or use the unsafe OmModel::execute_unchecked"
    )]
    UnknownSize {
        /// "input" or "output".
        role: IoRole,
        /// Position among the model's inputs or outputs.
        index: usize,
        /// The tensor's name.
        name: String,
    },
}

/// Whether a model tensor is read (input) or written (output) by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoRole {
    /// Read by the model.
    Input,
    /// Written by the model.
    Output,
}

impl std::fmt::Display for IoRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoRole::Input => "input",
            IoRole::Output => "output",
        })
    }
}

/// The loaded library: set by the first successful load only, so a failed
/// load (a wrong `--acl-lib`) can be retried with another location.
static LIBRARY: OnceLock<sys::Loaded> = OnceLock::new();
static LIVE: Mutex<Weak<Runtime>> = Mutex::new(Weak::new());

struct Runtime {
    api: &'static sys::AscendCl,
    libraries: Vec<PathBuf>,
    finalized: Mutex<bool>,
}

impl Runtime {
    fn finalize(&self) -> Result<(), AclError> {
        let mut done = self.finalized.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return Ok(());
        }
        *done = true;
        // SAFETY: the last user is going away; every handle holds a reference to this runtime, so none is left.
        unsafe { init::finalize(self.api) }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.finalize();
    }
}

/// The initialised AscendCL runtime, shared by everything created from it;
/// `aclFinalize` runs when the last user is dropped (or at [`Acl::finalize`]).
#[derive(Clone)]
pub struct Acl {
    runtime: Arc<Runtime>,
}

/// The folder or file to load the runtime from: `explicit`, else
/// `ASCEND_QUANT_ACL_LIB`, else the standard search.
pub fn library_hint(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("ASCEND_QUANT_ACL_LIB")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

impl Acl {
    /// Loads the runtime and initialises it; reuses the live runtime when
    /// there is one. The first successful load is kept for the process (a
    /// process uses one runtime); a failed one is not remembered, so a later
    /// call with another location tries again.
    pub fn load(explicit: Option<&Path>) -> Result<Acl, AclFailure> {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(runtime) = live.upgrade() {
            return Ok(Acl { runtime });
        }
        // The LIVE lock is held, so no other thread loads at the same time.
        let loaded = match LIBRARY.get() {
            Some(loaded) => loaded,
            None => {
                let fresh = sys::load(library_hint(explicit).as_deref())
                    .map_err(|e| AclLoadError(e.to_string()))?;
                LIBRARY.get_or_init(|| fresh)
            }
        };
        // SAFETY: aclInit has no preconditions; repeated initialisation is reported and accepted.
        unsafe { init::init(&loaded.api) }?;
        let runtime = Arc::new(Runtime {
            api: &loaded.api,
            libraries: loaded.libraries.clone(),
            finalized: Mutex::new(false),
        });
        *live = Arc::downgrade(&runtime);
        Ok(Acl { runtime })
    }

    fn api(&self) -> &'static sys::AscendCl {
        self.runtime.api
    }

    /// The library files in use.
    pub fn libraries(&self) -> &[PathBuf] {
        &self.runtime.libraries
    }

    /// Number of NPUs.
    pub fn device_count(&self) -> Result<u32, AclError> {
        // SAFETY: the runtime is initialised.
        unsafe { device::count(self.api()) }
    }

    /// The runtime's (major, minor, patch) API version.
    pub fn version(&self) -> Result<(i32, i32, i32), AclError> {
        // SAFETY: the runtime is initialised.
        unsafe { init::version(self.api()) }
    }

    /// The SoC name (for `atc --soc_version`), if the runtime reports it.
    pub fn soc_name(&self) -> Option<String> {
        // SAFETY: the runtime is initialised.
        unsafe { init::soc_name(self.api()) }
    }

    /// Claims device `id` for this process.
    pub fn device(&self, id: i32) -> Result<Device, AclError> {
        // SAFETY: the runtime is initialised; the matching reset runs in DeviceInner::drop.
        unsafe { device::set(self.api(), id) }?;
        Ok(Device {
            inner: Arc::new(DeviceInner {
                acl: self.clone(),
                id,
            }),
        })
    }

    /// Finalizes now, returning what `aclFinalize` reports (e.g. resources the
    /// runtime still counts as alive). Fails without finalizing while other
    /// handles (devices, contexts, buffers, models) still use the runtime.
    pub fn finalize(self) -> Result<(), AclFailure> {
        match Arc::try_unwrap(self.runtime) {
            Ok(runtime) => Ok(runtime.finalize()?),
            Err(shared) => Err(AclFailure::Usage(format!(
                "the runtime is still in use by {} other handle(s); drop them before finalizing",
                Arc::strong_count(&shared) - 1
            ))),
        }
    }
}

struct DeviceInner {
    acl: Acl,
    id: i32,
}

impl Drop for DeviceInner {
    fn drop(&mut self) {
        // SAFETY: every context of this device holds this inner, so all are destroyed by now.
        let _ = unsafe { device::reset(self.acl.api(), self.id) };
    }
}

/// A device set for this process; reset when the last user drops it.
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

impl Device {
    /// The device id.
    pub fn id(&self) -> i32 {
        self.inner.id
    }

    /// (free, total) bytes of device memory.
    pub fn memory(&self) -> Result<(usize, usize), AclError> {
        let ctx = self.context()?;
        ctx.bind()?;
        // SAFETY: a context of this device is current.
        unsafe { device::memory(self.inner.acl.api()) }
    }

    /// A new context on this device (current on the calling thread).
    pub fn context(&self) -> Result<Context, AclError> {
        // SAFETY: the device is set; the context is destroyed in ContextInner::drop before the device resets.
        let raw = unsafe { context::create(self.inner.acl.api(), self.inner.id) }?;
        Ok(Context {
            inner: Arc::new(ContextInner {
                device: self.clone(),
                raw,
            }),
        })
    }
}

struct ContextInner {
    device: Device,
    raw: sys::aclrtContext,
}

// SAFETY: an AscendCL context may be made current on any thread (aclrtSetCurrentContext);
// every use below binds it first.
unsafe impl Send for ContextInner {}
// SAFETY: as above; the handle itself is never mutated.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: streams, buffers and models of this context hold this inner, so they are gone.
        let _ = unsafe { context::destroy(self.device.inner.acl.api(), self.raw) };
    }
}

/// An AscendCL context; streams, buffers and models are created in it.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

impl Context {
    fn api(&self) -> &'static sys::AscendCl {
        self.inner.device.inner.acl.api()
    }

    /// Makes this context current on the calling thread.
    pub fn bind(&self) -> Result<(), AclError> {
        // SAFETY: the context is alive.
        unsafe { context::set_current(self.api(), self.inner.raw) }
    }

    /// A new stream.
    pub fn stream(&self) -> Result<Stream, AclError> {
        self.bind()?;
        // SAFETY: this context is current; the stream is destroyed before the context.
        let raw = unsafe { stream::create(self.api()) }?;
        Ok(Stream {
            ctx: self.clone(),
            raw,
        })
    }

    /// `size` bytes of device memory.
    pub fn alloc(&self, size: usize) -> Result<DeviceBuffer, AclError> {
        self.bind()?;
        // SAFETY: this context is current; freed in DeviceBuffer::drop.
        let ptr = unsafe { memory::malloc(self.api(), size.max(1)) }?;
        Ok(DeviceBuffer {
            ctx: self.clone(),
            ptr,
            size,
        })
    }

    /// Loads an offline model from its bytes.
    pub fn load_model(&self, bytes: &[u8]) -> Result<OmModel, AclError> {
        self.bind()?;
        // SAFETY: this context is current; unloaded under it in OmModel::drop.
        let id = unsafe { model::load_from_mem(self.api(), bytes) }?;
        let mut m = OmModel {
            ctx: self.clone(),
            id,
            desc: std::ptr::null_mut(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
        // SAFETY: the model is loaded in the current context.
        m.desc = unsafe { model::describe(self.api(), id) }?;
        // SAFETY: the description is alive.
        let (n_in, n_out) = unsafe { model::io_counts(self.api(), m.desc) }?;
        for (output, n) in [(false, n_in), (true, n_out)] {
            for i in 0..n {
                // SAFETY: i is below the count the description reports.
                let (name, dims, dtype, size) =
                    unsafe { model::io(self.api(), m.desc, output, i) }?;
                let io = IoDesc {
                    name,
                    dims,
                    dtype,
                    size,
                };
                if output {
                    m.outputs.push(io)
                } else {
                    m.inputs.push(io)
                }
            }
        }
        Ok(m)
    }

    /// Loads an offline model file.
    pub fn load_model_file(&self, path: &Path) -> Result<OmModel, AclFailure> {
        let bytes = std::fs::read(path)
            .map_err(|e| AclFailure::Usage(format!("cannot read {}: {e}", path.display())))?;
        Ok(self.load_model(&bytes)?)
    }
}

/// A stream of the context it was created in.
pub struct Stream {
    ctx: Context,
    raw: sys::aclrtStream,
}

// SAFETY: stream handles are plain identifiers usable from any thread with the context bound.
unsafe impl Send for Stream {}

impl Stream {
    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<(), AclError> {
        self.ctx.bind()?;
        // SAFETY: the stream is alive and its context current.
        unsafe { stream::synchronize(self.ctx.api(), self.raw) }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: idle streams only are destroyed; synchronize first.
            let _ = unsafe { stream::synchronize(self.ctx.api(), self.raw) };
            let _ = unsafe { stream::destroy(self.ctx.api(), self.raw) };
        }
    }
}

/// Device memory owned by this value.
pub struct DeviceBuffer {
    ctx: Context,
    ptr: *mut std::ffi::c_void,
    size: usize,
}

// SAFETY: device memory may be used from any thread that binds the owning context.
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether the buffer holds no byte.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Copies `src` to the start of the buffer.
    pub fn copy_from_host(&mut self, src: &[u8]) -> Result<(), AclFailure> {
        if src.len() > self.size {
            return Err(AclFailure::Usage(format!(
                "{} bytes do not fit a device buffer of {}",
                src.len(),
                self.size
            )));
        }
        self.ctx.bind()?;
        // SAFETY: the destination holds `size` bytes and the source `src.len()` <= size.
        unsafe {
            memory::memcpy(
                self.ctx.api(),
                self.ptr,
                self.size,
                src.as_ptr().cast(),
                src.len(),
                sys::ACL_MEMCPY_HOST_TO_DEVICE,
            )
        }?;
        Ok(())
    }

    /// Copies the start of the buffer into `dst`.
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<(), AclFailure> {
        if dst.len() > self.size {
            return Err(AclFailure::Usage(format!(
                "cannot read {} bytes from a device buffer of {}",
                dst.len(),
                self.size
            )));
        }
        self.ctx.bind()?;
        // SAFETY: `dst` holds dst.len() bytes, all of which the buffer has.
        unsafe {
            memory::memcpy(
                self.ctx.api(),
                dst.as_mut_ptr().cast(),
                dst.len(),
                self.ptr,
                dst.len(),
                sys::ACL_MEMCPY_DEVICE_TO_HOST,
            )
        }?;
        Ok(())
    }

    /// Copies float32 values to the device.
    pub fn write_f32(&mut self, values: &[f32]) -> Result<(), AclFailure> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.copy_from_host(&bytes)
    }

    /// Reads `n` float32 values from the device.
    pub fn read_f32(&self, n: usize) -> Result<Vec<f32>, AclFailure> {
        let mut bytes = vec![0u8; n * 4];
        self.copy_to_host(&mut bytes)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: allocated by aclrtMalloc in this context and not freed before.
            let _ = unsafe { memory::free(self.ctx.api(), self.ptr) };
        }
    }
}

/// A model input or output as its description gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoDesc {
    /// Tensor name.
    pub name: String,
    /// Dimensions (-1 for dynamic ones).
    pub dims: Vec<i64>,
    /// `aclDataType` value.
    pub dtype: i32,
    /// Size in bytes.
    pub size: usize,
}

/// A dataset of buffer wrappers, destroyed wrappers first.
struct Dataset {
    api: &'static sys::AscendCl,
    raw: *mut sys::aclmdlDataset,
    buffers: Vec<*mut sys::aclDataBuffer>,
}

impl Dataset {
    fn over(api: &'static sys::AscendCl, buffers: &[&DeviceBuffer]) -> Result<Dataset, AclError> {
        // SAFETY: freed in Drop.
        let raw = unsafe { dataset::create(api) }?;
        let mut d = Dataset {
            api,
            raw,
            buffers: Vec::new(),
        };
        for b in buffers {
            // SAFETY: the wrapped memory outlives the dataset (borrowed for its whole life).
            let wrapper = unsafe { dataset::create_buffer(api, b.ptr, b.size) }?;
            d.buffers.push(wrapper);
            // SAFETY: both handles are alive.
            unsafe { dataset::add(api, d.raw, wrapper) }?;
        }
        Ok(d)
    }
}

impl Drop for Dataset {
    fn drop(&mut self) {
        for b in self.buffers.drain(..) {
            // SAFETY: created by aclCreateDataBuffer above; the memory is not freed with it.
            let _ = unsafe { dataset::destroy_buffer(self.api, b) };
        }
        // SAFETY: created by aclmdlCreateDataset above.
        let _ = unsafe { dataset::destroy(self.api, self.raw) };
    }
}

/// A loaded offline model; `Send` but not `Sync`: one execution at a time.
pub struct OmModel {
    ctx: Context,
    id: u32,
    desc: *mut sys::aclmdlDesc,
    inputs: Vec<IoDesc>,
    outputs: Vec<IoDesc>,
}

// SAFETY: the model is used under its own context, bound on the calling thread before each call.
unsafe impl Send for OmModel {}

impl OmModel {
    /// The inputs.
    pub fn inputs(&self) -> &[IoDesc] {
        &self.inputs
    }

    /// The outputs.
    pub fn outputs(&self) -> &[IoDesc] {
        &self.outputs
    }

    /// Runs the model synchronously: reads `inputs`, writes `outputs` (one
    /// buffer per model input and output, in the description's order).
    ///
    /// Sound by checking: every buffer must belong to the model's context and
    /// hold at least the bytes the description gives for its tensor, so the
    /// device never reads or writes past a buffer. Models with dynamic
    /// tensor sizes are refused ([`AclFailure::UnknownSize`]); see
    /// [`OmModel::execute_unchecked`].
    pub fn execute(
        &mut self,
        inputs: &[&DeviceBuffer],
        outputs: &mut [&mut DeviceBuffer],
    ) -> Result<(), AclFailure> {
        self.check_counts(inputs.len(), outputs.len())?;
        let outs: Vec<&DeviceBuffer> = outputs.iter().map(|b| &**b).collect();
        for (role, descs, bufs) in [
            (IoRole::Input, &self.inputs, inputs),
            (IoRole::Output, &self.outputs, outs.as_slice()),
        ] {
            for (index, (desc, buf)) in descs.iter().zip(bufs).enumerate() {
                if !Arc::ptr_eq(&buf.ctx.inner, &self.ctx.inner) {
                    return Err(AclFailure::ForeignBuffer { role, index });
                }
                if desc.size == 0 {
                    return Err(AclFailure::UnknownSize {
                        role,
                        index,
                        name: desc.name.clone(),
                    });
                }
                if buf.size < desc.size {
                    return Err(AclFailure::BufferTooSmall {
                        role,
                        index,
                        needed: desc.size,
                        got: buf.size,
                    });
                }
            }
        }
        // SAFETY: every buffer is of this model's context and at least as large
        // as the tensor the model reads or writes there; outputs are borrowed
        // mutably, so nothing else reads them while the device writes.
        unsafe { self.run(inputs, &outs) }
    }

    /// Runs the model without checking the buffers against its description
    /// (for models compiled with dynamic shapes, whose sizes the description
    /// cannot give).
    ///
    /// # Safety
    /// Every buffer must belong to this model's context, each input must hold
    /// all the bytes the model reads for the shape it is run with, and each
    /// output all the bytes the device writes; no output may be read or
    /// written by anyone else during the call.
    pub unsafe fn execute_unchecked(
        &mut self,
        inputs: &[&DeviceBuffer],
        outputs: &mut [&mut DeviceBuffer],
    ) -> Result<(), AclFailure> {
        self.check_counts(inputs.len(), outputs.len())?;
        let outs: Vec<&DeviceBuffer> = outputs.iter().map(|b| &**b).collect();
        // SAFETY: the caller upholds the contract above.
        unsafe { self.run(inputs, &outs) }
    }

    fn check_counts(&self, inputs: usize, outputs: usize) -> Result<(), AclFailure> {
        if inputs != self.inputs.len() || outputs != self.outputs.len() {
            return Err(AclFailure::Usage(format!(
                "the model takes {} inputs and {} outputs, got {inputs} and {outputs}",
                self.inputs.len(),
                self.outputs.len(),
            )));
        }
        Ok(())
    }

    /// # Safety
    /// As [`OmModel::execute_unchecked`].
    unsafe fn run(
        &mut self,
        inputs: &[&DeviceBuffer],
        outputs: &[&DeviceBuffer],
    ) -> Result<(), AclFailure> {
        self.ctx.bind()?;
        let api = self.ctx.api();
        let input = Dataset::over(api, inputs)?;
        let output = Dataset::over(api, outputs)?;
        // SAFETY: the datasets wrap live device buffers that the caller vouched
        // for; the model's context is current.
        unsafe { model::execute(api, self.id, input.raw, output.raw) }?;
        Ok(())
    }
}

impl Drop for OmModel {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            let api = self.ctx.api();
            if !self.desc.is_null() {
                // SAFETY: created by aclmdlCreateDesc for this model.
                let _ = unsafe { model::destroy_desc(api, self.desc) };
            }
            // SAFETY: loaded under this (current) context.
            let _ = unsafe { model::unload(api, self.id) };
        }
    }
}
