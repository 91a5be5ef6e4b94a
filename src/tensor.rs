//! The dense tensor type the whole crate exchanges: one `ndarray` array per
//! element type, tagged with its ONNX data type.

use half::f16;
use ndarray::ArrayD;
use std::fmt;

/// ONNX element types that ascend-quant can hold in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE float32 (`TensorProto.FLOAT`, 1).
    F32,
    /// IEEE float16 (`TensorProto.FLOAT16`, 10).
    F16,
    /// IEEE float64 (`TensorProto.DOUBLE`, 11).
    F64,
    /// Signed 8-bit integer (`TensorProto.INT8`, 3).
    I8,
    /// Unsigned 8-bit integer (`TensorProto.UINT8`, 2).
    U8,
    /// Signed 32-bit integer (`TensorProto.INT32`, 6).
    I32,
    /// Signed 64-bit integer (`TensorProto.INT64`, 7).
    I64,
    /// Unsigned 64-bit integer (`TensorProto.UINT64`, 13).
    U64,
    /// Boolean (`TensorProto.BOOL`, 9).
    Bool,
}

impl DType {
    /// The `TensorProto.DataType` number of this type.
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U64 => 13,
        }
    }

    /// The type for a `TensorProto.DataType` number, if ascend-quant supports it.
    pub fn from_onnx_code(code: i32) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            6 => DType::I32,
            7 => DType::I64,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            13 => DType::U64,
            _ => return None,
        })
    }

    /// Size of one element in bytes, as stored in `raw_data`.
    pub fn size_of(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }
}

/// Human name of any ONNX data type number (also the ones we do not hold).
pub fn onnx_type_name(code: i32) -> &'static str {
    const NAMES: [&str; 29] = [
        "undefined",
        "float32",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "int32",
        "int64",
        "string",
        "bool",
        "float16",
        "float64",
        "uint32",
        "uint64",
        "complex64",
        "complex128",
        "bfloat16",
        "float8e4m3fn",
        "float8e4m3fnuz",
        "float8e5m2",
        "float8e5m2fnuz",
        "uint4",
        "int4",
        "float4e2m1",
        "float8e8m0",
        "uint2",
        "int2",
        "float6e2m3",
        "float6e3m2",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("unknown")
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(onnx_type_name(self.onnx_code()))
    }
}

/// A dense n-dimensional tensor of one of the supported element types.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    /// float32 elements.
    F32(ArrayD<f32>),
    /// float16 elements.
    F16(ArrayD<f16>),
    /// float64 elements.
    F64(ArrayD<f64>),
    /// int8 elements.
    I8(ArrayD<i8>),
    /// uint8 elements.
    U8(ArrayD<u8>),
    /// int32 elements.
    I32(ArrayD<i32>),
    /// int64 elements.
    I64(ArrayD<i64>),
    /// uint64 elements.
    U64(ArrayD<u64>),
    /// boolean elements.
    Bool(ArrayD<bool>),
}

/// Applies the same expression to the array inside any `Tensor` variant.
macro_rules! each_variant {
    ($value:expr, $array:ident => $body:expr) => {
        match $value {
            Tensor::F32($array) => $body,
            Tensor::F16($array) => $body,
            Tensor::F64($array) => $body,
            Tensor::I8($array) => $body,
            Tensor::U8($array) => $body,
            Tensor::I32($array) => $body,
            Tensor::I64($array) => $body,
            Tensor::U64($array) => $body,
            Tensor::Bool($array) => $body,
        }
    };
}

impl Tensor {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F16(_) => DType::F16,
            Tensor::F64(_) => DType::F64,
            Tensor::I8(_) => DType::I8,
            Tensor::U8(_) => DType::U8,
            Tensor::I32(_) => DType::I32,
            Tensor::I64(_) => DType::I64,
            Tensor::U64(_) => DType::U64,
            Tensor::Bool(_) => DType::Bool,
        }
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        each_variant!(self, a => a.shape())
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        each_variant!(self, a => a.len())
    }

    /// Whether the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements widened to f64, in logical (row-major) order; used to
    /// compare tensors of any type numerically.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Tensor::F32(a) => a.iter().map(|&v| f64::from(v)).collect(),
            Tensor::F16(a) => a.iter().map(|v| f64::from(v.to_f32())).collect(),
            Tensor::F64(a) => a.iter().copied().collect(),
            Tensor::I8(a) => a.iter().map(|&v| f64::from(v)).collect(),
            Tensor::U8(a) => a.iter().map(|&v| f64::from(v)).collect(),
            Tensor::I32(a) => a.iter().map(|&v| f64::from(v)).collect(),
            Tensor::I64(a) => a.iter().map(|&v| v as f64).collect(),
            Tensor::U64(a) => a.iter().map(|&v| v as f64).collect(),
            Tensor::Bool(a) => a.iter().map(|&v| f64::from(u8::from(v))).collect(),
        }
    }

    /// The elements `range` of axis 0 (samples of a batch), copied.
    pub fn slice_axis0(&self, range: std::ops::Range<usize>) -> Tensor {
        let s = ndarray::Slice::from(range);
        match self {
            Tensor::F32(a) => Tensor::F32(a.slice_axis(ndarray::Axis(0), s).to_owned()),
            Tensor::F16(a) => Tensor::F16(a.slice_axis(ndarray::Axis(0), s).to_owned()),
            Tensor::F64(a) => Tensor::F64(a.slice_axis(ndarray::Axis(0), s).to_owned()),
            Tensor::I8(a) => Tensor::I8(a.slice_axis(ndarray::Axis(0), s).to_owned()),
            Tensor::U8(a) => Tensor::U8(a.slice_axis(ndarray::Axis(0), s).to_owned()),
            Tensor::I32(a) => Tensor::I32(a.slice_axis(ndarray::Axis(0), s).to_owned()),
            Tensor::I64(a) => Tensor::I64(a.slice_axis(ndarray::Axis(0), s).to_owned()),
            Tensor::U64(a) => Tensor::U64(a.slice_axis(ndarray::Axis(0), s).to_owned()),
            Tensor::Bool(a) => Tensor::Bool(a.slice_axis(ndarray::Axis(0), s).to_owned()),
        }
    }

    /// The tensors joined along axis 0 (the samples of per-sample runs), or
    /// `None` when they differ in type or in the other axes.
    pub fn concat_axis0(parts: &[Tensor]) -> Option<Tensor> {
        let refs: Vec<&Tensor> = parts.iter().collect();
        Tensor::concat(&refs, 0)
    }

    /// The tensors joined along `axis`, or `None` when they differ in type,
    /// in rank or in the other axes (or there are none).
    pub fn concat(parts: &[&Tensor], axis: usize) -> Option<Tensor> {
        let rank = parts.first()?.shape().len();
        // ndarray asserts (panics) on a part without the axis.
        if axis >= rank || parts.iter().any(|t| t.shape().len() != rank) {
            return None;
        }
        macro_rules! join {
            ($variant:ident) => {{
                let views = parts
                    .iter()
                    .map(|t| match t {
                        Tensor::$variant(a) => Some(a.view()),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?;
                ndarray::concatenate(ndarray::Axis(axis), &views)
                    .ok()
                    .map(Tensor::$variant)
            }};
        }
        match parts.first()? {
            Tensor::F32(_) => join!(F32),
            Tensor::F16(_) => join!(F16),
            Tensor::F64(_) => join!(F64),
            Tensor::I8(_) => join!(I8),
            Tensor::U8(_) => join!(U8),
            Tensor::I32(_) => join!(I32),
            Tensor::I64(_) => join!(I64),
            Tensor::U64(_) => join!(U64),
            Tensor::Bool(_) => join!(Bool),
        }
    }

    /// The float32 array, if this is a float32 tensor.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            _ => None,
        }
    }
}

/// Formats a shape as `[1, 3, 224, 224]`.
pub fn format_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::Tensor;
    use ndarray::{ArrayD, IxDyn};

    /// Parts of another rank, or without the axis, are refused rather than
    /// handed to ndarray, which panics on them (found by the model_run fuzz target).
    #[test]
    fn concat_refuses_parts_of_another_rank() {
        let v = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1, 2]).unwrap());
        let s = Tensor::I64(ArrayD::from_elem(IxDyn(&[]), 3));
        assert!(Tensor::concat(&[&v, &s], 0).is_none());
        assert!(Tensor::concat(&[&s, &s], 0).is_none());
        let joined = Tensor::concat(&[&v, &v], 0).unwrap();
        assert_eq!(joined.shape(), &[4]);
    }
}
