//! One thin function per AscendCL call, grouped by the object it acts on.
//! Each turns the `aclError` into a `Result`, fetching the runtime's message
//! on failure; pointers are passed through unchanged.
//!
//! # Safety
//!
//! Every function here is `unsafe`: the caller guarantees the handles are
//! live and belong to the current context, as the AscendCL rules require
//! (see the safe types in `acl::safe`, which uphold this).

use super::error::{AclError, error_name};
use ascendcl_sys as sys;
use std::ffi::{CStr, c_void};

/// Calls a symbol of the table, or fails when the runtime does not export it.
macro_rules! call {
    ($api:expr, $name:ident ( $($arg:expr),* )) => {{
        match $api.$name.as_ref() {
            Ok(f) => f($($arg),*),
            Err(_) => return Err(missing(stringify!($name))),
        }
    }};
}

fn missing(function: &'static str) -> AclError {
    AclError {
        code: -1,
        name: "symbol missing",
        function,
        message: Some("the loaded runtime does not export this function".into()),
    }
}

/// `aclGetRecentErrMsg()` as an owned string.
pub fn recent_message(api: &sys::AscendCl) -> Option<String> {
    let f = api.aclGetRecentErrMsg.as_ref().ok()?;
    // SAFETY: the runtime returns NULL or a NUL-terminated string it owns, valid until the next call on this thread.
    let p = unsafe { f() };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated, as above.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Turns a return code into a `Result`.
pub fn check(api: &sys::AscendCl, code: i32, function: &'static str) -> Result<(), AclError> {
    if code == 0 {
        return Ok(());
    }
    Err(AclError {
        code,
        name: error_name(code),
        function,
        message: recent_message(api),
    })
}

/// Process-wide initialisation and version queries.
pub mod init {
    use super::*;

    /// `aclInit(NULL)`; a repeated initialisation counts as success.
    ///
    /// # Safety
    ///
    /// No precondition beyond a loaded runtime; call it before any other function.
    pub unsafe fn init(api: &sys::AscendCl) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclInit(std::ptr::null())) };
        if code == sys::ACL_ERROR_REPEAT_INITIALIZE as i32 {
            return Ok(());
        }
        check(api, code, "aclInit")
    }

    /// `aclFinalize()`.
    ///
    /// # Safety
    ///
    /// Every handle created through the runtime must be released first; nothing may be called afterwards.
    pub unsafe fn finalize(api: &sys::AscendCl) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclFinalize()) };
        check(api, code, "aclFinalize")
    }

    /// `aclrtGetVersion`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn version(api: &sys::AscendCl) -> Result<(i32, i32, i32), AclError> {
        let (mut a, mut b, mut c) = (0, 0, 0);
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtGetVersion(&mut a, &mut b, &mut c)) };
        check(api, code, "aclrtGetVersion")?;
        Ok((a, b, c))
    }

    /// `aclrtGetSocName`, when the runtime has it.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn soc_name(api: &sys::AscendCl) -> Option<String> {
        let f = api.aclrtGetSocName.as_ref().ok()?;
        // SAFETY: returns NULL or a static NUL-terminated string.
        let p = unsafe { f() };
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// Devices.
pub mod device {
    use super::*;

    /// `aclrtGetDeviceCount`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn count(api: &sys::AscendCl) -> Result<u32, AclError> {
        let mut n = 0u32;
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtGetDeviceCount(&mut n)) };
        check(api, code, "aclrtGetDeviceCount").map(|_| n)
    }

    /// `aclrtSetDevice`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn set(api: &sys::AscendCl, id: i32) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtSetDevice(id)) };
        check(api, code, "aclrtSetDevice")
    }

    /// `aclrtResetDevice`.
    ///
    /// # Safety
    ///
    /// Every context of the device must be destroyed first.
    pub unsafe fn reset(api: &sys::AscendCl, id: i32) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtResetDevice(id)) };
        check(api, code, "aclrtResetDevice")
    }

    /// `aclrtGetMemInfo(ACL_HBM_MEM)`: (free, total) bytes.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn memory(api: &sys::AscendCl) -> Result<(usize, usize), AclError> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe {
            call!(
                api,
                aclrtGetMemInfo(sys::ACL_HBM_MEM, &mut free, &mut total)
            )
        };
        check(api, code, "aclrtGetMemInfo").map(|_| (free, total))
    }
}

/// Contexts.
pub mod context {
    use super::*;

    /// `aclrtCreateContext` (the new context becomes current on this thread).
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn create(api: &sys::AscendCl, device: i32) -> Result<sys::aclrtContext, AclError> {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtCreateContext(&mut ctx, device)) };
        check(api, code, "aclrtCreateContext").map(|_| ctx)
    }

    /// `aclrtDestroyContext`.
    ///
    /// # Safety
    ///
    /// The handle must be live, idle and not used again.
    pub unsafe fn destroy(api: &sys::AscendCl, ctx: sys::aclrtContext) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtDestroyContext(ctx)) };
        check(api, code, "aclrtDestroyContext")
    }

    /// `aclrtSetCurrentContext`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn set_current(api: &sys::AscendCl, ctx: sys::aclrtContext) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtSetCurrentContext(ctx)) };
        check(api, code, "aclrtSetCurrentContext")
    }
}

/// Streams.
pub mod stream {
    use super::*;

    /// `aclrtCreateStream` in the current context.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn create(api: &sys::AscendCl) -> Result<sys::aclrtStream, AclError> {
        let mut s = std::ptr::null_mut();
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtCreateStream(&mut s)) };
        check(api, code, "aclrtCreateStream").map(|_| s)
    }

    /// `aclrtDestroyStream`.
    ///
    /// # Safety
    ///
    /// The handle must be live, idle and not used again.
    pub unsafe fn destroy(api: &sys::AscendCl, s: sys::aclrtStream) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtDestroyStream(s)) };
        check(api, code, "aclrtDestroyStream")
    }

    /// `aclrtSynchronizeStream`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn synchronize(api: &sys::AscendCl, s: sys::aclrtStream) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtSynchronizeStream(s)) };
        check(api, code, "aclrtSynchronizeStream")
    }
}

/// Device memory.
pub mod memory {
    use super::*;

    /// `aclrtMalloc(…, ACL_MEM_MALLOC_HUGE_FIRST)`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn malloc(api: &sys::AscendCl, size: usize) -> Result<*mut c_void, AclError> {
        let mut p = std::ptr::null_mut();
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe {
            call!(
                api,
                aclrtMalloc(&mut p, size, sys::ACL_MEM_MALLOC_HUGE_FIRST)
            )
        };
        check(api, code, "aclrtMalloc").map(|_| p)
    }

    /// `aclrtFree`.
    ///
    /// # Safety
    ///
    /// `p` must come from `aclrtMalloc` and not be freed already.
    pub unsafe fn free(api: &sys::AscendCl, p: *mut c_void) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtFree(p)) };
        check(api, code, "aclrtFree")
    }

    /// `aclrtMemcpy` of `count` bytes into a destination of `dest_max` bytes.
    ///
    /// # Safety
    ///
    /// `dst` must hold `dest_max` bytes and `src` `count` bytes, on the sides `kind` names.
    pub unsafe fn memcpy(
        api: &sys::AscendCl,
        dst: *mut c_void,
        dest_max: usize,
        src: *const c_void,
        count: usize,
        kind: sys::aclrtMemcpyKind,
    ) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclrtMemcpy(dst, dest_max, src, count, kind)) };
        check(api, code, "aclrtMemcpy")
    }
}

/// Data buffers and datasets.
pub mod dataset {
    use super::*;

    /// `aclCreateDataBuffer` (wraps memory it does not own).
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn create_buffer(
        api: &sys::AscendCl,
        data: *mut c_void,
        size: usize,
    ) -> Result<*mut sys::aclDataBuffer, AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let b = unsafe { call!(api, aclCreateDataBuffer(data, size)) };
        if b.is_null() {
            return Err(AclError {
                code: -1,
                name: "null handle",
                function: "aclCreateDataBuffer",
                message: recent_message(api),
            });
        }
        Ok(b)
    }

    /// `aclDestroyDataBuffer`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn destroy_buffer(
        api: &sys::AscendCl,
        b: *mut sys::aclDataBuffer,
    ) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclDestroyDataBuffer(b)) };
        check(api, code, "aclDestroyDataBuffer")
    }

    /// `aclmdlCreateDataset`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn create(api: &sys::AscendCl) -> Result<*mut sys::aclmdlDataset, AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let d = unsafe { call!(api, aclmdlCreateDataset()) };
        if d.is_null() {
            return Err(AclError {
                code: -1,
                name: "null handle",
                function: "aclmdlCreateDataset",
                message: recent_message(api),
            });
        }
        Ok(d)
    }

    /// `aclmdlDestroyDataset`.
    ///
    /// # Safety
    ///
    /// The handle must be live, idle and not used again.
    pub unsafe fn destroy(api: &sys::AscendCl, d: *mut sys::aclmdlDataset) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclmdlDestroyDataset(d)) };
        check(api, code, "aclmdlDestroyDataset")
    }

    /// `aclmdlAddDatasetBuffer`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn add(
        api: &sys::AscendCl,
        d: *mut sys::aclmdlDataset,
        b: *mut sys::aclDataBuffer,
    ) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclmdlAddDatasetBuffer(d, b)) };
        check(api, code, "aclmdlAddDatasetBuffer")
    }
}

/// Offline models and their descriptions.
pub mod model {
    use super::*;

    /// `aclmdlLoadFromMem`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn load_from_mem(api: &sys::AscendCl, bytes: &[u8]) -> Result<u32, AclError> {
        let mut id = 0u32;
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe {
            call!(
                api,
                aclmdlLoadFromMem(bytes.as_ptr().cast(), bytes.len(), &mut id)
            )
        };
        check(api, code, "aclmdlLoadFromMem").map(|_| id)
    }

    /// `aclmdlUnload` (under the context that loaded the model).
    ///
    /// # Safety
    ///
    /// Must run under the context that loaded the model, with no execution in flight.
    pub unsafe fn unload(api: &sys::AscendCl, id: u32) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclmdlUnload(id)) };
        check(api, code, "aclmdlUnload")
    }

    /// `aclmdlExecute`.
    ///
    /// # Safety
    ///
    /// The datasets must wrap live device buffers large enough for the model's inputs and outputs, under the model's context.
    pub unsafe fn execute(
        api: &sys::AscendCl,
        id: u32,
        input: *const sys::aclmdlDataset,
        output: *mut sys::aclmdlDataset,
    ) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclmdlExecute(id, input, output)) };
        check(api, code, "aclmdlExecute")
    }

    /// `aclmdlCreateDesc` + `aclmdlGetDesc`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn describe(api: &sys::AscendCl, id: u32) -> Result<*mut sys::aclmdlDesc, AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let d = unsafe { call!(api, aclmdlCreateDesc()) };
        if d.is_null() {
            return Err(AclError {
                code: -1,
                name: "null handle",
                function: "aclmdlCreateDesc",
                message: recent_message(api),
            });
        }
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclmdlGetDesc(d, id)) };
        if let Err(e) = check(api, code, "aclmdlGetDesc") {
            // SAFETY: the caller upholds this function's contract (its # Safety section).
            let _ = unsafe { destroy_desc(api, d) };
            return Err(e);
        }
        Ok(d)
    }

    /// `aclmdlDestroyDesc`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn destroy_desc(
        api: &sys::AscendCl,
        d: *mut sys::aclmdlDesc,
    ) -> Result<(), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let code = unsafe { call!(api, aclmdlDestroyDesc(d)) };
        check(api, code, "aclmdlDestroyDesc")
    }

    /// Description of input (`output == false`) or output `index`: name, dims, data type, bytes.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn io(
        api: &sys::AscendCl,
        d: *mut sys::aclmdlDesc,
        output: bool,
        index: usize,
    ) -> Result<(String, Vec<i64>, i32, usize), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let mut dims: sys::aclmdlIODims = unsafe { std::mem::zeroed() };
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        let (code, name, dtype, size) = unsafe {
            if output {
                (
                    call!(api, aclmdlGetOutputDims(d, index, &mut dims)),
                    call!(api, aclmdlGetOutputNameByIndex(d, index)),
                    call!(api, aclmdlGetOutputDataType(d, index)),
                    call!(api, aclmdlGetOutputSizeByIndex(d, index)),
                )
            } else {
                (
                    call!(api, aclmdlGetInputDims(d, index, &mut dims)),
                    call!(api, aclmdlGetInputNameByIndex(d, index)),
                    call!(api, aclmdlGetInputDataType(d, index)),
                    call!(api, aclmdlGetInputSizeByIndex(d, index)),
                )
            }
        };
        check(
            api,
            code,
            if output {
                "aclmdlGetOutputDims"
            } else {
                "aclmdlGetInputDims"
            },
        )?;
        let name = if name.is_null() {
            String::new()
        } else {
            // SAFETY: the caller upholds this function's contract (its # Safety section).
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        };
        let n = dims.dimCount.min(dims.dims.len());
        Ok((name, dims.dims[..n].to_vec(), dtype, size))
    }

    /// `aclmdlGetNumInputs` and `aclmdlGetNumOutputs`.
    ///
    /// # Safety
    ///
    /// The runtime must be initialised, and every handle passed must be live and belong to the context current on this thread.
    pub unsafe fn io_counts(
        api: &sys::AscendCl,
        d: *mut sys::aclmdlDesc,
    ) -> Result<(usize, usize), AclError> {
        // SAFETY: the caller upholds this function's contract (its # Safety section).
        Ok(unsafe {
            (
                call!(api, aclmdlGetNumInputs(d)),
                call!(api, aclmdlGetNumOutputs(d)),
            )
        })
    }
}
