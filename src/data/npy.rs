//! `.npy` files of any supported element type, read into and written from [`Tensor`].

use crate::fsutil;
use crate::tensor::Tensor;
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyError, ReadNpyExt, WriteNpyExt};
use std::path::{Path, PathBuf};

/// Errors reading or writing data files.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read or written.
    #[error("{path}: {action} failed: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// "read" or "write".
        action: &'static str,
        /// The system error (in the message, not chained after it).
        error: std::io::Error,
    },
    /// The data file cannot be used (format, type, shape or names).
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong and what is accepted.
        reason: String,
    },
}

/// Reads a `.npy` file holding float32/float64/int8/uint8/int32/int64/uint64/bool data.
pub fn read_npy(path: &Path) -> Result<Tensor, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.into(),
        action: "read",
        error: source,
    })?;
    read_npy_bytes(&bytes, path)
}

/// The element size a `.npy` type descriptor names ("<f4" → 4), if it is a
/// plain numeric one.
pub(super) fn descriptor_size(descr: &str) -> Option<usize> {
    let d = descr.trim_matches('\'');
    let digits = d.get(2..)?;
    match d.get(1..2)? {
        "f" | "i" | "u" | "b" | "c" => digits.parse().ok(),
        _ => None,
    }
}

/// Bytes the data of an array of `shape` with `element` bytes each needs, or
/// `None` when that overflows.
pub(super) fn data_bytes(shape: &[usize], element: usize) -> Option<u64> {
    shape
        .iter()
        .try_fold(element as u64, |acc, &d| acc.checked_mul(d as u64))
}

/// Refuses `.npy` bytes whose header promises more data than they hold,
/// before any array of that size is allocated.
fn check_declared_size(bytes: &[u8], origin: &Path) -> Result<(), DataError> {
    let mut cursor = std::io::Cursor::new(bytes);
    // A header that does not parse is reported by the reader itself.
    let Ok(header) = ndarray_npy::npy::header::Header::from_reader(&mut cursor) else {
        return Ok(());
    };
    let Some(element) = descriptor_size(&header.type_descriptor.to_string()) else {
        return Ok(());
    };
    let have = (bytes.len() as u64).saturating_sub(cursor.position());
    match data_bytes(&header.shape, element) {
        Some(need) if need <= have => Ok(()),
        need => Err(DataError::Format {
            path: origin.into(),
            reason: format!(
                "the header declares shape {:?} ({}) but the file holds {have} bytes of data; it is truncated or corrupt",
                header.shape,
                need.map_or("more than 2^64 bytes".to_string(), |n| format!("{n} bytes")),
            ),
        }),
    }
}

/// Parses `.npy` bytes; `origin` names the source in errors.
pub fn read_npy_bytes(bytes: &[u8], origin: &Path) -> Result<Tensor, DataError> {
    check_declared_size(bytes, origin)?;
    fn attempt<T: ndarray_npy::ReadableElement>(bytes: &[u8]) -> Result<ArrayD<T>, ReadNpyError> {
        ArrayD::<T>::read_npy(bytes)
    }
    type Attempt = fn(&[u8]) -> Result<Tensor, ReadNpyError>;
    let tries: [Attempt; 8] = [
        |b| attempt(b).map(Tensor::F32),
        |b| attempt(b).map(Tensor::F64),
        |b| attempt(b).map(Tensor::I64),
        |b| attempt(b).map(Tensor::I32),
        |b| attempt(b).map(Tensor::U8),
        |b| attempt(b).map(Tensor::I8),
        |b| attempt(b).map(Tensor::U64),
        |b| attempt(b).map(Tensor::Bool),
    ];
    let mut last = None;
    for t in tries {
        match t(bytes) {
            Ok(v) => return Ok(v),
            Err(ReadNpyError::WrongDescriptor(d)) => last = Some(d.to_string()),
            Err(e) => {
                return Err(DataError::Format {
                    path: origin.into(),
                    reason: format!("not a usable .npy array: {e}"),
                });
            }
        }
    }
    Err(DataError::Format {
        path: origin.into(),
        reason: format!(
            "not a usable .npy array: element type {} is not supported (use float32, float64, int8, uint8, int32, int64, uint64 or bool, little-endian, C order)",
            last.unwrap_or_default()
        ),
    })
}

/// Reads integer class labels (int64, int32 or uint8 `.npy`), one per sample.
pub fn read_labels(path: &Path) -> Result<Vec<i64>, DataError> {
    Ok(match read_npy(path)? {
        Tensor::I64(a) => a.iter().copied().collect(),
        Tensor::I32(a) => a.iter().map(|&v| i64::from(v)).collect(),
        Tensor::U8(a) => a.iter().map(|&v| i64::from(v)).collect(),
        other => {
            return Err(DataError::Format {
                path: path.into(),
                reason: format!("labels must be integers, got {}", other.dtype()),
            });
        }
    })
}

/// Writes a tensor to a `.npy` file atomically.
pub fn write_npy(path: &Path, value: &Tensor) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: path.into(),
        action: "write",
        error: source,
    };
    fsutil::write_atomic_with(path, |file| {
        let w = std::io::BufWriter::new(file);
        let result = match value {
            Tensor::F32(a) => a.write_npy(w),
            Tensor::F64(a) => a.write_npy(w),
            Tensor::I8(a) => a.write_npy(w),
            Tensor::U8(a) => a.write_npy(w),
            Tensor::I32(a) => a.write_npy(w),
            Tensor::I64(a) => a.write_npy(w),
            Tensor::U64(a) => a.write_npy(w),
            Tensor::Bool(a) => a.write_npy(w),
            Tensor::F16(a) => a.mapv(|v| v.to_f32()).write_npy(w),
        };
        result.map_err(std::io::Error::other)
    })
    .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn round_trips_several_types() {
        let dir = tempfile::tempdir().unwrap();
        for v in [
            Tensor::F32(array![[1.0f32, 2.5]].into_dyn()),
            Tensor::I64(array![-3i64, 4].into_dyn()),
            Tensor::U8(array![0u8, 255].into_dyn()),
            Tensor::Bool(array![true, false].into_dyn()),
        ] {
            let p = dir.path().join("a.npy");
            write_npy(&p, &v).unwrap();
            assert_eq!(read_npy(&p).unwrap(), v);
        }
    }

    #[test]
    fn a_header_promising_2_pow_40_elements_is_refused_before_allocation() {
        // A version 1.0 .npy written by hand: magic, header length, header, 8 data bytes.
        let mut header =
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }".to_vec();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut forged = b"\x93NUMPY\x01\x00".to_vec();
        forged.extend((header.len() as u16).to_le_bytes());
        forged.extend(header);
        forged.extend([0u8; 8]);
        let msg = read_npy_bytes(&forged, Path::new("lies.npy"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("lies.npy")
                && msg.contains("[1099511627776]")
                && msg.contains("4398046511104 bytes")
                && msg.contains("holds 8 bytes"),
            "{msg}"
        );
    }

    #[test]
    fn garbage_is_a_format_error_naming_the_file() {
        let msg = read_npy_bytes(b"not an npy file", Path::new("in.npy"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("in.npy") && msg.contains("not a usable .npy"),
            "{msg}"
        );
    }
}
