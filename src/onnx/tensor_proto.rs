//! Conversions between ONNX `TensorProto` and [`Tensor`] (ndarray), reading
//! both `raw_data` (little-endian bytes) and the typed repeated fields.

use super::error::{OnnxError, Result};
use super::proto::TensorProto;
use crate::tensor::{DType, Tensor, onnx_type_name};
use half::f16;
use ndarray::{ArrayD, IxDyn};

/// Where [`to_proto`] puts the elements of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Storage {
    /// Little-endian bytes in `raw_data` (compact; what exporters write).
    #[default]
    Raw,
    /// The typed repeated field ONNX assigns to the type (`float_data`,
    /// `int32_data`, `int64_data`, `uint64_data`, `double_data`).
    Typed,
}

fn data_err(tensor: &TensorProto, reason: String) -> OnnxError {
    OnnxError::TensorData {
        tensor: tensor.name().to_string(),
        reason,
    }
}

/// The dims of `tensor` as `usize`, rejecting negative ones, and their product.
pub fn dims_of(tensor: &TensorProto) -> Result<(Vec<usize>, usize)> {
    let mut shape = Vec::with_capacity(tensor.dims.len());
    let mut count: usize = 1;
    for &d in &tensor.dims {
        let d = usize::try_from(d).map_err(|_| {
            data_err(
                tensor,
                format!("negative dimension {d} in dims {:?}", tensor.dims),
            )
        })?;
        count = count
            .checked_mul(d)
            .ok_or_else(|| data_err(tensor, format!("dims {:?} overflow", tensor.dims)))?;
        shape.push(d);
    }
    Ok((shape, count))
}

/// The element type of `tensor`, or an error naming the tensor if unsupported.
pub fn dtype_of(tensor: &TensorProto) -> Result<DType> {
    DType::from_onnx_code(tensor.data_type()).ok_or_else(|| OnnxError::UnsupportedDType {
        tensor: tensor.name().to_string(),
        dtype: onnx_type_name(tensor.data_type()).to_string(),
    })
}

/// Decodes `count` little-endian elements of `width` bytes each from `raw`.
fn from_le<T, const W: usize>(
    tensor: &TensorProto,
    raw: &[u8],
    count: usize,
    decode: impl Fn([u8; W]) -> T,
) -> Result<Vec<T>> {
    let expected = count.saturating_mul(W);
    if raw.len() != expected {
        return Err(data_err(
            tensor,
            format!(
                "raw_data holds {} bytes but dims {:?} of {} need {} bytes; the tensor is corrupt or truncated",
                raw.len(),
                tensor.dims,
                onnx_type_name(tensor.data_type()),
                expected
            ),
        ));
    }
    Ok(raw
        .chunks_exact(W)
        .map(|c| decode(c.try_into().expect("chunk of width W")))
        .collect())
}

/// Checks that a typed field holds exactly `count` elements.
fn typed<T: Clone>(tensor: &TensorProto, field: &str, data: &[T], count: usize) -> Result<Vec<T>> {
    if data.len() != count {
        return Err(data_err(
            tensor,
            format!(
                "{field} holds {} elements but dims {:?} need {count}; the tensor is corrupt",
                data.len(),
                tensor.dims
            ),
        ));
    }
    Ok(data.to_vec())
}

/// Narrows the `int32_data` field to a smaller integer type, checking range.
fn narrow<T: TryFrom<i32>>(tensor: &TensorProto, count: usize) -> Result<Vec<T>> {
    typed(tensor, "int32_data", &tensor.int32_data, count)?
        .into_iter()
        .map(|v| {
            T::try_from(v).map_err(|_| {
                data_err(
                    tensor,
                    format!(
                        "int32_data value {v} is out of range for {}",
                        onnx_type_name(tensor.data_type())
                    ),
                )
            })
        })
        .collect()
}

fn shaped<T>(tensor: &TensorProto, shape: Vec<usize>, data: Vec<T>) -> Result<ArrayD<T>> {
    ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| data_err(tensor, e.to_string()))
}

/// Converts a `TensorProto` whose data is inline (raw or typed) to a [`Tensor`].
///
/// External data must have been resolved first (see `onnx::external`).
pub fn to_tensor(tensor: &TensorProto) -> Result<Tensor> {
    let dtype = dtype_of(tensor)?;
    if tensor.data_location() == super::proto::tensor_proto::DataLocation::External {
        return Err(data_err(tensor, "its data is still external; load the model with ascend-quant's loader so external data is resolved".into()));
    }
    let (shape, count) = dims_of(tensor)?;
    let raw = tensor.raw_data.as_deref();
    Ok(match dtype {
        DType::F32 => Tensor::F32(shaped(
            tensor,
            shape,
            match raw {
                Some(r) => from_le(tensor, r, count, f32::from_le_bytes)?,
                None => typed(tensor, "float_data", &tensor.float_data, count)?,
            },
        )?),
        DType::F64 => Tensor::F64(shaped(
            tensor,
            shape,
            match raw {
                Some(r) => from_le(tensor, r, count, f64::from_le_bytes)?,
                None => typed(tensor, "double_data", &tensor.double_data, count)?,
            },
        )?),
        DType::F16 => Tensor::F16(shaped(
            tensor,
            shape,
            match raw {
                Some(r) => from_le(tensor, r, count, f16::from_le_bytes)?,
                None => narrow::<u16>(tensor, count)?
                    .into_iter()
                    .map(f16::from_bits)
                    .collect(),
            },
        )?),
        DType::I8 => Tensor::I8(shaped(
            tensor,
            shape,
            match raw {
                Some(r) => from_le(tensor, r, count, i8::from_le_bytes)?,
                None => narrow(tensor, count)?,
            },
        )?),
        DType::U8 => Tensor::U8(shaped(
            tensor,
            shape,
            match raw {
                Some(r) => from_le(tensor, r, count, u8::from_le_bytes)?,
                None => narrow(tensor, count)?,
            },
        )?),
        DType::Bool => Tensor::Bool(shaped(
            tensor,
            shape,
            match raw {
                Some(r) => from_le(tensor, r, count, |b: [u8; 1]| b[0] != 0)?,
                None => typed(tensor, "int32_data", &tensor.int32_data, count)?
                    .into_iter()
                    .map(|v| v != 0)
                    .collect(),
            },
        )?),
        DType::I32 => Tensor::I32(shaped(
            tensor,
            shape,
            match raw {
                Some(r) => from_le(tensor, r, count, i32::from_le_bytes)?,
                None => typed(tensor, "int32_data", &tensor.int32_data, count)?,
            },
        )?),
        DType::I64 => Tensor::I64(shaped(
            tensor,
            shape,
            match raw {
                Some(r) => from_le(tensor, r, count, i64::from_le_bytes)?,
                None => typed(tensor, "int64_data", &tensor.int64_data, count)?,
            },
        )?),
        DType::U64 => Tensor::U64(shaped(
            tensor,
            shape,
            match raw {
                Some(r) => from_le(tensor, r, count, u64::from_le_bytes)?,
                None => typed(tensor, "uint64_data", &tensor.uint64_data, count)?,
            },
        )?),
    })
}

fn raw_bytes<T: Copy, const W: usize>(a: &ArrayD<T>, encode: impl Fn(T) -> [u8; W]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len() * W);
    for &v in a.iter() {
        out.extend_from_slice(&encode(v));
    }
    out
}

/// Converts a [`Tensor`] to a named `TensorProto`, storing elements as `storage` says.
pub fn to_proto(name: &str, value: &Tensor, storage: Storage) -> TensorProto {
    let mut t = TensorProto {
        name: Some(name.to_string()),
        data_type: Some(value.dtype().onnx_code()),
        dims: value.shape().iter().map(|&d| d as i64).collect(),
        ..Default::default()
    };
    match storage {
        Storage::Raw => {
            t.raw_data = Some(match value {
                Tensor::F32(a) => raw_bytes(a, f32::to_le_bytes),
                Tensor::F16(a) => raw_bytes(a, f16::to_le_bytes),
                Tensor::F64(a) => raw_bytes(a, f64::to_le_bytes),
                Tensor::I8(a) => raw_bytes(a, i8::to_le_bytes),
                Tensor::U8(a) => raw_bytes(a, u8::to_le_bytes),
                Tensor::I32(a) => raw_bytes(a, i32::to_le_bytes),
                Tensor::I64(a) => raw_bytes(a, i64::to_le_bytes),
                Tensor::U64(a) => raw_bytes(a, u64::to_le_bytes),
                Tensor::Bool(a) => raw_bytes(a, |b: bool| [u8::from(b)]),
            })
        }
        Storage::Typed => match value {
            Tensor::F32(a) => t.float_data = a.iter().copied().collect(),
            Tensor::F64(a) => t.double_data = a.iter().copied().collect(),
            Tensor::F16(a) => t.int32_data = a.iter().map(|v| i32::from(v.to_bits())).collect(),
            Tensor::I8(a) => t.int32_data = a.iter().map(|&v| i32::from(v)).collect(),
            Tensor::U8(a) => t.int32_data = a.iter().map(|&v| i32::from(v)).collect(),
            Tensor::Bool(a) => t.int32_data = a.iter().map(|&v| i32::from(v)).collect(),
            Tensor::I32(a) => t.int32_data = a.iter().copied().collect(),
            Tensor::I64(a) => t.int64_data = a.iter().copied().collect(),
            Tensor::U64(a) => t.uint64_data = a.iter().copied().collect(),
        },
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn raw_and_typed_round_trip_every_type() {
        let values = vec![
            Tensor::F32(array![[1.5f32, -2.0], [0.25, 3.0]].into_dyn()),
            Tensor::F16(array![f16::from_f32(0.5), f16::from_f32(-1.0)].into_dyn()),
            Tensor::F64(array![1e300, -0.5].into_dyn()),
            Tensor::I8(array![-128i8, 127, 0].into_dyn()),
            Tensor::U8(array![0u8, 255].into_dyn()),
            Tensor::I32(array![i32::MIN, i32::MAX].into_dyn()),
            Tensor::I64(array![i64::MIN, 7].into_dyn()),
            Tensor::U64(array![u64::MAX, 1].into_dyn()),
            Tensor::Bool(array![true, false, true].into_dyn()),
        ];
        for v in values {
            for storage in [Storage::Raw, Storage::Typed] {
                let p = to_proto("t", &v, storage);
                assert_eq!(to_tensor(&p).unwrap(), v, "{storage:?} {:?}", v.dtype());
            }
        }
    }

    #[test]
    fn raw_bytes_are_little_endian() {
        let p = to_proto("t", &Tensor::I32(array![1i32, -2].into_dyn()), Storage::Raw);
        assert_eq!(
            p.raw_data.unwrap(),
            vec![1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff]
        );
        let p = to_proto("t", &Tensor::F32(array![1.0f32].into_dyn()), Storage::Raw);
        assert_eq!(p.raw_data.unwrap(), vec![0, 0, 0x80, 0x3f]);
    }

    #[test]
    fn raw_length_mismatch_names_the_tensor() {
        let mut p = to_proto(
            "conv1.weight",
            &Tensor::F32(array![1.0f32, 2.0].into_dyn()),
            Storage::Raw,
        );
        p.dims = vec![3];
        let msg = to_tensor(&p).unwrap_err().to_string();
        assert!(
            msg.contains("conv1.weight") && msg.contains("8 bytes") && msg.contains("12 bytes"),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_type_names_the_tensor() {
        let p = TensorProto {
            name: Some("w".into()),
            data_type: Some(16),
            ..Default::default()
        };
        let msg = to_tensor(&p).unwrap_err().to_string();
        assert!(msg.contains("'w'") && msg.contains("bfloat16"), "{msg}");
    }

    #[test]
    fn out_of_range_typed_int8_is_an_error() {
        let p = TensorProto {
            name: Some("q".into()),
            data_type: Some(3),
            dims: vec![1],
            int32_data: vec![300],
            ..Default::default()
        };
        assert!(
            to_tensor(&p)
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
    }
}
