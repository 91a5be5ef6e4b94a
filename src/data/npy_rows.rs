//! Row-wise reading of a `.npy` file: the header is parsed once, then any
//! range of samples (rows of axis 0) is read straight from disk, so a
//! calibration set larger than memory streams batch by batch.

use super::npy::DataError;
use crate::tensor::{DType, Tensor};
use ndarray_npy::npy::header::Header;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// An open `.npy` file whose rows can be read on demand.
#[derive(Clone, Debug)]
pub struct NpyRows {
    path: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    data_offset: u64,
}

fn format_err(path: &Path, reason: String) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        reason,
    }
}

impl NpyRows {
    /// Reads the header of `path`; C-order little-endian arrays of the
    /// supported types only (others should be read whole with `read_npy`).
    pub fn open(path: &Path) -> Result<Option<NpyRows>, DataError> {
        let mut file = std::fs::File::open(path).map_err(|source| DataError::Io {
            path: path.into(),
            action: "read",
            error: source,
        })?;
        let header = Header::from_reader(&mut file).map_err(|e| format_err(path, e.to_string()))?;
        let dtype = match header.type_descriptor.to_string().trim_matches('\'') {
            "<f4" => DType::F32,
            "<f8" => DType::F64,
            "|i1" => DType::I8,
            "|u1" => DType::U8,
            "<i4" => DType::I32,
            "<i8" => DType::I64,
            "<u8" => DType::U64,
            "|b1" => DType::Bool,
            _ => return Ok(None),
        };
        if header.layout.is_fortran() || header.shape.is_empty() {
            return Ok(None);
        }
        let data_offset = file.stream_position().map_err(|source| DataError::Io {
            path: path.into(),
            action: "read",
            error: source,
        })?;
        let rows = NpyRows {
            path: path.to_path_buf(),
            dtype,
            shape: header.shape,
            data_offset,
        };
        let need = super::npy::data_bytes(&rows.shape, dtype.size_of())
            .and_then(|n| n.checked_add(data_offset))
            .unwrap_or(u64::MAX);
        let size = file
            .metadata()
            .map_err(|source| DataError::Io {
                path: path.into(),
                action: "read",
                error: source,
            })?
            .len();
        if size < need {
            return Err(format_err(
                path,
                format!(
                    "the file holds {size} bytes but its header promises {} for shape {:?}; it is truncated or corrupt",
                    if need == u64::MAX {
                        "more than 2^64".to_string()
                    } else {
                        need.to_string()
                    },
                    rows.shape
                ),
            ));
        }
        Ok(Some(rows))
    }

    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn row_bytes(&self) -> usize {
        self.shape[1..].iter().product::<usize>() * self.dtype.size_of()
    }

    /// Rows `range` of axis 0 as a tensor.
    pub fn read(&self, range: std::ops::Range<usize>) -> Result<Tensor, DataError> {
        let io = |source| DataError::Io {
            path: self.path.clone(),
            action: "read",
            error: source,
        };
        let mut file = std::fs::File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(
            self.data_offset + (range.start * self.row_bytes()) as u64,
        ))
        .map_err(io)?;
        let mut bytes = vec![0u8; range.len() * self.row_bytes()];
        file.read_exact(&mut bytes).map_err(io)?;
        let mut shape = self.shape.clone();
        shape[0] = range.len();
        crate::onnx::tensor_proto::to_tensor(&crate::onnx::proto::TensorProto {
            name: Some(self.path.display().to_string()),
            data_type: Some(self.dtype.onnx_code()),
            dims: shape.iter().map(|&d| d as i64).collect(),
            raw_data: Some(bytes),
            ..Default::default()
        })
        .map_err(|e| format_err(&self.path, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::write_npy;
    use ndarray::{ArrayD, IxDyn};

    #[test]
    fn reads_any_row_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let a =
            ArrayD::from_shape_vec(IxDyn(&[5, 2, 3]), (0..30).map(|v| v as f32).collect()).unwrap();
        write_npy(&p, &Tensor::F32(a.clone())).unwrap();
        let rows = NpyRows::open(&p).unwrap().unwrap();
        assert_eq!(rows.shape(), &[5, 2, 3]);
        let got = rows.read(1..3).unwrap();
        assert_eq!(
            got,
            Tensor::F32(a.slice(ndarray::s![1..3, .., ..]).to_owned().into_dyn())
        );
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 8]).unwrap();
        assert!(
            NpyRows::open(&p)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }
}
