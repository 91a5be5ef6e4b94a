//! The native engine's operators other than the GEMM kernels: shape checks
//! around the convolution and dense kernels, elementwise arithmetic with
//! NumPy broadcasting, pooling, and the layout operators. Each returns a
//! message (the caller names the node) instead of panicking on bad shapes.

use super::kernels::activation::{self, clamp_value, round_before_clamp};
use super::kernels::conv::{Conv, Dense};
use super::kernels::int_conv::{IntConv, IntDense, Quantizer};
use super::kernels::written_by;
use crate::onnx::NodeProto;
use crate::onnx::attr::int_attr;
pub use crate::ops::activation::Unary;
use crate::ops::layout::{axis_index, broadcast_shape};
use ndarray::{ArrayD, Axis, IxDyn, Zip};
use rayon::prelude::*;
use std::mem::MaybeUninit;

type OpResult = Result<ArrayD<f32>, String>;

fn contiguous(x: &ArrayD<f32>) -> std::borrow::Cow<'_, [f32]> {
    match x.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(x.iter().copied().collect()),
    }
}

fn shape_text(s: &[usize]) -> String {
    crate::tensor::format_shape(s)
}

/// A Conv on an `[N, C, H, W]` input, or a Conv followed by `Add(conv, residual)`
/// (fused by the engine, see `native::fuse_residual_adds`): the sum
/// is added in the kernel when `residual` has the output's shape, else it
/// is broadcast as the Add would.
pub fn conv(c: &Conv, x: &ArrayD<f32>, residual: Option<&ArrayD<f32>>) -> OpResult {
    let s = x.shape();
    if s.len() != 4 || s[1] != c.c_in() {
        return Err(format!(
            "the input is {} but the weight needs [N, {}, H, W]",
            shape_text(s),
            c.c_in()
        ));
    }
    let (n, h, w) = (s[0], s[2], s[3]);
    let (oh, ow) = c
        .out_hw(h, w)
        .ok_or_else(|| format!("the kernel does not fit the {h}×{w} input"))?;
    let shape = [n, c.c_out(), oh, ow];
    let fused = residual.filter(|r| r.shape() == shape);
    let data = contiguous(x);
    let r = fused.map(|r| contiguous(r));
    let (out, _) = c
        .run_adding(&data, n, h, w, r.as_deref())
        .ok_or_else(|| format!("the kernel does not fit the {h}×{w} input"))?;
    let out = ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())?;
    match residual {
        Some(r) if fused.is_none() => binary(Elementwise::Add, &out, r),
        _ => Ok(out),
    }
}

/// A Gemm on an `[N, K]` input (`two_d`), or a MatMul by a constant `[K, M]`
/// weight on an input `[.., K]` (rank 1 and above, NumPy's rule: a 1-D input
/// gives a 1-D output).
pub fn dense(d: &Dense, x: &ArrayD<f32>, two_d: bool) -> OpResult {
    let (k, m) = d.sizes();
    let s = x.shape();
    if s.last() != Some(&k) || two_d && s.len() != 2 {
        return Err(format!(
            "the input is {} but the weight needs [{}{k}]",
            shape_text(s),
            if two_d { "N, " } else { "…, " }
        ));
    }
    let rows = x.len() / k.max(1);
    let out = d.run(&contiguous(x), rows);
    let mut shape = s.to_vec();
    *shape.last_mut().expect("rank ≥ 1") = m;
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())
}

/// Values per parallel task of an elementwise pass.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// A copy of `x` in standard layout with `f` applied to every value, chunks
/// of the buffer in parallel.
fn map_chunks(x: &ArrayD<f32>, f: impl Fn(&mut [f32]) + Send + Sync) -> ArrayD<f32> {
    let mut out = x.as_standard_layout().into_owned();
    let values = out.as_slice_mut().expect("standard layout is contiguous");
    values.par_chunks_mut(ELEMENTWISE_CHUNK).for_each(f);
    out
}

/// A copy of `x` with `f` applied to each value (see [`map_chunks`]).
fn map_values(x: &ArrayD<f32>, f: impl Fn(f32) -> f32 + Send + Sync) -> ArrayD<f32> {
    map_chunks(x, |c| {
        for v in c {
            *v = f(*v);
        }
    })
}

/// Clip / Relu, with the same clamp the fused convolutions apply.
pub fn clamp(x: &ArrayD<f32>, lo: f32, hi: f32) -> ArrayD<f32> {
    map_chunks(x, |c| activation::Activation::Clamp(lo, hi).apply(c))
}

/// The logistic function.
pub fn sigmoid(x: &ArrayD<f32>) -> ArrayD<f32> {
    map_chunks(x, activation::sigmoid)
}

/// A fake-quant chain folded into one pass: `clamp(round(x·inv) + offset,
/// lo, hi) − offset`, the same float operations in the same order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FakeQuant {
    /// `1 / scale`.
    pub inv: f32,
    /// The integer offset, as float.
    pub offset: f32,
    /// Lowest integer level.
    pub lo: f32,
    /// Highest integer level.
    pub hi: f32,
}

impl FakeQuant {
    /// Applies the chain to every value.
    pub fn apply(&self, x: &ArrayD<f32>) -> ArrayD<f32> {
        let q = *self;
        map_values(x, move |v| {
            let t = round_before_clamp(v * q.inv) + q.offset;
            clamp_value(t, (q.lo, q.hi)) - q.offset
        })
    }
}

/// A per-tensor `QuantizeLinear → DequantizeLinear` pair in float:
/// `(clamp(round(x / scale) + zero, lo, hi) − zero) · scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantDequant {
    /// The scale.
    pub scale: f32,
    /// The zero point, as float.
    pub zero: f32,
    /// Lowest integer level (−128 or 0).
    pub lo: f32,
    /// Highest integer level (127 or 255).
    pub hi: f32,
}

impl QuantDequant {
    /// Applies the pair to every value.
    pub fn apply(&self, x: &ArrayD<f32>) -> ArrayD<f32> {
        let q = *self;
        map_values(x, move |v| {
            let t = round_before_clamp(v / q.scale) + q.zero;
            (clamp_value(t, (q.lo, q.hi)) - q.zero) * q.scale
        })
    }
}

/// `AscendQuant` in float: the int8 level of every value, held as a float
/// ([`Quantizer::level`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AscendQuantize(pub Quantizer);

impl AscendQuantize {
    /// Applies the quantization to every value.
    pub fn apply(&self, x: &ArrayD<f32>) -> ArrayD<f32> {
        let q = self.0;
        map_values(x, move |v| q.level(v))
    }
}

/// `AscendAntiQuant` on int8 levels held as floats: `(q − offset) · scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AscendAntiQuantize {
    /// `scale_d`.
    pub scale: f32,
    /// The offset, as float.
    pub offset: f32,
}

impl AscendAntiQuantize {
    /// Applies the dequantization to every value.
    pub fn apply(&self, x: &ArrayD<f32>) -> ArrayD<f32> {
        let q = *self;
        map_values(x, move |v| (v - q.offset) * q.scale)
    }
}

/// A deploy model's quantized Conv (with its quantization and
/// dequantization) on an `[N, C, H, W]` float input.
pub fn int_conv(c: &IntConv, q: &ArrayD<f32>) -> OpResult {
    let s = q.shape();
    if s.len() != 4 || s[1] != c.c_in() {
        return Err(format!(
            "the input is {} but the weight needs [N, {}, H, W]",
            shape_text(s),
            c.c_in()
        ));
    }
    let (n, h, w) = (s[0], s[2], s[3]);
    let (out, (oh, ow)) = c.run(&contiguous(q), n, h, w)?;
    let c_out = out.len() / (n * oh * ow).max(1);
    ArrayD::from_shape_vec(IxDyn(&[n, c_out, oh, ow]), out).map_err(|e| e.to_string())
}

/// A deploy model's quantized Gemm / MatMul (with its quantization and
/// dequantization) over the last axis of a float input.
pub fn int_dense(d: &IntDense, q: &ArrayD<f32>, two_d: bool) -> OpResult {
    let (k, n) = d.sizes();
    let s = q.shape();
    if s.len() < 2 || s[s.len() - 1] != k || two_d && s.len() != 2 {
        return Err(format!(
            "the input is {} but the weight needs [.., {k}]",
            shape_text(s)
        ));
    }
    let rows = q.len() / k.max(1);
    let out = d.run(&contiguous(q), rows);
    let mut shape = s.to_vec();
    *shape.last_mut().expect("rank ≥ 2") = n;
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())
}

/// A deploy model's MatMul of two quantized values (attention's `QKᵀ`,
/// `softmax·V`): both operands quantized as their `AscendQuant`s do, the
/// int8 × int8 products summed exactly in int32, then dequantized.
#[derive(Clone, Debug)]
pub struct IntMatMul {
    /// The first operand's quantization.
    pub a: Quantizer,
    /// The second operand's quantization.
    pub b: Quantizer,
    /// The dequantization factor (`scale_a · scale_b`).
    pub deq: f32,
}

impl IntMatMul {
    /// Products per exact float32 partial sum: centred levels lie within
    /// ±255, so 256 products stay below 2^24.
    const EXACT_PRODUCTS: usize = 256;

    /// Runs on the two float operands (NumPy's MatMul broadcasting).
    pub fn run(&self, a: &ArrayD<f32>, b: &ArrayD<f32>) -> OpResult {
        let centred = |x: &ArrayD<f32>, q: &Quantizer| x.mapv(|v| q.level(v) - q.offset);
        let (qa, qb) = (centred(a, &self.a), centred(b, &self.b));
        if qa.ndim() < 2 || qb.ndim() < 2 {
            return Err("a quantized MatMul needs operands of rank 2 or more".into());
        }
        let k = qa.shape()[qa.ndim() - 1];
        let (axis_a, axis_b) = (Axis(qa.ndim() - 1), Axis(qb.ndim() - 2));
        // Float GEMMs over chunks of K, each exact, summed in int32.
        let mut acc: Option<ndarray::ArrayD<i32>> = None;
        for k0 in (0..k.max(1)).step_by(Self::EXACT_PRODUCTS) {
            let k1 = (k0 + Self::EXACT_PRODUCTS).min(k);
            let part = matmul(
                &qa.slice_axis(axis_a, (k0..k1).into()).to_owned(),
                &qb.slice_axis(axis_b, (k0..k1).into()).to_owned(),
            )?;
            // Every partial sum is an integer below 2^24: exact in float32.
            let part = part.mapv(|v| v as i32);
            acc = Some(match acc {
                None => part,
                Some(sum) => sum + part,
            });
        }
        let acc = acc.ok_or("an empty MatMul")?;
        Ok(acc.mapv(|s| s as f32 * self.deq))
    }
}

/// The binary arithmetic operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elementwise {
    /// a + b
    Add,
    /// a − b
    Sub,
    /// a · b
    Mul,
    /// a / b
    Div,
    /// the larger (NaN if either is)
    Max,
    /// the smaller (NaN if either is)
    Min,
    /// a to the power b
    Pow,
}

impl Elementwise {
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            Elementwise::Add => a + b,
            Elementwise::Sub => a - b,
            Elementwise::Mul => a * b,
            Elementwise::Div => a / b,
            Elementwise::Max if a.is_nan() || b.is_nan() => f32::NAN,
            Elementwise::Max => a.max(b),
            Elementwise::Min if a.is_nan() || b.is_nan() => f32::NAN,
            Elementwise::Min => a.min(b),
            // Squares (LayerNorm's variance) without the general power.
            Elementwise::Pow if b == 2.0 => a * a,
            Elementwise::Pow => a.powf(b),
        }
    }
}

/// `a @ b` by NumPy's matmul rules: a 1-D operand is a row (first) or a
/// column (second) whose axis the result drops, leading axes broadcast.
/// Each matrix product runs on the GEMM, the batch in parallel.
pub fn matmul(a: &ArrayD<f32>, b: &ArrayD<f32>) -> OpResult {
    if a.ndim() == 0 || b.ndim() == 0 {
        return Err("MatMul of a scalar".into());
    }
    let a2 = if a.ndim() == 1 {
        a.view().insert_axis(Axis(0))
    } else {
        a.view()
    };
    let b2 = if b.ndim() == 1 {
        b.view().insert_axis(Axis(1))
    } else {
        b.view()
    };
    let (ra, rb) = (a2.ndim(), b2.ndim());
    let (m, k) = (a2.shape()[ra - 2], a2.shape()[ra - 1]);
    let (k2, n) = (b2.shape()[rb - 2], b2.shape()[rb - 1]);
    if k != k2 {
        return Err(format!(
            "operands {} and {} do not multiply",
            shape_text(a.shape()),
            shape_text(b.shape())
        ));
    }
    let batch = broadcast_shape(&a2.shape()[..ra - 2], &b2.shape()[..rb - 2]).ok_or_else(|| {
        format!(
            "the leading axes of {} and {} do not broadcast",
            shape_text(a.shape()),
            shape_text(b.shape())
        )
    })?;
    let count: usize = batch.iter().product();
    let total = [count, m, n]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&t| t <= crate::ops::layout::MAX_VALUES)
        .ok_or("the product would be too large")?;
    let full = |mut lead: Vec<usize>, r: usize, c: usize| {
        lead.extend([r, c]);
        lead
    };
    let a3 = a2
        .broadcast(full(batch.clone(), m, k))
        .ok_or("the first operand does not broadcast")?
        .as_standard_layout()
        .into_owned();
    let b3 = b2
        .broadcast(full(batch.clone(), k, n))
        .ok_or("the second operand does not broadcast")?
        .as_standard_layout()
        .into_owned();
    let (sa, sb) = (
        a3.as_slice().expect("standard"),
        b3.as_slice().expect("standard"),
    );
    let mut out = vec![0f32; total];
    if m * n > 0 {
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
            let a = &sa[i * m * k..(i + 1) * m * k];
            let b = &sb[i * k * n..(i + 1) * k * n];
            c.copy_from_slice(&super::kernels::conv::matrix_product(a, b, m, k, n));
        });
    }
    let mut shape = full(batch, m, n);
    if b.ndim() == 1 {
        shape.remove(shape.len() - 1);
    }
    if a.ndim() == 1 {
        shape.remove(shape.len() - if b.ndim() == 1 { 1 } else { 2 });
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())
}

/// `op` applied to every value of `x`.
pub fn unary(op: Unary, x: &ArrayD<f32>) -> ArrayD<f32> {
    match op {
        // The vectorised kernel (`ops::activation::erf` is the definition).
        Unary::Erf => map_chunks(x, activation::erf),
        Unary::Gelu => map_chunks(x, activation::gelu),
        _ => map_values(x, move |v| op.apply(v)),
    }
}

/// `a op b` with NumPy broadcasting.
pub fn binary(op: Elementwise, a: &ArrayD<f32>, b: &ArrayD<f32>) -> OpResult {
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| {
        format!(
            "shapes {} and {} do not broadcast",
            shape_text(a.shape()),
            shape_text(b.shape())
        )
    })?;
    if a.shape() == b.shape()
        && let (Some(x), Some(y)) = (a.as_slice(), b.as_slice())
    {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(
                x.par_chunks(ELEMENTWISE_CHUNK)
                    .zip(y.par_chunks(ELEMENTWISE_CHUNK)),
            )
            .for_each(|(o, (x, y))| {
                for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
                    *o = op.apply(*x, *y);
                }
            });
        return ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string());
    }
    // A scalar on either side (the fake-quant chains' scales and offsets).
    let scalar_side = match (a.len(), b.len()) {
        (_, 1) if a.shape() == shape.as_slice() => Some((a, b.iter().next().copied(), false)),
        (1, _) if b.shape() == shape.as_slice() => Some((b, a.iter().next().copied(), true)),
        _ => None,
    };
    if let Some((t, Some(c), swapped)) = scalar_side {
        return Ok(map_values(t, |x| {
            if swapped {
                op.apply(c, x)
            } else {
                op.apply(x, c)
            }
        }));
    }
    if let Some(out) = broadcast_rows(op, a, b, &shape) {
        return Ok(out);
    }
    let av = a.broadcast(IxDyn(&shape)).ok_or("broadcast failed")?;
    let bv = b.broadcast(IxDyn(&shape)).ok_or("broadcast failed")?;
    Ok(Zip::from(&av).and(&bv).map_collect(|x, y| op.apply(*x, *y)))
}

/// `a op b` where one operand has the result's shape and the other
/// broadcasts into it (attention's mask added to the scores): the result's
/// rows in parallel, each against its row of the smaller operand. `None`
/// when neither operand has the result's shape.
fn broadcast_rows(
    op: Elementwise,
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
    shape: &[usize],
) -> Option<ArrayD<f32>> {
    let (full, small, swapped) = if a.shape() == shape {
        (a, b, false)
    } else if b.shape() == shape {
        (b, a, true)
    } else {
        return None;
    };
    let rank = shape.len();
    let row = *shape.last()?;
    if row == 0 || small.ndim() > rank {
        return None;
    }
    let x = full.as_slice()?;
    let small = small.as_standard_layout();
    let y = small.as_slice()?;
    // The smaller operand's strides over the result's axes (0 where it broadcasts).
    let mut strides = vec![0usize; rank];
    let mut step = 1;
    for k in (0..small.ndim()).rev() {
        let d = small.shape()[k];
        strides[k + rank - small.ndim()] = if d == 1 { 0 } else { step };
        step *= d;
    }
    let along = strides[rank - 1];
    let rows_per_task = (ELEMENTWISE_CHUNK / row).max(1);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(row * rows_per_task)
        .zip(x.par_chunks(row * rows_per_task))
        .enumerate()
        .for_each(|(task, (o, x))| {
            for (k, (o, x)) in o.chunks_mut(row).zip(x.chunks(row)).enumerate() {
                // The row's index over the leading axes, then its offset in `small`.
                let mut r = task * rows_per_task + k;
                let mut offset = 0;
                for axis in (0..rank - 1).rev() {
                    offset += (r % shape[axis]) * strides[axis];
                    r /= shape[axis];
                }
                for (j, (o, &v)) in o.iter_mut().zip(x).enumerate() {
                    let w = y[offset + j * along];
                    *o = if swapped {
                        op.apply(w, v)
                    } else {
                        op.apply(v, w)
                    };
                }
            }
        });
    ArrayD::from_shape_vec(IxDyn(shape), out).ok()
}

/// Mean over H and W of an `[N, C, ...]` input, keeping the spatial axes as 1.
pub fn global_average_pool(x: &ArrayD<f32>) -> OpResult {
    let s = x.shape();
    if s.len() < 3 {
        return Err(format!(
            "the input is {}, need [N, C, spatial...]",
            shape_text(s)
        ));
    }
    let (nc, area): (usize, usize) = (s[0] * s[1], s[2..].iter().product());
    let data = contiguous(x);
    let out: Vec<f32> = (0..nc)
        .map(|i| {
            let sum: f32 = data[i * area..(i + 1) * area].iter().sum();
            sum / area as f32
        })
        .collect();
    let mut shape = vec![s[0], s[1]];
    shape.extend(std::iter::repeat_n(1, s.len() - 2));
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())
}

/// A 2-D MaxPool / AveragePool's attributes.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    pads: [usize; 4],
    ceil: bool,
    count_include_pad: bool,
}

impl Pool {
    /// The pool of a node, `None` for what the native engine does not run
    /// (`auto_pad` other than NOTSET/VALID, non-2-D kernels, a second output).
    pub fn from_node(node: &NodeProto) -> Option<Pool> {
        if node.output.len() != 1 {
            return None;
        }
        let w = crate::ops::window::Window2d::parse(node).ok()?;
        let k = w.kernel.filter(|&(h, w)| h > 0 && w > 0)?;
        Some(Pool {
            kernel: k,
            stride: w.strides,
            dilation: w.dilations,
            pads: w.pads,
            ceil: int_attr(node, "ceil_mode").unwrap_or(0) != 0,
            count_include_pad: int_attr(node, "count_include_pad").unwrap_or(0) != 0,
        })
    }

    /// Runs on `[N, C, H, W]`: the maximum (`max`) or the mean of each window.
    pub fn run(&self, x: &ArrayD<f32>, max: bool) -> OpResult {
        let s = x.shape();
        if s.len() != 4 {
            return Err(format!("the input is {}, need [N, C, H, W]", shape_text(s)));
        }
        let (nc, h, w) = (s[0] * s[1], s[2], s[3]);
        let (kh, kw) = self.kernel;
        let (sy, sx) = self.stride;
        let (dy, dx) = self.dilation;
        let [pt, pl, pb, pr] = self.pads;
        let oh = self
            .out_size_begin(h, pt, pb, kh, sy, dy)
            .ok_or("the window does not fit the input")?;
        let ow = self
            .out_size_begin(w, pl, pr, kw, sx, dx)
            .ok_or("the window does not fit the input")?;
        let data = contiguous(x);
        let mut out = vec![0f32; nc * oh * ow];
        if max {
            self.max_separable(&data, (h, w), (oh, ow), &mut out);
            return ArrayD::from_shape_vec(IxDyn(&[s[0], s[1], oh, ow]), out)
                .map_err(|e| e.to_string());
        }
        out.par_chunks_mut((oh * ow).max(1))
            .enumerate()
            .for_each(|(p, o)| {
                let plane = &data[p * h * w..(p + 1) * h * w];
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = if max { f32::NEG_INFINITY } else { 0.0 };
                        let mut count = 0usize;
                        let mut padded_count = 0usize;
                        for ky in 0..kh {
                            let iy = (oy * sy + ky * dy) as isize - pt as isize;
                            for kx in 0..kw {
                                let ix = (ox * sx + kx * dx) as isize - pl as isize;
                                let inside_padded =
                                    iy < (h + pb) as isize && ix < (w + pr) as isize;
                                if inside_padded {
                                    padded_count += 1;
                                }
                                if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                    continue;
                                }
                                let v = plane[iy as usize * w + ix as usize];
                                if max {
                                    acc = acc.max(v);
                                } else {
                                    acc += v;
                                }
                                count += 1;
                            }
                        }
                        o[oy * ow + ox] = if max {
                            acc
                        } else {
                            let d = if self.count_include_pad {
                                padded_count
                            } else {
                                count
                            };
                            acc / d.max(1) as f32
                        };
                    }
                }
            });
        ArrayD::from_shape_vec(IxDyn(&[s[0], s[1], oh, ow]), out).map_err(|e| e.to_string())
    }

    /// Max pooling as two passes over a plane padded with −∞: the maximum
    /// over each window's columns for every row, then over its rows.
    fn max_separable(
        &self,
        data: &[f32],
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        out: &mut [f32],
    ) {
        let (kh, kw) = self.kernel;
        let (sy, sx) = self.stride;
        let (dy, dx) = self.dilation;
        let [pt, pl, _, _] = self.pads;
        // Wide and tall enough for every window, ceil mode's last one included.
        let wp = (w + pl).max((ow - 1) * sx + (kw - 1) * dx + 1);
        let hp = (h + pt).max((oh - 1) * sy + (kh - 1) * dy + 1);
        let pool = |(padded, rows): &mut (Vec<f32>, Vec<f32>), (o, plane): (&mut [f32], &[f32])| {
            padded.clear();
            padded.resize(hp * wp, f32::NEG_INFINITY);
            for y in 0..h {
                let dst = (y + pt) * wp + pl;
                padded[dst..dst + w].copy_from_slice(&plane[y * w..(y + 1) * w]);
            }
            rows.clear();
            rows.resize(hp * ow, f32::NEG_INFINITY);
            for y in 0..hp {
                let src = &padded[y * wp..(y + 1) * wp];
                let dst = &mut rows[y * ow..(y + 1) * ow];
                if sx == 1 {
                    // Contiguous runs: the compiler vectorises the
                    // maximum (0.075 → 0.055 ms on the detector's
                    // 5×5 pools of 128 planes of 10×10).
                    for kx in 0..kw {
                        let from = &src[kx * dx..kx * dx + ow];
                        for (d, &v) in dst.iter_mut().zip(from) {
                            *d = if v > *d { v } else { *d };
                        }
                    }
                } else {
                    for kx in 0..kw {
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let v = src[ox * sx + kx * dx];
                            *d = if v > *d { v } else { *d };
                        }
                    }
                }
            }
            for oy in 0..oh {
                let dst = &mut o[oy * ow..(oy + 1) * ow];
                dst.fill(f32::NEG_INFINITY);
                for ky in 0..kh {
                    let r = oy * sy + ky * dy;
                    for (d, &v) in dst.iter_mut().zip(&rows[r * ow..(r + 1) * ow]) {
                        *d = if v > *d { v } else { *d };
                    }
                }
            }
        };
        out.par_chunks_mut((oh * ow).max(1))
            .zip(data.par_chunks((h * w).max(1)))
            .for_each_init(|| (Vec::new(), Vec::new()), pool);
    }

    /// Output size along one axis with begin and end padding (ONNX's rule,
    /// including ceil mode's dropped last window).
    fn out_size_begin(
        &self,
        n: usize,
        begin: usize,
        end: usize,
        k: usize,
        s: usize,
        d: usize,
    ) -> Option<usize> {
        let span = d * (k - 1) + 1;
        let total = n + begin + end;
        if total < span {
            return None;
        }
        let mut out = if self.ceil {
            (total - span).div_ceil(s) + 1
        } else {
            (total - span) / s + 1
        };
        if self.ceil && (out - 1) * s >= n + begin {
            out -= 1;
        }
        Some(out)
    }
}

/// Concat along `axis`.
pub fn concat(args: &[&ArrayD<f32>], axis: i64) -> OpResult {
    let a = axis_index(axis, args[0].ndim())?;
    if a >= args[0].ndim() {
        return Err(format!("axis {axis} is out of range"));
    }
    let first = args[0].shape();
    let fits = args.iter().all(|x| {
        x.ndim() == first.len() && (0..first.len()).all(|i| i == a || x.shape()[i] == first[i])
    });
    let slices: Option<Vec<&[f32]>> = args.iter().map(|x| x.as_slice()).collect();
    if let (true, Some(slices)) = (fits, slices) {
        return Ok(concat_contiguous(args, &slices, a));
    }
    let views: Vec<_> = args.iter().map(|x| x.view()).collect();
    ndarray::concatenate(Axis(a), &views).map_err(|_| {
        let shapes: Vec<String> = args.iter().map(|x| shape_text(x.shape())).collect();
        format!(
            "shapes {} do not concatenate along axis {axis}",
            shapes.join(", ")
        )
    })
}

/// `concat` of inputs in standard layout whose shapes agree off `axis`: for
/// each index before the axis, each input's block in turn, copied in pieces
/// of at most 16 Ki values, in parallel for outputs from 32 Ki values.
fn concat_contiguous(args: &[&ArrayD<f32>], slices: &[&[f32]], axis: usize) -> ArrayD<f32> {
    let mut shape = args[0].shape().to_vec();
    shape[axis] = args.iter().map(|x| x.shape()[axis]).sum();
    let outer: usize = shape[..axis].iter().product();
    let blocks: Vec<usize> = args
        .iter()
        .map(|x| x.shape()[axis..].iter().product())
        .collect();
    let len = outer * blocks.iter().sum::<usize>();
    let fill = |out: &mut [MaybeUninit<f32>]| {
        let mut pieces = Vec::new();
        let mut rest = out;
        for o in 0..outer {
            for (src, &n) in slices.iter().zip(&blocks) {
                for part in src[o * n..(o + 1) * n].chunks(1 << 14) {
                    let (dst, tail) = std::mem::take(&mut rest).split_at_mut(part.len());
                    pieces.push((dst, part));
                    rest = tail;
                }
            }
        }
        let copy = |(dst, src): (&mut [MaybeUninit<f32>], &[f32])| {
            dst.write_copy_of_slice(src);
        };
        if len >= 1 << 15 {
            pieces.into_par_iter().for_each(copy);
        } else {
            pieces.into_iter().for_each(copy);
        }
    };
    // SAFETY: the pieces tile the output: every value is copied once.
    let out = unsafe { written_by(len, fill) };
    ArrayD::from_shape_vec(IxDyn(&shape), out).expect("the shape holds `len` values")
}

/// `e^d` for a softmax term `d = x − max ≤ 0`, exactly 0 below e^−80
/// (1.8e−35 of the largest term): a masked attention score (−3.4e38
/// added) would otherwise leave subnormal floats, and every operation
/// producing or reading one is many times slower (a MiniLM's attention
/// MatMul took 19 ms instead of 2).
#[inline(always)]
fn exp_or_zero(d: f32) -> f32 {
    if d < -80.0 {
        0.0
    } else {
        activation::exp_approx(d)
    }
}

/// `q`, or 0 when it is below the smallest normal float (see [`exp_or_zero`]).
#[inline(always)]
fn normal_or_zero(q: f32) -> f32 {
    if q < f32::MIN_POSITIVE { 0.0 } else { q }
}

/// Softmax along `axis`, or over everything from `axis` on (`flat`, before opset 13).
pub fn softmax(x: &ArrayD<f32>, axis: i64, flat: bool) -> OpResult {
    let a = axis_index(axis, x.ndim())?;
    if a >= x.ndim() {
        return Err(format!("axis {axis} is out of range"));
    }
    let rows = |v: &mut [f32]| {
        let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // The exponentials first (a loop that vectorises), then their sum.
        for e in v.iter_mut() {
            *e = exp_or_zero(*e - m);
        }
        let sum: f32 = v.iter().sum();
        for e in v.iter_mut() {
            *e = normal_or_zero(*e / sum);
        }
    };
    let mut out = x.as_standard_layout().into_owned();
    let inner: usize = if flat {
        1
    } else {
        x.shape()[a + 1..].iter().product()
    };
    let n: usize = if flat {
        x.shape()[a..].iter().product()
    } else {
        x.shape()[a]
    };
    let Some(s) = out.as_slice_mut() else {
        unreachable!("standard layout")
    };
    if n == 0 || inner == 0 {
        return Ok(out);
    }
    if inner == 1 {
        // Rows in parallel, a few thousand values per task.
        let per_task = (4096 / n).max(1) * n;
        s.par_chunks_mut(per_task)
            .for_each(|chunk| chunk.chunks_mut(n).for_each(rows));
        return Ok(out);
    }
    // Along an inner axis: each block of `n` rows of `inner` values is
    // reduced row by row, so every pass reads contiguous memory.
    s.par_chunks_mut(n * inner).for_each(|block| {
        let mut m = vec![f32::NEG_INFINITY; inner];
        for row in block.chunks(inner) {
            m.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
        }
        let mut sum = vec![0.0f32; inner];
        for row in block.chunks_mut(inner) {
            for ((e, m), s) in row.iter_mut().zip(&m).zip(&mut sum) {
                *e = exp_or_zero(*e - m);
                *s += *e;
            }
        }
        for row in block.chunks_mut(inner) {
            row.iter_mut()
                .zip(&sum)
                .for_each(|(e, s)| *e = normal_or_zero(*e / s));
        }
    });
    Ok(out)
}

/// Nearest resizing by whole factors: output index `i` reads `i / scale`.
pub fn resize_nearest(x: &ArrayD<f32>, scales: &[f32]) -> OpResult {
    if scales.len() != x.ndim() {
        return Err(format!(
            "{} scales for a rank-{} input",
            scales.len(),
            x.ndim()
        ));
    }
    let factors: Vec<usize> = scales.iter().map(|s| *s as usize).collect();
    let shape: Vec<usize> = x.shape().iter().zip(&factors).map(|(d, f)| d * f).collect();
    let r = x.ndim();
    if r >= 2 && factors[..r - 2].iter().all(|&f| f == 1) {
        // Spatial factors only: repeat each value of a row, then each row.
        let (h, w) = (x.shape()[r - 2], x.shape()[r - 1]);
        let (fy, fx) = (factors[r - 2], factors[r - 1]);
        let data = contiguous(x);
        let (oh, ow) = (h * fy, w * fx);
        let fill = |out: &mut [MaybeUninit<f32>]| {
            out.par_chunks_mut((oh * ow).max(1))
                .zip(data.par_chunks((h * w).max(1)))
                .for_each(|(o, plane)| {
                    for y in 0..h {
                        let first = &mut o[y * fy * ow..(y * fy + 1) * ow];
                        let row = &plane[y * w..(y + 1) * w];
                        for (chunk, v) in first.chunks_exact_mut(fx).zip(row) {
                            chunk.fill(MaybeUninit::new(*v));
                        }
                        for k in 1..fy {
                            o.copy_within(y * fy * ow..(y * fy + 1) * ow, (y * fy + k) * ow);
                        }
                    }
                });
        };
        // SAFETY: every output row is written: the first of each group of
        // `fy` value by value, the others copied from it.
        let out = unsafe { written_by(data.len() * fy * fx, fill) };
        return ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string());
    }
    let mut src = vec![0usize; shape.len()];
    Ok(ArrayD::from_shape_fn(IxDyn(&shape), |idx| {
        for (i, s) in src.iter_mut().enumerate() {
            *s = idx[i] / factors[i];
        }
        x[IxDyn(&src)]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One operand of the result's shape, the other broadcast into it on
    /// either side: the row-by-row path equals element-by-element
    /// arithmetic on ndarray's broadcast views, for non-commutative ops.
    #[test]
    fn broadcast_rows_equal_elementwise_arithmetic() {
        let full = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4, 5]), |i| {
            (i[0] * 60 + i[1] * 20 + i[2] * 5 + i[3]) as f32 * 0.37 - 20.0
        });
        for small_shape in [
            &[5][..],
            &[1, 5],
            &[3, 1, 5],
            &[2, 1, 1, 5],
            &[4, 1],
            &[2, 3, 4, 1],
            &[2, 1, 4, 1],
        ] {
            let small = ArrayD::from_shape_fn(IxDyn(small_shape), |i| {
                1.5 + (0..small_shape.len())
                    .map(|k| (k + 1) * i[k])
                    .sum::<usize>() as f32
            });
            let sv = small.broadcast(full.raw_dim()).unwrap();
            for op in [Elementwise::Sub, Elementwise::Div] {
                let want = Zip::from(&full)
                    .and(&sv)
                    .map_collect(|x, y| op.apply(*x, *y));
                assert_eq!(
                    binary(op, &full, &small).unwrap(),
                    want,
                    "{small_shape:?} {op:?}"
                );
                let want = Zip::from(&sv)
                    .and(&full)
                    .map_collect(|x, y| op.apply(*x, *y));
                assert_eq!(
                    binary(op, &small, &full).unwrap(),
                    want,
                    "{small_shape:?} {op:?} swapped"
                );
            }
        }
    }

    /// A masked attention row (−3.4e38 added, as BERT exports do): the
    /// masked terms are exactly 0, never subnormal, and the others the
    /// softmax of the unmasked scores computed here, along either axis.
    #[test]
    fn masked_softmax_terms_are_zero_not_subnormal() {
        let scores = [0.5f32, -1.0, 2.0, -3.4e38, -3.4e38, -90.0];
        let kept = &scores[..3];
        let max = 2.0f64;
        let sum: f64 = kept.iter().map(|&v| (f64::from(v) - max).exp()).sum();
        let want: Vec<f64> = kept
            .iter()
            .map(|&v| (f64::from(v) - max).exp() / sum)
            .collect();
        let row = ArrayD::from_shape_vec(IxDyn(&[1, 6]), scores.to_vec()).unwrap();
        let column = ArrayD::from_shape_vec(IxDyn(&[6, 1]), scores.to_vec()).unwrap();
        for (x, axis) in [(row, 1), (column, 0)] {
            let y = softmax(&x, axis, false).unwrap();
            let y: Vec<f32> = y.iter().copied().collect();
            for (k, w) in want.iter().enumerate() {
                assert!((f64::from(y[k]) - w).abs() < 1e-6, "{y:?}");
            }
            assert_eq!(&y[3..], &[0.0, 0.0, 0.0], "axis {axis}");
            assert!(y.iter().all(|v| *v == 0.0 || v.is_normal()), "{y:?}");
        }
    }

    #[test]
    fn matmul_of_two_values_broadcasts_and_drops_vector_axes() {
        // Batch of two 2×2 matrices times one 2×1 shared by both (broadcast).
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 2, 2]), vec![1., 2., 3., 4., 0., 1., 1., 0.])
            .unwrap();
        let b = ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![10., 1.]).unwrap();
        let y = matmul(&a, &b).unwrap();
        assert_eq!(y.shape(), &[2, 2, 1]);
        // [1 2; 3 4]·[10; 1] = [12; 34], [0 1; 1 0]·[10; 1] = [1; 10].
        assert_eq!(y.as_slice().unwrap(), &[12., 34., 1., 10.]);
        // A 1-D second operand: its axis is dropped.
        let v = ArrayD::from_shape_vec(IxDyn(&[2]), vec![10., 1.]).unwrap();
        let y = matmul(&a, &v).unwrap();
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(y.as_slice().unwrap(), &[12., 34., 1., 10.]);
        // Both 1-D: a scalar (10·10 + 1·1).
        assert_eq!(matmul(&v, &v).unwrap().shape(), &[] as &[usize]);
        assert_eq!(matmul(&v, &v).unwrap().iter().next(), Some(&101.));
        assert!(matmul(&a, &ArrayD::zeros(IxDyn(&[3, 1]))).is_err());
    }

    #[test]
    fn matmul_by_a_constant_keeps_the_leading_axes() {
        // W = [[1, 2, 3], [4, 5, 6]] (K = 2, M = 3); each row [a, b] -> [a + 4b, 2a + 5b, 3a + 6b].
        let d = Dense::new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3, false, None);
        let x = ArrayD::from_shape_vec(IxDyn(&[2, 1, 2]), vec![1.0, 0.0, 2.0, -1.0]).unwrap();
        let y = dense(&d, &x, false).unwrap();
        assert_eq!(y.shape(), [2, 1, 3]);
        assert_eq!(
            y.iter().copied().collect::<Vec<_>>(),
            [1.0, 2.0, 3.0, -2.0, -1.0, 0.0]
        );
        let v = ArrayD::from_shape_vec(IxDyn(&[2]), vec![0.5, 1.0]).unwrap();
        let y = dense(&d, &v, false).unwrap();
        assert_eq!(
            (y.shape(), y.iter().copied().collect::<Vec<_>>()),
            (&[3][..], vec![4.5, 6.0, 7.5])
        );
        assert!(dense(&d, &x, true).is_err(), "a Gemm takes 2-D inputs only");
    }

    /// `[n, c, h, w]` holding a different value everywhere.
    fn numbered(shape: [usize; 4], from: f32) -> ArrayD<f32> {
        let len = shape.iter().product();
        ArrayD::from_shape_vec(IxDyn(&shape), (0..len).map(|i| from + i as f32).collect()).unwrap()
    }

    #[test]
    fn concat_places_every_value_as_ndarray_does() {
        // Blocks past one 16 Ki piece, outputs past the parallel size, and
        // every axis; ndarray's own concatenation is the reference.
        for axis in 0..4 {
            let mut shapes = [[2, 12, 40, 40], [2, 12, 40, 40], [2, 12, 40, 40]];
            for (i, s) in shapes.iter_mut().enumerate() {
                s[axis] += i;
            }
            let xs: Vec<ArrayD<f32>> = shapes
                .iter()
                .enumerate()
                .map(|(i, &s)| numbered(s, 1e6 * i as f32))
                .collect();
            let refs: Vec<&ArrayD<f32>> = xs.iter().collect();
            let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
            let want = ndarray::concatenate(Axis(axis), &views).unwrap();
            for a in [axis as i64, axis as i64 - 4] {
                let got = concat(&refs, a).unwrap();
                assert_eq!(got.shape(), want.shape(), "axis {a}");
                assert!(got.iter().eq(want.iter()), "axis {a}: values differ");
            }
        }
        // Shapes that disagree off the axis: an error, not a panic.
        let (a, b) = (numbered([1, 2, 3, 4], 0.0), numbered([1, 2, 5, 4], 0.0));
        assert!(concat(&[&a, &b], 1).is_err());
    }
}
