//! The layout and shape operators (Transpose, Slice, Split, Gather, Concat,
//! Expand, Reshape, Unsqueeze, Squeeze, Pad, Cast, Shape, ConstantOfShape,
//! Range) on tensors of any element type: attributes and constant inputs
//! are turned into plain numbers first (each function's arguments), then the
//! data is moved. The native engine runs them on float32 values; model
//! preparation runs them on the small integer tensors of shape arithmetic
//! (`fold`).

use crate::tensor::{DType, Tensor};
use ndarray::{ArrayD, Axis, IxDyn, Slice};

/// Applies a generic expression to the array inside any tensor, wrapping the
/// result in the same variant.
macro_rules! map_any {
    ($value:expr, $a:ident => $body:expr) => {
        match $value {
            Tensor::F32($a) => Tensor::F32($body),
            Tensor::F16($a) => Tensor::F16($body),
            Tensor::F64($a) => Tensor::F64($body),
            Tensor::I8($a) => Tensor::I8($body),
            Tensor::U8($a) => Tensor::U8($body),
            Tensor::I32($a) => Tensor::I32($body),
            Tensor::I64($a) => Tensor::I64($body),
            Tensor::U64($a) => Tensor::U64($body),
            Tensor::Bool($a) => Tensor::Bool($body),
        }
    };
}

/// `axis` (negative counts from the end) as an index below `rank`.
pub fn axis_index(axis: i64, rank: usize) -> Result<usize, String> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// The most values one layout operator may produce: 2^28 (1 GiB of
/// float32), past the tensors these operators make in real models (a
/// ViT-H attention map is 2^28 and comes from a MatMul, not from here); a
/// corrupted shape constant must be an error, not an allocation failure.
pub const MAX_VALUES: usize = 1 << 28;

/// `shape`, refused when it holds more than [`MAX_VALUES`] values.
fn checked(shape: Vec<usize>) -> Result<Vec<usize>, String> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_VALUES)
        .map(|_| shape.clone())
        .ok_or_else(|| format!("an output of shape {shape:?} is too large"))
}

/// Transpose by `perm` (empty: reverse the axes).
pub fn transpose(x: &Tensor, perm: &[i64]) -> Result<Tensor, String> {
    let rank = x.shape().len();
    let perm: Vec<usize> = if perm.is_empty() {
        (0..rank).rev().collect()
    } else {
        perm.iter()
            .map(|&p| axis_index(p, rank))
            .collect::<Result<_, _>>()?
    };
    let mut seen = vec![false; rank];
    if perm.len() != rank || perm.iter().any(|&p| std::mem::replace(&mut seen[p], true)) {
        return Err(format!("perm {perm:?} is not a permutation of {rank} axes"));
    }
    Ok(map_any!(x, a => permute(a, &perm)))
}

/// `a` with its axes in the order `perm`. When the last axis stays last
/// (attention's head split and merge), whole rows are copied at a time.
fn permute<T: Clone>(a: &ArrayD<T>, perm: &[usize]) -> ArrayD<T> {
    let rank = perm.len();
    let Some(src) = a.as_slice().filter(|s| !s.is_empty()) else {
        return a
            .view()
            .permuted_axes(IxDyn(perm))
            .as_standard_layout()
            .into_owned();
    };
    if rank < 2 || perm[rank - 1] != rank - 1 {
        return a
            .view()
            .permuted_axes(IxDyn(perm))
            .as_standard_layout()
            .into_owned();
    }
    let shape = a.shape();
    let run = shape[rank - 1];
    let mut strides = vec![1usize; rank];
    for k in (0..rank - 1).rev() {
        strides[k] = strides[k + 1] * shape[k + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    // Walk the output's rows in order; each is one row of the input.
    let step: Vec<usize> = perm[..rank - 1].iter().map(|&p| strides[p]).collect();
    let mut index = vec![0usize; rank - 1];
    let mut offset = 0usize;
    let mut out = Vec::with_capacity(src.len());
    for _ in 0..src.len() / run {
        out.extend_from_slice(&src[offset..offset + run]);
        for k in (0..rank - 1).rev() {
            index[k] += 1;
            offset += step[k];
            if index[k] < out_shape[k] {
                break;
            }
            offset -= step[k] * out_shape[k];
            index[k] = 0;
        }
    }
    ArrayD::from_shape_vec(IxDyn(&out_shape), out).expect("as many elements as the input")
}

/// One axis of a Slice, resolved: the ndarray slice that takes ONNX's
/// `start, start + step, …` (stopping before `end`) on an axis of `n`.
fn slice_axis(start: i64, end: i64, step: i64, n: usize) -> Result<Slice, String> {
    let n = n as i64;
    if step == 0 {
        return Err("a Slice step is 0".into());
    }
    let wrap = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
    let (s, e) = (wrap(start), wrap(end));
    Ok(if step > 0 {
        let s = s.clamp(0, n);
        let e = e.clamp(0, n).max(s);
        Slice::new(s as isize, Some(e as isize), step as isize)
    } else {
        // Indices s, s + step, … > e: ndarray walks [e + 1, s + 1) from its end.
        let s = s.clamp(-1, n - 1);
        let e = e.clamp(-1, n - 1);
        let (lo, hi) = ((e + 1).min(s + 1), s + 1);
        Slice::new(lo as isize, Some(hi as isize), step as isize)
    })
}

/// Slice with ONNX's semantics (negative and out-of-range bounds clamped,
/// negative steps walk backwards).
pub fn slice(
    x: &Tensor,
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> Result<Tensor, String> {
    let shape = x.shape().to_vec();
    let rank = shape.len();
    if starts.len() != ends.len() {
        return Err("Slice's starts and ends differ in length".into());
    }
    let axes: Vec<usize> = match axes {
        Some(a) => a
            .iter()
            .map(|&v| axis_index(v, rank))
            .collect::<Result<_, _>>()?,
        None => (0..starts.len()).collect(),
    };
    if axes.len() != starts.len() || steps.is_some_and(|s| s.len() != starts.len()) {
        return Err("Slice's axes or steps differ in length from its starts".into());
    }
    let mut per_axis = vec![Slice::from(..); rank];
    for (k, &axis) in axes.iter().enumerate() {
        let step = steps.map_or(1, |s| s[k]);
        per_axis[axis] = slice_axis(starts[k], ends[k], step, shape[axis])?;
    }
    Ok(map_any!(x, a => a.slice_each_axis(|d| per_axis[d.axis.index()]).to_owned()))
}

/// The sizes Split cuts `n` into: `split` when given (summing to `n`), else
/// `outputs` equal parts (the last smaller when `n` does not divide).
pub fn split_sizes(n: usize, split: Option<&[i64]>, outputs: usize) -> Result<Vec<usize>, String> {
    match split {
        Some(s) => {
            if s.iter().any(|&v| v < 0) || s.iter().sum::<i64>() != n as i64 {
                return Err(format!("split {s:?} does not add up to the axis' {n}"));
            }
            Ok(s.iter().map(|&v| v as usize).collect())
        }
        None => {
            if outputs == 0 {
                return Err("Split has no output".into());
            }
            let part = n.div_ceil(outputs);
            Ok((0..outputs)
                .map(|k| part.min(n.saturating_sub(k * part)))
                .collect())
        }
    }
}

/// Gather along `axis` with `indices` (int32 or int64, negative from the end).
pub fn gather(x: &Tensor, indices: &Tensor, axis: i64) -> Result<Tensor, String> {
    let shape = x.shape().to_vec();
    let axis = axis_index(axis, shape.len())?;
    let n = shape[axis] as i64;
    let raw: Vec<i64> = match indices {
        Tensor::I64(a) => a.iter().copied().collect(),
        Tensor::I32(a) => a.iter().map(|&v| i64::from(v)).collect(),
        other => {
            return Err(format!(
                "Gather's indices are {}, not integers",
                other.dtype()
            ));
        }
    };
    let idx = raw
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + n } else { i };
            (0..n)
                .contains(&j)
                .then_some(j as usize)
                .ok_or_else(|| format!("index {i} is out of range for an axis of {n}"))
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let mut out_shape = shape[..axis].to_vec();
    out_shape.extend_from_slice(indices.shape());
    out_shape.extend_from_slice(&shape[axis + 1..]);
    let out_shape = checked(out_shape)?;
    Ok(map_any!(x, a => a
        .select(Axis(axis), &idx)
        .to_shape(IxDyn(&out_shape))
        .expect("same number of values")
        .into_owned()))
}

/// Concat along `axis`; every input must have the first's type.
pub fn concat(parts: &[&Tensor], axis: i64) -> Result<Tensor, String> {
    let first = parts.first().ok_or("Concat has no input")?;
    let axis = axis_index(axis, first.shape().len())?;
    if let Some(other) = parts.iter().find(|t| t.dtype() != first.dtype()) {
        return Err(format!("Concat of {} and {}", first.dtype(), other.dtype()));
    }
    Tensor::concat(parts, axis)
        .ok_or_else(|| "Concat's inputs differ in shape off the axis".to_string())
}

/// The shape both `a` and `b` broadcast to (NumPy's rule), if any.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| (i + s.len()).checked_sub(rank).map_or(1, |k| s[k]);
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// Expand: broadcast `x` with the shape `to` (NumPy's rule, both ways).
pub fn expand(x: &Tensor, to: &[i64]) -> Result<Tensor, String> {
    let to = dims(to)?;
    let shape = checked(
        broadcast_shape(x.shape(), &to)
            .ok_or_else(|| format!("cannot expand {:?} to {to:?}", x.shape()))?,
    )?;
    Ok(map_any!(x, a => a.broadcast(IxDyn(&shape)).expect("checked").to_owned()))
}

/// Non-negative sizes from an ONNX int list.
fn dims(v: &[i64]) -> Result<Vec<usize>, String> {
    v.iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("size {d} in {v:?} is negative")))
        .collect()
}

/// The output shape of Reshape to `shape` (0 copies the input's dimension
/// unless `allow_zero`, −1 takes the rest).
pub fn reshape_dims(
    input: &[usize],
    shape: &[i64],
    allow_zero: bool,
) -> Result<Vec<usize>, String> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &d) in shape.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allow_zero => out.push(*input.get(i).ok_or_else(|| {
                format!("shape {shape:?} copies axis {i} the input does not have")
            })?),
            d if d >= 0 => out.push(d as usize),
            _ => return Err(format!("shape {shape:?} is not valid")),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {input:?} to {shape:?}"));
        }
        out[i] = total / known;
    }
    if out.iter().product::<usize>() != total {
        return Err(format!("cannot reshape {input:?} to {shape:?}"));
    }
    Ok(out)
}

/// `x` with the shape `dims` (same number of values).
pub fn with_shape(x: &Tensor, dims: &[usize]) -> Result<Tensor, String> {
    if dims.iter().product::<usize>() != x.len() {
        return Err(format!("cannot give {:?} the shape {dims:?}", x.shape()));
    }
    Ok(map_any!(x, a => a
        .to_shape(IxDyn(dims))
        .expect("same number of values")
        .into_owned()))
}

/// The shape after inserting axes of size 1 at `axes` (of the output's rank).
pub fn unsqueeze_dims(input: &[usize], axes: &[i64]) -> Result<Vec<usize>, String> {
    let rank = input.len() + axes.len();
    let mut at: Vec<usize> = axes
        .iter()
        .map(|&a| axis_index(a, rank))
        .collect::<Result<_, _>>()?;
    at.sort_unstable();
    if at.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("Unsqueeze axes {axes:?} repeat"));
    }
    let mut rest = input.iter();
    Ok((0..rank)
        .map(|i| {
            if at.binary_search(&i).is_ok() {
                1
            } else {
                *rest.next().expect("rank adds up")
            }
        })
        .collect())
}

/// The shape after removing the axes of size 1 at `axes` (all of them when `None`).
pub fn squeeze_dims(input: &[usize], axes: Option<&[i64]>) -> Result<Vec<usize>, String> {
    let drop: Vec<usize> = match axes {
        Some(a) => a
            .iter()
            .map(|&v| axis_index(v, input.len()))
            .collect::<Result<_, _>>()?,
        None => (0..input.len()).filter(|&i| input[i] == 1).collect(),
    };
    if let Some(&bad) = drop.iter().find(|&&i| input[i] != 1) {
        return Err(format!(
            "axis {bad} of {input:?} is not 1 and cannot be squeezed"
        ));
    }
    Ok((0..input.len())
        .filter(|i| !drop.contains(i))
        .map(|i| input[i])
        .collect())
}

/// Constant-mode Pad: `pads` as ONNX orders them (all begins, then all
/// ends; negative values crop), filled with `value` (a one-value tensor of
/// `x`'s type, or zero).
pub fn pad(x: &Tensor, pads: &[i64], value: Option<&Tensor>) -> Result<Tensor, String> {
    let shape = x.shape().to_vec();
    let rank = shape.len();
    if pads.len() != 2 * rank {
        return Err(format!("{} pads for a rank-{rank} input", pads.len()));
    }
    let mut out_shape = Vec::with_capacity(rank);
    for (i, &n) in shape.iter().enumerate() {
        let m = (n as i64)
            .saturating_add(pads[i])
            .saturating_add(pads[i + rank]);
        out_shape
            .push(usize::try_from(m).map_err(|_| format!("pads {pads:?} crop axis {i} below 0"))?);
    }
    let out_shape = checked(out_shape)?;
    // The source window and where it lands (crops shrink the window).
    let src = |i: usize| {
        let lo = (-pads[i]).max(0);
        let hi = shape[i] as i64 - (-pads[i + rank]).max(0);
        Slice::from(lo as isize..hi.max(lo) as isize)
    };
    let dst = |i: usize| {
        let lo = pads[i].max(0);
        let hi = out_shape[i] as i64 - pads[i + rank].max(0);
        Slice::from(lo as isize..hi.max(lo) as isize)
    };
    macro_rules! fill {
        ($variant:ident, $a:ident) => {{
            let fill = match value {
                Some(Tensor::$variant(v)) if v.len() == 1 => *v.iter().next().expect("one"),
                None => Default::default(),
                Some(other) => {
                    return Err(format!(
                        "Pad's value is {} for {} data",
                        other.dtype(),
                        x.dtype()
                    ));
                }
            };
            let mut out = ArrayD::from_elem(IxDyn(&out_shape), fill);
            out.slice_each_axis_mut(|d| dst(d.axis.index()))
                .assign(&$a.slice_each_axis(|d| src(d.axis.index())));
            Tensor::$variant(out)
        }};
    }
    Ok(match x {
        Tensor::F32(a) => fill!(F32, a),
        Tensor::F16(a) => fill!(F16, a),
        Tensor::F64(a) => fill!(F64, a),
        Tensor::I8(a) => fill!(I8, a),
        Tensor::U8(a) => fill!(U8, a),
        Tensor::I32(a) => fill!(I32, a),
        Tensor::I64(a) => fill!(I64, a),
        Tensor::U64(a) => fill!(U64, a),
        Tensor::Bool(a) => fill!(Bool, a),
    })
}

/// A Pad node's attributes: whether it pads with a constant, and the pads
/// and value it carries as attributes (before opset 11; later they are inputs).
#[derive(Clone, Debug, PartialEq)]
pub struct PadAttributes {
    /// `mode` is constant (the default).
    pub constant: bool,
    /// The `pads` attribute.
    pub pads: Option<Vec<i64>>,
    /// The `value` attribute (0 when absent).
    pub value: f32,
}

impl PadAttributes {
    /// The attributes of the Pad `node`.
    pub fn of(node: &crate::onnx::NodeProto) -> PadAttributes {
        use crate::onnx::attr::{float_attr, ints_attr, string_attr};
        PadAttributes {
            constant: string_attr(node, "mode").is_none_or(|m| m == b"constant"),
            pads: ints_attr(node, "pads"),
            value: float_attr(node, "value").unwrap_or(0.0),
        }
    }
}

/// Cast to `to` (an ONNX element type code): integers and booleans through
/// int64, floats through float64 (float to integer truncates toward zero).
pub fn cast(x: &Tensor, to: i32) -> Result<Tensor, String> {
    let to = DType::from_onnx_code(to).ok_or_else(|| format!("Cast to element type {to}"))?;
    if x.dtype() == to {
        return Ok(x.clone());
    }
    let shape = IxDyn(x.shape());
    let ints: Option<Vec<i64>> = match x {
        Tensor::I8(a) => Some(a.iter().map(|&v| i64::from(v)).collect()),
        Tensor::U8(a) => Some(a.iter().map(|&v| i64::from(v)).collect()),
        Tensor::I32(a) => Some(a.iter().map(|&v| i64::from(v)).collect()),
        Tensor::I64(a) => Some(a.iter().copied().collect()),
        Tensor::U64(a) => Some(a.iter().map(|&v| v as i64).collect()),
        Tensor::Bool(a) => Some(a.iter().map(|&v| i64::from(v)).collect()),
        _ => None,
    };
    let floats = || x.to_f64_vec();
    macro_rules! build {
        ($variant:ident, $from_int:expr, $from_float:expr) => {{
            let v: Vec<_> = match &ints {
                Some(i) => i.iter().map($from_int).collect(),
                None => floats().into_iter().map($from_float).collect(),
            };
            Tensor::$variant(ArrayD::from_shape_vec(shape, v).expect("same size"))
        }};
    }
    Ok(match to {
        DType::F32 => build!(F32, |&v| v as f32, |v| v as f32),
        DType::F64 => build!(F64, |&v| v as f64, |v| v),
        DType::F16 => build!(F16, |&v| half::f16::from_f64(v as f64), half::f16::from_f64),
        DType::I8 => build!(I8, |&v| v as i8, |v| v as i8),
        DType::U8 => build!(U8, |&v| v as u8, |v| v as u8),
        DType::I32 => build!(I32, |&v| v as i32, |v| v as i32),
        DType::I64 => build!(I64, |&v| v, |v| v as i64),
        DType::U64 => build!(U64, |&v| v as u64, |v| v as u64),
        DType::Bool => build!(Bool, |&v| v != 0, |v| v != 0.0),
    })
}

/// Shape: the dimensions of `x`, `start..end` (negative from the end, clamped).
pub fn shape_of(x: &[usize], start: i64, end: Option<i64>) -> Tensor {
    let n = x.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + n } else { v }).clamp(0, n) as usize;
    let (s, e) = (clamp(start), clamp(end.unwrap_or(n)));
    let dims: Vec<i64> = x[s..e.max(s)].iter().map(|&d| d as i64).collect();
    Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[dims.len()]), dims).expect("1-D"))
}

/// ConstantOfShape: `shape` filled with the one value of `value` (float32 0 when absent).
pub fn constant_of_shape(shape: &[i64], value: Option<&Tensor>) -> Result<Tensor, String> {
    let shape = checked(dims(shape)?)?;
    let zero = Tensor::F32(ArrayD::zeros(IxDyn(&[1])));
    let value = value.unwrap_or(&zero);
    if value.len() != 1 {
        return Err("ConstantOfShape's value holds more than one element".into());
    }
    Ok(map_any!(value, a => ArrayD::from_elem(IxDyn(&shape), *a.iter().next().expect("one"))))
}

/// Range: `start, start + delta, …` below `limit` (above it for a negative delta).
pub fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> Result<Tensor, String> {
    let one = |t: &Tensor| {
        t.to_f64_vec()
            .first()
            .copied()
            .filter(|_| t.len() == 1)
            .ok_or_else(|| "Range's inputs are scalars".to_string())
    };
    let (s, l, d) = (one(start)?, one(limit)?, one(delta)?);
    if d == 0.0 {
        return Err("Range's delta is 0".into());
    }
    let n = ((l - s) / d).ceil().max(0.0);
    if n > MAX_VALUES as f64 {
        return Err(format!("Range of {n} values"));
    }
    let n = n as usize;
    Ok(match start {
        Tensor::I64(_) | Tensor::I32(_) => {
            let (s, d) = (s as i64, d as i64);
            let v: Vec<i64> = (0..n as i64)
                .map(|k| s.wrapping_add(k.wrapping_mul(d)))
                .collect();
            cast(
                &Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[n]), v).expect("1-D")),
                start.dtype().onnx_code(),
            )?
        }
        _ => {
            let v: Vec<f64> = (0..n).map(|k| s + k as f64 * d).collect();
            cast(
                &Tensor::F64(ArrayD::from_shape_vec(IxDyn(&[n]), v).expect("1-D")),
                start.dtype().onnx_code(),
            )?
        }
    })
}

/// A layout operator with one data input, its other operands resolved.
#[derive(Clone, Debug)]
pub enum Layout {
    /// Identity, Dropout (inference) and a Cast to the input's own type.
    Identity,
    /// Cast to an ONNX element type.
    Cast(i32),
    /// Transpose by a permutation (empty: reversed axes).
    Transpose(Vec<i64>),
    /// Slice with ONNX's starts, ends, axes and steps.
    Slice {
        /// First index per sliced axis.
        starts: Vec<i64>,
        /// End (exclusive) per sliced axis.
        ends: Vec<i64>,
        /// The sliced axes (all from 0 when absent).
        axes: Option<Vec<i64>>,
        /// Steps (1 when absent).
        steps: Option<Vec<i64>>,
    },
    /// Output `index` of a Split into `outputs` parts along `axis`.
    SplitPart {
        /// The split axis.
        axis: i64,
        /// Part sizes, when given.
        sizes: Option<Vec<i64>>,
        /// How many parts.
        outputs: usize,
        /// Which part.
        index: usize,
    },
    /// Gather along an axis with constant indices.
    Gather {
        /// The indices (int32 or int64).
        indices: Box<Tensor>,
        /// The axis.
        axis: i64,
    },
    /// Insert axes of size 1.
    Unsqueeze(Vec<i64>),
    /// Remove axes of size 1 (all when `None`).
    Squeeze(Option<Vec<i64>>),
    /// Reshape to a target (0 copies unless `allow_zero`, −1 infers).
    Reshape {
        /// The target shape.
        shape: Vec<i64>,
        /// ONNX's `allowzero`.
        allow_zero: bool,
    },
    /// Flatten to 2-D at an axis.
    Flatten(i64),
    /// Broadcast to a shape.
    Expand(Vec<i64>),
    /// Constant-mode Pad.
    Pad {
        /// Begins then ends, per axis.
        pads: Vec<i64>,
        /// The fill value (zero when absent).
        value: Option<Box<Tensor>>,
    },
}

impl Layout {
    /// The layout operator `node` computes when every operand other than its
    /// data input is known (`operand(k)` gives input `k`'s value, `None`
    /// when it is absent or not a constant); `Ok(None)` for other operators.
    pub fn parse<'a>(
        node: &crate::onnx::NodeProto,
        opset: i64,
        output: usize,
        operand: &dyn Fn(usize) -> Option<&'a Tensor>,
    ) -> Result<Option<Layout>, String> {
        use crate::onnx::attr::{find, int_attr, ints_attr, string_attr};
        let present = |k: usize| node.input.get(k).is_some_and(|v| !v.is_empty());
        let ints = |k: usize| -> Result<Option<Vec<i64>>, String> {
            if !present(k) {
                return Ok(None);
            }
            let t = operand(k).ok_or_else(|| format!("input {k} is not a constant"))?;
            super::ints_of(t).map(Some)
        };
        // Operands that moved from attributes to inputs at opset `moved`.
        let list = |attr: &str, k: usize, moved: i64| -> Result<Option<Vec<i64>>, String> {
            if opset < moved {
                Ok(ints_attr(node, attr))
            } else {
                ints(k)
            }
        };
        let axis = int_attr(node, "axis");
        Ok(Some(match node.op_type() {
            "Identity" => Layout::Identity,
            "Dropout" if node.output.len() == 1 => Layout::Identity,
            "Cast" => Layout::Cast(int_attr(node, "to").ok_or("Cast has no 'to'")? as i32),
            "Transpose" => Layout::Transpose(ints_attr(node, "perm").unwrap_or_default()),
            "Slice" if opset < 10 => Layout::Slice {
                starts: ints_attr(node, "starts").ok_or("Slice has no starts")?,
                ends: ints_attr(node, "ends").ok_or("Slice has no ends")?,
                axes: ints_attr(node, "axes"),
                steps: None,
            },
            "Slice" => Layout::Slice {
                starts: ints(1)?.ok_or("Slice has no starts")?,
                ends: ints(2)?.ok_or("Slice has no ends")?,
                axes: ints(3)?,
                steps: ints(4)?,
            },
            "Split" => Layout::SplitPart {
                axis: axis.unwrap_or(0),
                sizes: list("split", 1, 13)?,
                outputs: node.output.len(),
                index: output,
            },
            "Gather" => Layout::Gather {
                indices: Box::new(operand(1).ok_or("the indices are not a constant")?.clone()),
                axis: axis.unwrap_or(0),
            },
            "Unsqueeze" => Layout::Unsqueeze(list("axes", 1, 13)?.ok_or("Unsqueeze has no axes")?),
            "Squeeze" => Layout::Squeeze(list("axes", 1, 13)?),
            "Reshape" => Layout::Reshape {
                shape: ints(1)?.ok_or("Reshape has no shape")?,
                allow_zero: int_attr(node, "allowzero").unwrap_or(0) != 0,
            },
            "Flatten" => Layout::Flatten(axis.unwrap_or(1)),
            "Expand" => Layout::Expand(ints(1)?.ok_or("Expand has no shape")?),
            "Pad" => {
                if string_attr(node, "mode").is_some_and(|m| m != b"constant") {
                    return Err("only constant-mode Pad is run here".into());
                }
                if present(3) {
                    return Err("Pad with an axes input is not run here".into());
                }
                let value = match (opset < 11, present(2)) {
                    (true, _) => find(node, "value")
                        .map(|a| Box::new(Tensor::F32(ArrayD::from_elem(IxDyn(&[]), a.f())))),
                    (false, true) => Some(Box::new(
                        operand(2).ok_or("the pad value is not a constant")?.clone(),
                    )),
                    (false, false) => None,
                };
                Layout::Pad {
                    pads: list("pads", 1, 11)?.ok_or("Pad has no pads")?,
                    value,
                }
            }
            _ => return Ok(None),
        }))
    }

    /// Applies the operator to `x`.
    pub fn run(&self, x: &Tensor) -> Result<Tensor, String> {
        match self {
            Layout::Identity => Ok(x.clone()),
            Layout::Cast(to) => cast(x, *to),
            Layout::Transpose(perm) => transpose(x, perm),
            Layout::Slice {
                starts,
                ends,
                axes,
                steps,
            } => slice(x, starts, ends, axes.as_deref(), steps.as_deref()),
            Layout::SplitPart {
                axis,
                sizes,
                outputs,
                index,
            } => {
                let a = axis_index(*axis, x.shape().len())?;
                let sizes = split_sizes(x.shape()[a], sizes.as_deref(), *outputs)?;
                let n = *sizes
                    .get(*index)
                    .ok_or("Split has fewer parts than outputs")?;
                let start: usize = sizes[..*index].iter().sum();
                slice(
                    x,
                    &[start as i64],
                    &[(start + n) as i64],
                    Some(&[a as i64]),
                    None,
                )
            }
            Layout::Gather { indices, axis } => gather(x, indices, *axis),
            Layout::Unsqueeze(axes) => with_shape(x, &unsqueeze_dims(x.shape(), axes)?),
            Layout::Squeeze(axes) => with_shape(x, &squeeze_dims(x.shape(), axes.as_deref())?),
            Layout::Reshape { shape, allow_zero } => {
                with_shape(x, &reshape_dims(x.shape(), shape, *allow_zero)?)
            }
            Layout::Flatten(axis) => {
                let rank = x.shape().len();
                let a = if *axis < 0 { axis + rank as i64 } else { *axis };
                if !(0..=rank as i64).contains(&a) {
                    return Err(format!("Flatten axis {axis} for rank {rank}"));
                }
                let (outer, inner) = x.shape().split_at(a as usize);
                with_shape(x, &[outer.iter().product(), inner.iter().product()])
            }
            Layout::Expand(to) => expand(x, to),
            Layout::Pad { pads, value } => pad(x, pads, value.as_deref()),
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn ramp(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::I64(ArrayD::from_shape_vec(IxDyn(shape), (0..n as i64).collect()).unwrap())
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_f64_vec()
    }

    #[test]
    fn slices_follow_onnx_bounds_and_negative_steps() {
        let x = ramp(&[6]);
        // Reversal as torch.onnx writes it: start -1, end -INF, step -1.
        let r = slice(&x, &[-1], &[i64::MIN], Some(&[0]), Some(&[-1])).unwrap();
        assert_eq!(values(&r), [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]);
        let r = slice(&x, &[4], &[0], None, Some(&[-2])).unwrap();
        assert_eq!(values(&r), [4.0, 2.0]);
        let r = slice(&x, &[1], &[100], None, Some(&[2])).unwrap();
        assert_eq!(values(&r), [1.0, 3.0, 5.0]);
        let r = slice(&x, &[-2], &[-1], None, None).unwrap();
        assert_eq!(values(&r), [4.0]);
        let r = slice(&x, &[5], &[1], None, None).unwrap();
        assert_eq!(r.shape(), [0]);
    }

    #[test]
    fn gather_transpose_and_pad_move_values_where_onnx_says() {
        let x = ramp(&[2, 3]);
        let idx = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![-1, 0]).unwrap());
        let g = gather(&x, &idx, 1).unwrap();
        assert_eq!(g.shape(), [2, 2]);
        assert_eq!(values(&g), [2.0, 0.0, 5.0, 3.0]);
        let scalar = Tensor::I64(ArrayD::from_elem(IxDyn(&[]), 1));
        let g = gather(&x, &scalar, 0).unwrap();
        assert_eq!((g.shape(), values(&g)), (&[3][..], vec![3.0, 4.0, 5.0]));
        let t = transpose(&x, &[1, 0]).unwrap();
        assert_eq!(values(&t), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        // One row above, one column cropped on the left, two added on the right.
        let p = pad(&x, &[1, -1, 0, 2], None).unwrap();
        assert_eq!(p.shape(), [3, 4]);
        assert_eq!(
            values(&p),
            [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 4.0, 5.0, 0.0, 0.0]
        );
    }

    #[test]
    fn shapes_of_reshape_squeeze_and_split() {
        assert_eq!(reshape_dims(&[2, 3, 4], &[0, -1], false).unwrap(), [2, 12]);
        assert!(reshape_dims(&[2, 3], &[4, -1], false).is_err());
        assert_eq!(unsqueeze_dims(&[3, 4], &[0, -1]).unwrap(), [1, 3, 4, 1]);
        assert_eq!(squeeze_dims(&[1, 3, 1], None).unwrap(), [3]);
        assert!(squeeze_dims(&[1, 3], Some(&[1])).is_err());
        assert_eq!(split_sizes(7, None, 3).unwrap(), [3, 3, 1]);
        assert_eq!(split_sizes(80, Some(&[64, 16]), 2).unwrap(), [64, 16]);
        assert!(split_sizes(80, Some(&[64, 15]), 2).is_err());
    }

    #[test]
    fn cast_range_and_constant_of_shape() {
        let f = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[3]), vec![-1.7, 2.5, 3.9]).unwrap());
        assert_eq!(values(&cast(&f, 7).unwrap()), [-1.0, 2.0, 3.0]);
        let i = |v: i64| Tensor::I64(ArrayD::from_elem(IxDyn(&[]), v));
        assert_eq!(
            values(&range(&i(0), &i(5), &i(2)).unwrap()),
            [0.0, 2.0, 4.0]
        );
        assert_eq!(range(&i(5), &i(0), &i(1)).unwrap().shape(), [0]);
        let c = constant_of_shape(&[2, 2], None).unwrap();
        assert_eq!((c.dtype(), c.shape()), (DType::F32, &[2, 2][..]));
        assert_eq!(values(&shape_of(&[1, 3, 8, 8], -2, None)), [8.0, 8.0]);
        let e = expand(&ramp(&[3, 1]), &[2, 1, 2]).unwrap();
        assert_eq!(e.shape(), [2, 3, 2]);
        assert_eq!(values(&e)[..6], [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
    }
}
