//! The two gradients of a depthwise 2-D convolution (one filter per
//! channel, `group = C`), as direct kernels over contiguous `f32` buffers in
//! NCHW order, parallel over channels, beside the forward kernel of the
//! parent module (which training runs too). General engines run a depthwise
//! layer as one convolution per group, tens of times slower (see
//! `docs/training.md`).
//!
//! Every kernel walks the filter taps outermost and, for one tap, a
//! contiguous run of output columns whose input columns are inside the
//! image, so the innermost loop is a plain multiply-add over a row.

use super::DepthwiseShape;
use rayon::prelude::*;

/// A depthwise convolution over a batch: its geometry with the batch and
/// channel counts the gradients walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Depthwise {
    /// Batch.
    pub n: usize,
    /// Channels (= groups = output channels).
    pub c: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height and width.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Strides (height, width).
    pub stride: (usize, usize),
    /// Dilations (height, width).
    pub dilation: (usize, usize),
    /// Padding: top, left, bottom, right.
    pub pads: (usize, usize, usize, usize),
}

impl Depthwise {
    /// The plane geometry the forward kernel takes.
    pub fn shape(&self) -> DepthwiseShape {
        DepthwiseShape {
            h: self.h,
            w: self.w,
            kh: self.kh,
            kw: self.kw,
            stride: self.stride,
            dilation: self.dilation,
            pads: [self.pads.0, self.pads.1, self.pads.2, self.pads.3],
        }
    }

    /// Output height (the forward kernel's).
    pub fn out_h(&self) -> usize {
        self.shape().out_h()
    }

    /// Output width (the forward kernel's).
    pub fn out_w(&self) -> usize {
        self.shape().out_w()
    }

    /// The output columns `ow` whose input column `ow·s − pad + j·d` lies in
    /// `[0, w)`, for tap column `j`.
    fn cols(&self, j: usize) -> std::ops::Range<usize> {
        valid(
            self.out_w(),
            self.stride.1,
            j * self.dilation.1,
            self.pads.1,
            self.w,
        )
    }

    /// The output rows for tap row `i` (as [`Depthwise::cols`]).
    fn rows(&self, i: usize) -> std::ops::Range<usize> {
        valid(
            self.out_h(),
            self.stride.0,
            i * self.dilation.0,
            self.pads.0,
            self.h,
        )
    }
}

/// Outputs `o < out` with `0 <= o·s + off − pad < size`.
fn valid(out: usize, s: usize, off: usize, pad: usize, size: usize) -> std::ops::Range<usize> {
    // o·s + off >= pad  ⇔  o >= ceil((pad − off)/s)
    let lo = pad.saturating_sub(off).div_ceil(s);
    // o·s + off − pad <= size − 1  ⇔  o <= (size − 1 + pad − off)/s
    let hi = match (size + pad).checked_sub(off + 1) {
        Some(v) => (v / s + 1).min(out),
        None => 0,
    };
    lo.min(hi)..hi
}

/// `Σ a[k]·b[k]` in eight interleaved partial sums (vectorisable).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// For tap column `j` on output columns `cols`: where the first input
/// column is, for [`Depthwise::cols`]' range.
fn first_input_col(g: &Depthwise, cols: &std::ops::Range<usize>, j: usize) -> usize {
    cols.start * g.stride.1 + j * g.dilation.1 - g.pads.1
}

/// The gradient of the input: `dx[n, c] = Σ_taps w · dy` scattered back.
pub fn grad_input(g: &Depthwise, dy: &[f32], weight: &[f32], dx: &mut [f32]) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let plane_out = oh * ow;
    let sw = g.stride.1;
    dx.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(nc, grad)| {
            let ch = nc % g.c;
            let d_out = &dy[nc * plane_out..(nc + 1) * plane_out];
            grad.fill(0.0);
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let wv = weight[(ch * g.kh + i) * g.kw + j];
                    let cols = g.cols(j);
                    if cols.is_empty() {
                        continue;
                    }
                    let iw0 = first_input_col(g, &cols, j);
                    for r in g.rows(i) {
                        let ih = r * g.stride.0 + i * g.dilation.0 - g.pads.0;
                        let row_out = &d_out[r * ow + cols.start..r * ow + cols.end];
                        let row_in = &mut grad[ih * g.w + iw0..(ih + 1) * g.w];
                        if sw == 1 {
                            for (d, &v) in row_in.iter_mut().zip(row_out) {
                                *d += wv * v;
                            }
                        } else {
                            for (d, &v) in row_in.iter_mut().step_by(sw).zip(row_out) {
                                *d += wv * v;
                            }
                        }
                    }
                }
            }
        });
}

/// The gradients of the weight `[c, 1, kh, kw]` and of the bias `[c]`.
pub fn grad_weight(g: &Depthwise, x: &[f32], dy: &[f32], dweight: &mut [f32], dbias: &mut [f32]) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let (plane_in, plane_out) = (g.h * g.w, oh * ow);
    let taps = g.kh * g.kw;
    let sw = g.stride.1;
    dweight
        .par_chunks_mut(taps)
        .zip(dbias.par_iter_mut())
        .enumerate()
        .for_each(|(ch, (dw, db))| {
            dw.fill(0.0);
            let mut bias_sum = 0f64;
            let mut strided = Vec::new();
            for b in 0..g.n {
                let nc = b * g.c + ch;
                let input = &x[nc * plane_in..(nc + 1) * plane_in];
                let d_out = &dy[nc * plane_out..(nc + 1) * plane_out];
                bias_sum += d_out.iter().map(|&v| f64::from(v)).sum::<f64>();
                for i in 0..g.kh {
                    for j in 0..g.kw {
                        let cols = g.cols(j);
                        if cols.is_empty() {
                            continue;
                        }
                        let iw0 = first_input_col(g, &cols, j);
                        let len = cols.len();
                        let mut acc = 0f32;
                        for r in g.rows(i) {
                            let ih = r * g.stride.0 + i * g.dilation.0 - g.pads.0;
                            let row_out = &d_out[r * ow + cols.start..r * ow + cols.end];
                            let row_in = &input[ih * g.w + iw0..(ih + 1) * g.w];
                            acc += if sw == 1 {
                                dot(row_out, &row_in[..len])
                            } else {
                                strided.clear();
                                strided.extend(row_in.iter().step_by(sw).take(len));
                                dot(row_out, &strided)
                            };
                        }
                        dw[i * g.kw + j] += acc;
                    }
                }
            }
            *db = bias_sum as f32;
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The convolution written as the plain sum of its definition, with
    /// explicit bounds checks (independent of the kernels' range logic).
    fn direct(g: &Depthwise, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f64> {
        let (oh, ow) = (g.out_h(), g.out_w());
        let mut y = vec![0f64; g.n * g.c * oh * ow];
        for n in 0..g.n {
            for c in 0..g.c {
                for r in 0..oh {
                    for col in 0..ow {
                        let mut acc = f64::from(b[c]);
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let ih =
                                    (r * g.stride.0 + i * g.dilation.0) as i64 - g.pads.0 as i64;
                                let iw =
                                    (col * g.stride.1 + j * g.dilation.1) as i64 - g.pads.1 as i64;
                                if ih < 0 || iw < 0 || ih >= g.h as i64 || iw >= g.w as i64 {
                                    continue;
                                }
                                let xv = x[((n * g.c + c) * g.h + ih as usize) * g.w + iw as usize];
                                acc += f64::from(xv) * f64::from(w[(c * g.kh + i) * g.kw + j]);
                            }
                        }
                        y[((n * g.c + c) * oh + r) * ow + col] = acc;
                    }
                }
            }
        }
        y
    }

    fn shapes() -> Vec<Depthwise> {
        let base = Depthwise {
            n: 2,
            c: 3,
            h: 7,
            w: 6,
            kh: 3,
            kw: 3,
            stride: (1, 1),
            dilation: (1, 1),
            pads: (1, 1, 1, 1),
        };
        vec![
            base,
            Depthwise {
                stride: (2, 2),
                ..base
            },
            Depthwise {
                stride: (2, 1),
                pads: (0, 2, 1, 0),
                ..base
            },
            Depthwise {
                dilation: (2, 2),
                pads: (2, 2, 2, 2),
                ..base
            },
            Depthwise {
                kh: 5,
                kw: 1,
                pads: (2, 0, 2, 0),
                stride: (1, 3),
                ..base
            },
        ]
    }

    #[test]
    fn gradients_match_finite_differences_of_the_definition() {
        for g in shapes() {
            let x = values(4, g.n * g.c * g.h * g.w);
            let w = values(5, g.c * g.kh * g.kw);
            let b = values(6, g.c);
            // L = Σ c_k · y_k, so dL/dy = c.
            let c = values(7, g.n * g.c * g.out_h() * g.out_w());
            let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
                direct(&g, x, w, b)
                    .iter()
                    .zip(&c)
                    .map(|(y, ci)| y * f64::from(*ci))
                    .sum()
            };
            let mut dx = vec![0f32; x.len()];
            grad_input(&g, &c, &w, &mut dx);
            let mut dw = vec![0f32; w.len()];
            let mut db = vec![0f32; b.len()];
            grad_weight(&g, &x, &c, &mut dw, &mut db);
            let h = 1e-2f32;
            let fd = |k: usize, which: u8| -> f64 {
                let (mut xp, mut wp, mut bp) = (x.clone(), w.clone(), b.clone());
                let (mut xm, mut wm, mut bm) = (x.clone(), w.clone(), b.clone());
                match which {
                    0 => {
                        xp[k] += h;
                        xm[k] -= h;
                    }
                    1 => {
                        wp[k] += h;
                        wm[k] -= h;
                    }
                    _ => {
                        bp[k] += h;
                        bm[k] -= h;
                    }
                }
                (loss(&xp, &wp, &bp) - loss(&xm, &wm, &bm)) / (2.0 * f64::from(h))
            };
            for k in (0..x.len()).step_by(7) {
                assert!((f64::from(dx[k]) - fd(k, 0)).abs() < 1e-3, "{g:?} dx[{k}]");
            }
            for (k, v) in dw.iter().enumerate() {
                assert!((f64::from(*v) - fd(k, 1)).abs() < 1e-3, "{g:?} dw[{k}]");
            }
            for (k, v) in db.iter().enumerate() {
                assert!((f64::from(*v) - fd(k, 2)).abs() < 1e-3, "{g:?} db[{k}]");
            }
        }
    }
}
