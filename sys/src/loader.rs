//! Finding and opening the AscendCL runtime libraries.
//!
//! CANN up to 8.x ships everything in `libascendcl.so`; CANN 9 splits it into
//! `libacl_rt.so` and `libacl_mdl.so` (keeping `libascendcl.so` for
//! compatibility). Every library found is opened with `RTLD_GLOBAL`, in that
//! order, and the symbols are then resolved through the process's global
//! scope, so each one comes from the first library that exports it.

use super::bindings::AscendCl;
use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use std::path::{Path, PathBuf};

/// The library file names, in resolution order.
pub const LIBRARY_NAMES: [&str; 3] = ["libascendcl.so", "libacl_rt.so", "libacl_mdl.so"];

/// The runtime, loaded.
pub struct Loaded {
    /// The function table.
    pub api: AscendCl,
    /// The library files opened, in order.
    pub libraries: Vec<PathBuf>,
    // Kept open for the life of the process: the runtime starts threads of its own.
    _handles: Vec<Library>,
}

/// Why the runtime could not be loaded.
#[derive(Debug)]
pub struct LoadError {
    /// Every place looked at, with what happened there.
    pub searched: Vec<String>,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no Ascend runtime found (searched: {}); install CANN and source its set_env.sh, or point --acl-lib / ASCEND_QUANT_ACL_LIB at libascendcl.so",
            self.searched.join("; ")
        )
    }
}

impl std::error::Error for LoadError {}

/// The folders searched, in order: `$ASCEND_HOME_PATH/lib64`,
/// `$ASCEND_TOOLKIT_HOME/lib64`, then the default CANN 8 and CANN 9 install roots.
pub fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            dirs.push(PathBuf::from(v).join("lib64"));
        }
    }
    dirs.push(PathBuf::from(
        "/usr/local/Ascend/ascend-toolkit/latest/lib64",
    ));
    dirs.push(PathBuf::from("/usr/local/Ascend/cann/lib64"));
    dirs
}

fn open(path: &Path) -> Result<Library, String> {
    // SAFETY: opening a shared library runs its initialisers; the AscendCL
    // libraries are plain C libraries whose initialisers have no preconditions.
    unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())
}

/// Loads the runtime: `explicit` (a library file, or a folder holding the
/// libraries) when given, else the first candidate folder holding any of
/// them, else the system loader's search path.
pub fn load(explicit: Option<&Path>) -> Result<Loaded, LoadError> {
    let mut searched = Vec::new();
    let mut handles = Vec::new();
    let mut libraries = Vec::new();
    let try_dir = |dir: &Path,
                   searched: &mut Vec<String>,
                   handles: &mut Vec<Library>,
                   libraries: &mut Vec<PathBuf>| {
        for name in LIBRARY_NAMES {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            match open(&path) {
                Ok(h) => {
                    handles.push(h);
                    libraries.push(path);
                }
                Err(e) => searched.push(format!("{}: {e}", path.display())),
            }
        }
        if libraries.is_empty() {
            searched.push(format!("{}: no {}", dir.display(), LIBRARY_NAMES.join("/")));
        }
    };
    match explicit {
        Some(p) if p.is_file() => match open(p) {
            Ok(h) => {
                handles.push(h);
                libraries.push(p.to_path_buf());
            }
            Err(e) => searched.push(format!("{}: {e}", p.display())),
        },
        Some(p) => try_dir(p, &mut searched, &mut handles, &mut libraries),
        None => {
            for dir in candidate_dirs() {
                try_dir(&dir, &mut searched, &mut handles, &mut libraries);
                if !libraries.is_empty() {
                    break;
                }
            }
            if libraries.is_empty() {
                for name in LIBRARY_NAMES {
                    // SAFETY: as in `open`; the system loader searches LD_LIBRARY_PATH.
                    match unsafe { Library::open(Some(name), RTLD_NOW | RTLD_GLOBAL) } {
                        Ok(h) => {
                            handles.push(h);
                            libraries.push(PathBuf::from(name));
                        }
                        Err(e) => searched.push(format!("system loader {name}: {e}")),
                    }
                }
            }
        }
    }
    if libraries.is_empty() {
        return Err(LoadError { searched });
    }
    // SAFETY: the global scope now holds the runtime's symbols; each is
    // resolved by name and cast to the signature declared in ascendcl.h.
    let api = unsafe { AscendCl::from_library(Library::this()) }.map_err(|e| LoadError {
        searched: vec![e.to_string()],
    })?;
    if api.aclInit.is_err() {
        searched.push(format!(
            "{}: no aclInit symbol",
            libraries
                .iter()
                .map(|l| l.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return Err(LoadError { searched });
    }
    Ok(Loaded {
        api,
        libraries,
        _handles: handles,
    })
}
