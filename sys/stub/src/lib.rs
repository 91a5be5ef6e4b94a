//! The path of the stub AscendCL runtime this crate's build script compiles.
//! Tests point ascend-quant at it in place of the real `libascendcl.so`.

use std::path::Path;

/// Absolute path of the stub `libascendcl.so`.
pub fn library_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/libascendcl.so"))
}

/// The folder holding it (to use as an `ASCEND_HOME_PATH`-style `lib64`).
pub fn library_dir() -> &'static Path {
    Path::new(env!("OUT_DIR"))
}
