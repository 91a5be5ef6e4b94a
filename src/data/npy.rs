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
    #[error("{path}: {action} failed: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// "read" or "write".
        action: &'static str,
        /// The system error.
        source: std::io::Error,
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
        source,
    })?;
    read_npy_bytes(&bytes, path)
}

/// Parses `.npy` bytes; `origin` names the source in errors.
pub fn read_npy_bytes(bytes: &[u8], origin: &Path) -> Result<Tensor, DataError> {
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

/// Writes a tensor to a `.npy` file atomically.
pub fn write_npy(path: &Path, value: &Tensor) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: path.into(),
        action: "write",
        source,
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
