//! File-system helpers shared by every writer: atomic replacement of files.

use std::io::Write;
use std::path::Path;
use tempfile::NamedTempFile;

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

/// Writes several files so that either all of them are replaced or none:
/// every content goes to a temporary file in its target folder first, and
/// only when all are on disk are they renamed into place.
pub fn write_all_atomic(files: &[(&Path, &[u8])]) -> std::io::Result<()> {
    let staged = files
        .iter()
        .map(|(path, bytes)| Ok((stage(path, |f| f.write_all(bytes))?, *path)))
        .collect::<std::io::Result<Vec<_>>>()?;
    for (tmp, path) in staged {
        tmp.persist(path).map_err(|e| e.error)?;
    }
    Ok(())
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
    let mut tmp = tempfile::Builder::new()
        .prefix(".ascend-quant-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    fill(tmp.as_file_mut())?;
    tmp.as_file_mut().sync_all()?;
    Ok(tmp)
}
