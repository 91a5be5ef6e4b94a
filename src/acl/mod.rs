//! A safe AscendCL wrapper in three layers: `ascendcl-sys` (raw bindings,
//! loaded at run time), [`result`] (one checked function per C call) and
//! [`safe`] (owning types whose `Drop` frees in the runtime's order).

pub mod error;
pub mod result;
pub mod safe;

pub use error::{AclError, error_name};
pub use safe::{
    Acl, AclFailure, AclLoadError, Context, Device, DeviceBuffer, IoDesc, IoRole, OmModel, Stream,
    library_hint,
};
