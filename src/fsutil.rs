//! File-system helpers shared by every writer: atomic replacement of one
//! file, and [`Staging`], which makes a set of output files appear all
//! together or not at all.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tempfile::{NamedTempFile, TempDir};

/// Writes `bytes` to `path` atomically: into a temporary file in the same
/// folder, flushed to disk, then renamed over `path`. A failure at any point
/// leaves `path` as it was and no temporary file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// Like [`write_atomic`], but lets `fill` stream the content into the file.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = stage(path, fill)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A folder beside the outputs where a run writes every output file first.
/// [`Staging::commit`] then renames each into the outputs folder; if one
/// rename fails, the files already moved are removed again and any file they
/// had replaced is put back, so the outputs folder ends as it was. Dropping
/// an uncommitted `Staging` deletes the folder and everything in it.
///
/// What is guaranteed: after a failed run (an error at any point before or
/// during `commit`) the outputs folder holds exactly the files it held
/// before, with their contents. A crash of the whole machine in the middle
/// of `commit` can leave some outputs new and others old, and the hidden
/// staging folder behind.
pub struct Staging {
    folder: PathBuf,
    dir: TempDir,
}

impl Staging {
    /// A staging folder inside `folder` (the outputs' folder), created now.
    pub fn new(folder: &Path) -> std::io::Result<Staging> {
        let folder = if folder.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            folder.to_path_buf()
        };
        let dir = tempfile::Builder::new()
            .prefix(".ascend-quant-staging-")
            .tempdir_in(&folder)?;
        Ok(Staging { folder, dir })
    }

    /// Where to write the output that will become `name` in the outputs folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the output `name`, synced to disk.
    pub fn write(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let mut f = std::fs::File::create(self.path(name))?;
        f.write_all(bytes)?;
        f.sync_all()
    }

    /// Moves every staged file into the outputs folder (in name order), or
    /// none of them: see the type's documentation.
    pub fn commit(self) -> std::io::Result<Vec<PathBuf>> {
        let backup = self.dir.path().join(".replaced");
        std::fs::create_dir(&backup)?;
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(self.dir.path())?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name())
            .collect();
        names.sort();
        // (target, whether an older file was moved aside)
        let mut moved: Vec<(PathBuf, bool)> = Vec::new();
        for name in &names {
            let target = self.folder.join(name);
            let step = (|| -> std::io::Result<bool> {
                let replaced = std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_file());
                if replaced {
                    std::fs::rename(&target, backup.join(name))?;
                }
                if let Err(e) = std::fs::rename(self.dir.path().join(name), &target) {
                    if replaced {
                        let _ = std::fs::rename(backup.join(name), &target);
                    }
                    return Err(e);
                }
                Ok(replaced)
            })();
            match step {
                Ok(replaced) => moved.push((target, replaced)),
                Err(e) => {
                    for (target, replaced) in moved.iter().rev() {
                        let _ = std::fs::remove_file(target);
                        if *replaced && let Some(n) = target.file_name() {
                            let _ = std::fs::rename(backup.join(n), target);
                        }
                    }
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot move {} into place: {e}",
                            self.folder.join(name).display()
                        ),
                    ));
                }
            }
        }
        Ok(moved.into_iter().map(|(t, _)| t).collect())
    }
}

/// A temporary file beside `path` holding what `fill` wrote, synced to disk;
/// deleted when dropped unless persisted.
fn stage(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<NamedTempFile> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // 0o666 before the umask, as for any newly created file (the temporary
    // file's default of 0o600 would make outputs private to their creator).
    let mut tmp = tempfile::Builder::new()
        .prefix(".ascend-quant-")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)?;
    fill(tmp.as_file_mut())?;
    tmp.as_file_mut().sync_all()?;
    Ok(tmp)
}
