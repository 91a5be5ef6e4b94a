//! A deploy model's quantized layers as the device computes them: the
//! float input quantized to int8 levels `q`, `q − offset` times the int8
//! weight, summed in int32 with the int32 bias, then converted to float and
//! multiplied by the dequantization scale of the output channel —
//! `AscendQuant → Conv | Gemm | MatMul → AscendDequant` in one pass.
//! Padding holds the offset (zero after the subtraction).
//!
//! The input is quantized once into an i16 buffer of `q − offset`; the
//! products run on [`super::int_gemm`] over an im2col of that buffer, per
//! image, group and block of output positions.
//!
//! Depthwise layers sum at most [`EXACT_TAPS`] products per output, each
//! below 2^15 in magnitude (`|q − offset| ≤ 255`, `|w| ≤ 128`), so every
//! partial sum is an integer below 2^24, which float32 holds exactly in any
//! order of addition, with or without fused multiply-adds: they run on the
//! SIMD float depthwise kernel ([`super::depthwise`]) on `q − offset` and
//! the weight as floats, and each sum converts to its exact int32.

use super::activation::{clamp_value, round_before_clamp};
use super::conv::{ConvGeometry, SharedOut, is_depthwise};
use super::depthwise::depthwise;
use super::int_gemm::{PackedIntWeight, PairedColumns, int_gemm};
use super::written_by;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output positions per task.
const BLOCK: usize = 512;

/// Products one float32 sum may hold and stay an exact integer: 512 · 2^15 = 2^24.
pub const EXACT_TAPS: usize = 512;

/// `AscendQuant`'s arithmetic: `clamp(round(x·scale + offset), −128, 127)`,
/// the lowering's float operations in its order (NaN becomes level 0, as
/// its cast to int8 does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantizer {
    /// The attribute `scale` (`1 / scale_d`).
    pub scale: f32,
    /// The offset, an integer in [−128, 127], as float.
    pub offset: f32,
}

impl Quantizer {
    /// The int8 level of `x`, as a float (an integer in [−128, 127]).
    #[inline]
    pub fn level(&self, x: f32) -> f32 {
        let t = round_before_clamp(x * self.scale + self.offset);
        let t = clamp_value(t, (-128.0, 127.0));
        if t.is_nan() { 0.0 } else { t }
    }

    /// `level − offset` of every value, in parallel, as `T`.
    fn centre_all<T: Copy + Default + Send>(
        &self,
        x: &[f32],
        cast: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        let mut out = vec![T::default(); x.len()];
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, x)| {
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = cast(self.level(v) - self.offset);
                }
            });
        out
    }
}

/// What follows the int32 sum: bias, then the float scale per channel.
pub struct Requant {
    /// The int32 bias per output channel (empty: none).
    pub bias: Vec<i32>,
    /// The dequantization scale: one value, or one per output channel.
    pub deq: Vec<f32>,
}

impl Requant {
    /// Output channel `c`'s float value for the int32 sum `s`.
    #[inline]
    fn value(&self, c: usize, s: i32) -> f32 {
        let bias = self.bias.get(c).copied().unwrap_or(0);
        let deq = if self.deq.len() == 1 {
            self.deq[0]
        } else {
            self.deq[c]
        };
        s.wrapping_add(bias) as f32 * deq
    }

    /// Channel `c`'s float outputs for its int32 sums.
    #[inline]
    fn apply(&self, c: usize, sums: &[i32], out: &mut [MaybeUninit<f32>]) {
        let bias = self.bias.get(c).copied().unwrap_or(0);
        let deq = if self.deq.len() == 1 {
            self.deq[0]
        } else {
            self.deq[c]
        };
        for (o, &s) in out.iter_mut().zip(sums) {
            o.write(s.wrapping_add(bias) as f32 * deq);
        }
    }

    /// The same for sums held exactly in float32 (integers below 2^24).
    #[inline]
    fn apply_exact_floats(&self, c: usize, sums: &mut [f32]) {
        let bias = self.bias.get(c).copied().unwrap_or(0);
        let deq = if self.deq.len() == 1 {
            self.deq[0]
        } else {
            self.deq[c]
        };
        for s in sums {
            // SAFETY: the sum is a finite integer below 2^24 in magnitude
            // (the module's note), so the conversion is exact.
            let exact = unsafe { s.to_int_unchecked::<i32>() };
            *s = exact.wrapping_add(bias) as f32 * deq;
        }
    }

    /// Whether the bias and scales fit `channels` outputs.
    pub fn fits(&self, channels: usize) -> bool {
        (self.bias.is_empty() || self.bias.len() == channels)
            && (self.deq.len() == 1 || self.deq.len() == channels)
    }
}

/// A quantized 2-D convolution (NCHW) ready to run.
pub struct IntConv {
    geometry: ConvGeometry,
    c_in: usize,
    c_out: usize,
    quantizer: Quantizer,
    /// One packed weight per group (GEMM path; empty for depthwise layers).
    packed: Vec<PackedIntWeight>,
    /// The taps per channel as floats (depthwise layers only).
    taps: Vec<f32>,
    requant: Requant,
}

impl IntConv {
    /// A convolution with int8 weight `[C_out, C_in/group, kh, kw]`
    /// (flattened) whose input is quantized by `quantizer`.
    pub fn new(
        geometry: ConvGeometry,
        c_in: usize,
        c_out: usize,
        quantizer: Quantizer,
        weight: &[i8],
        requant: Requant,
    ) -> IntConv {
        let g = geometry.group;
        let k = c_in / g * geometry.kernel.0 * geometry.kernel.1;
        let m = c_out / g;
        let exact_in_floats = geometry.kernel.0 * geometry.kernel.1 <= EXACT_TAPS;
        let (packed, taps) = if is_depthwise(&geometry, c_in, c_out) && exact_in_floats {
            (Vec::new(), weight.iter().map(|&v| f32::from(v)).collect())
        } else {
            let packed = (0..g)
                .map(|i| PackedIntWeight::new(&weight[i * m * k..(i + 1) * m * k], m, k))
                .collect();
            (packed, Vec::new())
        };
        IntConv {
            geometry,
            c_in,
            c_out,
            quantizer,
            packed,
            taps,
            requant,
        }
    }

    /// Input channels.
    pub fn c_in(&self) -> usize {
        self.c_in
    }

    /// Runs on `x` of shape `[n, C_in, h, w]`; returns `[n, C_out, oh, ow]`
    /// and `(oh, ow)`.
    pub fn run(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, (usize, usize)), String> {
        let g = &self.geometry;
        let (oh, ow) = g
            .out_hw(h, w)
            .ok_or("the kernel does not fit in the padded input")?;
        let cols = oh * ow;
        if !self.taps.is_empty() {
            return Ok((self.depthwise(x, n, (h, w), (oh, ow)), (oh, ow)));
        }
        // SAFETY: within ±255 and integral (see `Quantizer::centred`).
        let q: Vec<i16> = self
            .quantizer
            .centre_all(x, |v| unsafe { v.to_int_unchecked::<i32>() } as i16);
        let q = q.as_slice();
        let groups = g.group;
        let (cg, mg) = (self.c_in / groups, self.c_out / groups);
        let tasks: Vec<(usize, usize, usize)> = (0..n)
            .flat_map(|img| {
                (0..groups)
                    .flat_map(move |gi| (0..cols).step_by(BLOCK).map(move |c0| (img, gi, c0)))
            })
            .collect();
        // Each task requantizes its own block straight into the output
        // (disjoint rows × columns; together every value).
        let fill = |out: &mut [MaybeUninit<f32>]| {
            let dst = SharedOut::new(out);
            tasks.par_iter().for_each(|&(img, gi, c0)| {
                let c1 = (c0 + BLOCK).min(cols);
                let plane = &q[(img * self.c_in + gi * cg) * h * w..][..cg * h * w];
                let b = self.im2col(plane, (h, w), (ow, c0, c1));
                let mut acc = vec![0; mg * (c1 - c0)];
                int_gemm(&self.packed[gi], &b, &mut acc);
                for (r, sums) in acc.chunks_exact((c1 - c0).max(1)).enumerate() {
                    let c = gi * mg + r;
                    // SAFETY: tasks differ in sample, group or column block,
                    // so no two write the same values.
                    let d = unsafe { dst.slice((img * self.c_out + c) * cols + c0, c1 - c0) };
                    self.requant.apply(c, sums, d);
                }
            });
        };
        // SAFETY: the tasks cover every sample, group, output channel of the
        // group and block of columns, and each writes its block whole.
        Ok((unsafe { written_by(n * self.c_out * cols, fill) }, (oh, ow)))
    }

    /// A depthwise layer: the float kernel on `q − offset` (exact, see the
    /// module's note), then each plane's sums requantized.
    fn depthwise(
        &self,
        x: &[f32],
        n: usize,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
    ) -> Vec<f32> {
        let shape = self.geometry.depthwise_shape(h, w);
        let q: Vec<f32> = self.quantizer.centre_all(x, |v| v);
        let unbounded = (f32::NEG_INFINITY, f32::INFINITY);
        let mut out = depthwise(
            &shape,
            n * self.c_out,
            self.c_out,
            &q,
            &self.taps,
            None,
            unbounded,
        );
        out.par_chunks_mut((oh * ow).max(1))
            .enumerate()
            .for_each(|(plane, sums)| self.requant.apply_exact_floats(plane % self.c_out, sums));
        out
    }

    /// The columns `c0..c1` (of `ow` per output row) of one group's im2col,
    /// `q − offset` with zeros where the window leaves the image.
    fn im2col(
        &self,
        plane: &[i16],
        (h, w): (usize, usize),
        (ow, c0, c1): (usize, usize, usize),
    ) -> PairedColumns {
        let g = &self.geometry;
        let (kh, kw) = g.kernel;
        let cg = plane.len() / (h * w);
        let width = c1 - c0;
        let mut b = PairedColumns::zeros(cg * kh * kw, width);
        for ci in 0..cg {
            let src = &plane[ci * h * w..(ci + 1) * h * w];
            for ky in 0..kh {
                for kx in 0..kw {
                    let r = (ci * kh + ky) * kw + kx;
                    // Row r's values sit two apart from its first column on.
                    let row = &mut b.data[(r / 2) * width * 2 + r % 2..];
                    let mut col = c0;
                    while col < c1 {
                        let (oy, ox0) = (col / ow, col % ow);
                        let run = (ow - ox0).min(c1 - col);
                        let iy = (oy * g.stride.0 + ky * g.dilation.0).wrapping_sub(g.pads[0]);
                        if iy < h {
                            let line = &src[iy * w..(iy + 1) * w];
                            for ox in ox0..ox0 + run {
                                let ix =
                                    (ox * g.stride.1 + kx * g.dilation.1).wrapping_sub(g.pads[1]);
                                if ix < w {
                                    row[(col - c0 + ox - ox0) * 2] = line[ix];
                                }
                            }
                        }
                        col += run;
                    }
                }
            }
        }
        b
    }
}

/// A quantized `x · W` (Gemm with `transB = 0`, or MatMul with a constant
/// 2-D weight) over the last axis of `x`.
///
/// The sums run on the float GEMM, exactly: a centred level (within ±255)
/// times an int8 weight stays below 2^15, so [`EXACT_TAPS`] of them sum to
/// an integer below 2^24, which float32 holds exactly whatever the order
/// of the additions; K is cut into such chunks and the chunks' sums added
/// in int32. On MiniLM's FFN layers (512 rows, one thread) 15 → 5.5 ms
/// against the int16-pair kernel the convolutions use.
pub struct IntDense {
    k: usize,
    n: usize,
    /// The weight `[K, N]` as floats (integers in [−128, 127]).
    weight: Vec<f32>,
    quantizer: Quantizer,
    requant: Requant,
}

impl IntDense {
    /// A layer with int8 weight `[k, n]` (row-major) whose input is
    /// quantized by `quantizer`.
    pub fn new(
        weight: &[i8],
        k: usize,
        n: usize,
        quantizer: Quantizer,
        requant: Requant,
    ) -> IntDense {
        IntDense {
            k,
            n,
            weight: weight.iter().map(|&w| f32::from(w)).collect(),
            quantizer,
            requant,
        }
    }

    /// Inputs per output (`K`) and outputs (`N`).
    pub fn sizes(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Runs on `rows` rows of `K` values; returns `rows × N` values.
    pub fn run(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (k, n) = self.sizes();
        let mut acc = vec![0i32; rows * n];
        for k0 in (0..k).step_by(EXACT_TAPS) {
            let k1 = (k0 + EXACT_TAPS).min(k);
            let width = k1 - k0;
            let mut levels = vec![0f32; rows * width];
            levels
                .par_chunks_mut(width.max(1))
                .zip(x.par_chunks(k.max(1)))
                .for_each(|(dst, row)| {
                    for (d, &v) in dst.iter_mut().zip(&row[k0..k1]) {
                        *d = self.quantizer.level(v) - self.quantizer.offset;
                    }
                });
            let sums =
                super::conv::matrix_product(&levels, &self.weight[k0 * n..k1 * n], rows, width, n);
            acc.par_chunks_mut(1 << 14)
                .zip(sums.par_chunks(1 << 14))
                .for_each(|(a, s)| {
                    for (a, &s) in a.iter_mut().zip(s) {
                        // An integer below 2^24 in magnitude: exact.
                        *a = a.wrapping_add(s as i32);
                    }
                });
        }
        let mut out = vec![0.0f32; rows * n];
        out.par_chunks_mut(n.max(1))
            .zip(acc.par_chunks(n.max(1)))
            .for_each(|(o, a)| {
                for (j, (o, &s)) in o.iter_mut().zip(a).enumerate() {
                    *o = self.requant.value(j, s);
                }
            });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reproducible int8 levels.
    fn levels(seed: u64, n: usize) -> Vec<i8> {
        super::super::test_values(seed, n)
            .into_iter()
            .map(|v| (v * 128.0).floor().clamp(-128.0, 127.0) as i8)
            .collect()
    }

    /// The definition: for each output, the sum over the window of
    /// `(q − offset) · w` in i64, padded positions contributing nothing,
    /// plus the bias, then `as f32 · deq`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        g: &ConvGeometry,
        q: &[i8],
        (n, c_in, h, w): (usize, usize, usize, usize),
        weight: &[i8],
        c_out: usize,
        offset: i32,
        requant: &Requant,
    ) -> Vec<f32> {
        let (oh, ow) = super::super::counted_out_hw(g, h, w);
        let (kh, kw) = g.kernel;
        let cg = c_in / g.group;
        let mg = c_out / g.group;
        let mut out = Vec::new();
        for img in 0..n {
            for co in 0..c_out {
                let gi = co / mg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc: i64 = 0;
                        for ci in 0..cg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * g.stride.0 + ky * g.dilation.0) as i64
                                        - g.pads[0] as i64;
                                    let ix = (ox * g.stride.1 + kx * g.dilation.1) as i64
                                        - g.pads[1] as i64;
                                    if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64 {
                                        continue;
                                    }
                                    let c = gi * cg + ci;
                                    let x = i64::from(
                                        q[((img * c_in + c) * h + iy as usize) * w + ix as usize],
                                    ) - i64::from(offset);
                                    let wv =
                                        i64::from(weight[((co * cg + ci) * kh + ky) * kw + kx]);
                                    acc += x * wv;
                                }
                            }
                        }
                        let acc = acc + i64::from(requant.bias[co]);
                        let acc = i32::try_from(acc).expect("fits int32");
                        out.push(acc as f32 * requant.deq[co]);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn convolutions_equal_the_integer_definition_bit_for_bit() {
        let cases = [
            // (c_in, c_out, h, w, kernel, stride, dilation, pads, group)
            (3, 8, 9, 11, (3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 1),
            (16, 5, 7, 7, (1, 1), (1, 1), (1, 1), [0, 0, 0, 0], 1),
            (6, 6, 10, 9, (3, 3), (2, 2), (1, 1), [1, 0, 1, 2], 6),
            (8, 8, 12, 12, (5, 5), (2, 2), (1, 1), [2, 2, 2, 2], 8),
            (5, 5, 9, 9, (3, 3), (1, 1), (2, 2), [2, 1, 2, 3], 5),
            (4, 6, 8, 8, (3, 3), (1, 1), (2, 2), [2, 2, 2, 2], 2),
            // 600 input channels × 3 × 3: sums far past 2^24 at extreme values.
            (600, 3, 5, 5, (3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 1),
            // More than one block of output positions.
            (2, 3, 30, 40, (3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 1),
        ];
        for (i, &(c_in, c_out, h, w, kernel, stride, dilation, pads, group)) in
            cases.iter().enumerate()
        {
            let g = ConvGeometry {
                kernel,
                stride,
                dilation,
                pads,
                group,
            };
            let n = 2;
            let seed = 40 + 3 * i as u64;
            let wlen = c_out * c_in / group * kernel.0 * kernel.1;
            let (q, weight, offset) = if c_in == 600 {
                (vec![127i8; n * c_in * h * w], vec![-128i8; wlen], -128)
            } else {
                (levels(seed, n * c_in * h * w), levels(seed + 1, wlen), 17)
            };
            let requant = Requant {
                bias: levels(seed + 2, c_out)
                    .iter()
                    .map(|&b| i32::from(b) * 1000)
                    .collect(),
                deq: (0..c_out).map(|c| 0.001 * (c + 1) as f32).collect(),
            };
            let want = reference(&g, &q, (n, c_in, h, w), &weight, c_out, offset, &requant);
            // With scale 1 the quantizer gives back q from x = q − offset.
            let quantizer = Quantizer {
                scale: 1.0,
                offset: offset as f32,
            };
            let conv = IntConv::new(g.clone(), c_in, c_out, quantizer, &weight, requant);
            let qf: Vec<f32> = q.iter().map(|&v| (i32::from(v) - offset) as f32).collect();
            let (got, _) = conv.run(&qf, n, h, w).unwrap();
            assert_eq!(got.len(), want.len(), "case {i}: output size");
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "case {i}: {g:?}");
        }
    }

    #[test]
    fn dense_layers_equal_the_integer_definition_bit_for_bit() {
        let (rows, k, n, offset) = (3, 700, 5, -3);
        let q = levels(7, rows * k);
        let weight = levels(8, k * n);
        let requant = Requant {
            bias: vec![5, -7, 1 << 20, 0, -1],
            deq: vec![0.0005],
        };
        let quantizer = Quantizer {
            scale: 1.0,
            offset: offset as f32,
        };
        let dense = IntDense::new(&weight, k, n, quantizer, requant);
        let qf: Vec<f32> = q.iter().map(|&v| (i32::from(v) - offset) as f32).collect();
        let got = dense.run(&qf, rows);
        let bias = [5i64, -7, 1 << 20, 0, -1];
        for r in 0..rows {
            for j in 0..n {
                let acc: i64 = (0..k)
                    .map(|i| {
                        (i64::from(q[r * k + i]) - i64::from(offset)) * i64::from(weight[i * n + j])
                    })
                    .sum::<i64>()
                    + bias[j];
                let want = acc as i32 as f32 * 0.0005;
                assert_eq!(got[r * n + j].to_bits(), want.to_bits(), "({r}, {j})");
            }
        }
    }
}
