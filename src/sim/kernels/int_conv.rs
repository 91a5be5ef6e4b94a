//! A deploy model's quantized layers as the device computes them: the
//! int8 input `q` (held as float, every value an integer) minus its
//! offset, times the int8 weight, summed in int32 with the int32 bias, then
//! converted to float and multiplied by the dequantization scale of the
//! output channel — `AscendQuant → Conv | Gemm | MatMul → AscendDequant`
//! in one pass. Padding holds the offset (zero after the subtraction).
//!
//! The products run on [`super::int_gemm`]: an im2col of `q − offset` in
//! i16, per image, group and block of output positions.

use super::conv::ConvGeometry;
use super::int_gemm::{PackedIntWeight, PairedColumns, int_gemm};
use rayon::prelude::*;

/// Output positions per task.
const BLOCK: usize = 512;

/// What follows the int32 sum: bias, then the float scale per channel.
pub struct Requant {
    /// The int32 bias per output channel (empty: none).
    pub bias: Vec<i32>,
    /// The dequantization scale: one value, or one per output channel.
    pub deq: Vec<f32>,
}

impl Requant {
    /// The float output of channel `c` for its int32 sum.
    #[inline]
    fn apply(&self, c: usize, acc: i32) -> f32 {
        let acc = acc.wrapping_add(self.bias.get(c).copied().unwrap_or(0));
        let deq = if self.deq.len() == 1 {
            self.deq[0]
        } else {
            self.deq[c]
        };
        acc as f32 * deq
    }

    /// Whether the bias and scales fit `channels` outputs.
    pub fn fits(&self, channels: usize) -> bool {
        (self.bias.is_empty() || self.bias.len() == channels)
            && (self.deq.len() == 1 || self.deq.len() == channels)
    }
}

/// The input's offset subtracted, as the GEMM's i16 operand; `None` for a
/// value that is not an int8 level (only a quantization step writes these).
#[inline]
fn centred(q: f32, offset: f32) -> Option<i16> {
    let v = q - offset;
    (q.fract() == 0.0 && (-255.0..=255.0).contains(&v)).then_some(v as i16)
}

const NOT_LEVELS: &str = "the quantized input holds values that are not int8 levels";

/// A quantized 2-D convolution (NCHW) ready to run.
pub struct IntConv {
    geometry: ConvGeometry,
    c_in: usize,
    c_out: usize,
    offset: f32,
    /// One packed weight per group.
    packed: Vec<PackedIntWeight>,
    requant: Requant,
}

impl IntConv {
    /// A convolution with int8 weight `[C_out, C_in/group, kh, kw]`
    /// (flattened) reading values quantized with `offset`.
    pub fn new(
        geometry: ConvGeometry,
        c_in: usize,
        c_out: usize,
        offset: f32,
        weight: &[i8],
        requant: Requant,
    ) -> IntConv {
        let g = geometry.group;
        let k = c_in / g * geometry.kernel.0 * geometry.kernel.1;
        let m = c_out / g;
        let packed = (0..g)
            .map(|i| PackedIntWeight::new(&weight[i * m * k..(i + 1) * m * k], m, k))
            .collect();
        IntConv {
            geometry,
            c_in,
            c_out,
            offset,
            packed,
            requant,
        }
    }

    /// Input channels.
    pub fn c_in(&self) -> usize {
        self.c_in
    }

    /// Runs on `q` of shape `[n, C_in, h, w]`; returns `[n, C_out, oh, ow]`
    /// and `(oh, ow)`.
    pub fn run(
        &self,
        q: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, (usize, usize)), String> {
        let g = &self.geometry;
        let (oh, ow) = g
            .out_hw(h, w)
            .ok_or("the kernel does not fit in the padded input")?;
        let cols = oh * ow;
        let groups = g.group;
        let (cg, mg) = (self.c_in / groups, self.c_out / groups);
        let tasks: Vec<(usize, usize, usize)> = (0..n)
            .flat_map(|img| {
                (0..groups)
                    .flat_map(move |gi| (0..cols).step_by(BLOCK).map(move |c0| (img, gi, c0)))
            })
            .collect();
        let blocks: Vec<Vec<i32>> = tasks
            .par_iter()
            .map(|&(img, gi, c0)| {
                let c1 = (c0 + BLOCK).min(cols);
                let plane = &q[(img * self.c_in + gi * cg) * h * w..][..cg * h * w];
                let b = self.im2col(plane, (h, w), (ow, c0, c1))?;
                let mut acc = vec![0; mg * (c1 - c0)];
                int_gemm(&self.packed[gi], &b, &mut acc);
                Ok(acc)
            })
            .collect::<Result<_, &str>>()?;
        let mut out = vec![0.0f32; n * self.c_out * cols];
        for (&(img, gi, c0), acc) in tasks.iter().zip(&blocks) {
            let width = (c0 + BLOCK).min(cols) - c0;
            for (r, sums) in acc.chunks_exact(width).enumerate() {
                let c = gi * mg + r;
                let dst = &mut out[(img * self.c_out + c) * cols + c0..][..width];
                for (d, &s) in dst.iter_mut().zip(sums) {
                    *d = self.requant.apply(c, s);
                }
            }
        }
        Ok((out, (oh, ow)))
    }

    /// The columns `c0..c1` (of `ow` per output row) of one group's im2col,
    /// `q − offset` with zeros where the window leaves the image.
    fn im2col(
        &self,
        plane: &[f32],
        (h, w): (usize, usize),
        (ow, c0, c1): (usize, usize, usize),
    ) -> Result<PairedColumns, &'static str> {
        let g = &self.geometry;
        let (kh, kw) = g.kernel;
        let cg = plane.len() / (h * w);
        let mut b = PairedColumns::zeros(cg * kh * kw, c1 - c0);
        for ci in 0..cg {
            let src = &plane[ci * h * w..(ci + 1) * h * w];
            for ky in 0..kh {
                for kx in 0..kw {
                    let r = (ci * kh + ky) * kw + kx;
                    for col in c0..c1 {
                        let (oy, ox) = (col / ow, col % ow);
                        let iy = (oy * g.stride.0 + ky * g.dilation.0).wrapping_sub(g.pads[0]);
                        let ix = (ox * g.stride.1 + kx * g.dilation.1).wrapping_sub(g.pads[1]);
                        if iy < h && ix < w {
                            let v = centred(src[iy * w + ix], self.offset).ok_or(NOT_LEVELS)?;
                            b.set(r, col - c0, v);
                        }
                    }
                }
            }
        }
        Ok(b)
    }
}

/// A quantized `x · W` (Gemm with `transB = 0`, or MatMul with a constant
/// 2-D weight) over the last axis of `x`.
pub struct IntDense {
    k: usize,
    /// `Wᵀ`, `[N, K]`, packed.
    packed: PackedIntWeight,
    offset: f32,
    requant: Requant,
}

impl IntDense {
    /// A layer with int8 weight `[k, n]` (row-major) reading values
    /// quantized with `offset`.
    pub fn new(weight: &[i8], k: usize, n: usize, offset: f32, requant: Requant) -> IntDense {
        let transposed: Vec<i8> = (0..n)
            .flat_map(|j| (0..k).map(move |i| weight[i * n + j]))
            .collect();
        IntDense {
            k,
            packed: PackedIntWeight::new(&transposed, n, k),
            offset,
            requant,
        }
    }

    /// Inputs per output (`K`) and outputs (`N`).
    pub fn sizes(&self) -> (usize, usize) {
        (self.k, self.packed.rows())
    }

    /// Runs on `rows` rows of `K` values; returns `rows × N` values.
    pub fn run(&self, q: &[f32], rows: usize) -> Result<Vec<f32>, String> {
        let (k, n) = self.sizes();
        let mut b = PairedColumns::zeros(k, rows);
        for (r, row) in q.chunks_exact(k.max(1)).take(rows).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                b.set(i, r, centred(v, self.offset).ok_or(NOT_LEVELS)?);
            }
        }
        let mut acc = vec![0; n * rows];
        int_gemm(&self.packed, &b, &mut acc);
        let mut out = vec![0.0f32; rows * n];
        for (j, sums) in acc.chunks_exact(rows.max(1)).enumerate() {
            for (r, &s) in sums.iter().enumerate() {
                out[r * n + j] = self.requant.apply(j, s);
            }
        }
        Ok(out)
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
        let (oh, ow) = g.out_hw(h, w).unwrap();
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
            let conv = IntConv::new(g.clone(), c_in, c_out, offset as f32, &weight, requant);
            let qf: Vec<f32> = q.iter().map(|&v| f32::from(v)).collect();
            let (got, _) = conv.run(&qf, n, h, w).unwrap();
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
        let dense = IntDense::new(&weight, k, n, offset as f32, requant);
        let qf: Vec<f32> = q.iter().map(|&v| f32::from(v)).collect();
        let got = dense.run(&qf, rows).unwrap();
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

    #[test]
    fn values_off_the_int8_levels_are_refused() {
        let g = ConvGeometry {
            kernel: (1, 1),
            stride: (1, 1),
            dilation: (1, 1),
            pads: [0; 4],
            group: 1,
        };
        let conv = IntConv::new(
            g,
            1,
            1,
            0.0,
            &[1],
            Requant {
                bias: vec![],
                deq: vec![1.0],
            },
        );
        assert!(conv.run(&[0.5], 1, 1, 1).is_err());
    }
}
