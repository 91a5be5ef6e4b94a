//! Fake quantization with gradients, on plain `f32` slices so any training
//! engine can call it.
//!
//! * ULQ (activations): learnable `clip_min`/`clip_max`. With `N = 2^b − 1`
//!   levels, `s = (clip_max − clip_min)/N` and `offset = −2^(b−1) − round(clip_min/s)`,
//!   `y = (clamp(round(x/s) + offset, qmin, qmax) − offset)·s`. Gradients follow
//!   the straight-through estimator: `∂y/∂x = 1` inside the grid's range and 0
//!   outside; with `e = (round(x/s) − x/s)/N`, `∂y/∂clip_max = e` inside, 1
//!   above; `∂y/∂clip_min = −e` inside, 1 below.
//! * ARQ-retrain (weights): symmetric, per tensor or per output channel, the
//!   scale recomputed from the current weights at every step
//!   (`max|w|/127`, or `/128` when the negative side dominates), and the
//!   gradient passed straight through to the float weights.
//!
//! See `docs/algorithms.md` (quantization-aware training).

use crate::quant::params::int_range;
use crate::sim::kernels::activation::round_before_clamp;
use rayon::prelude::*;

/// Values per parallel task; the clip gradients are summed per chunk, then
/// chunk by chunk in order, so a run is reproducible on any thread count.
const CHUNK: usize = 1 << 14;

/// Round half to even in f64, exactly for |x| < 2^51 (the grid's steps here).
#[inline(always)]
fn round_f64(x: f64) -> f64 {
    const SHIFTER: f64 = 6_755_399_441_055_744.0;
    (x + SHIFTER) - SHIFTER
}

/// The grid a ULQ clip range gives: step, offset and the float range it covers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UlqGrid {
    /// The step `s`.
    pub scale: f32,
    /// The integer `offset` (float 0 maps to it).
    pub offset: i32,
    /// The smallest representable value, `(qmin − offset)·s`.
    pub lower: f32,
    /// The largest representable value, `(qmax − offset)·s`.
    pub upper: f32,
}

/// The grid of the clip range `[clip_min, clip_max]` (widened to contain 0)
/// with `bits`-bit integers; `None` when the range is empty or not finite.
pub fn ulq_grid(clip_min: f32, clip_max: f32, bits: u32) -> Option<UlqGrid> {
    let (lo, hi) = int_range(bits);
    let (min, max) = (clip_min.min(0.0), clip_max.max(0.0));
    let levels = ((1u64 << bits) - 1) as f32;
    let scale = (max - min) / levels;
    if !(scale.is_finite() && scale > f32::EPSILON) {
        return None;
    }
    let offset = lo - (min / scale).round_ties_even() as i32;
    Some(UlqGrid {
        scale,
        offset,
        lower: (lo - offset) as f32 * scale,
        upper: (hi - offset) as f32 * scale,
    })
}

/// ULQ forward: the fake-quantized `x` into `out`.
pub fn ulq_forward(x: &[f32], grid: &UlqGrid, bits: u32, out: &mut [f32]) {
    let (lo, hi) = int_range(bits);
    let (lo, hi, off, s) = (lo as f32, hi as f32, grid.offset as f32, grid.scale);
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(out, x)| {
            for (y, &v) in out.iter_mut().zip(x) {
                let q = (round_before_clamp(v / s) + off).clamp(lo, hi);
                *y = (q - off) * s;
            }
        });
}

/// Gradients of a ULQ layer given the gradient of its output.
#[derive(Clone, Debug, PartialEq)]
pub struct UlqGradients {
    /// ∂L/∂x, element by element.
    pub input: Vec<f32>,
    /// ∂L/∂clip_min.
    pub clip_min: f64,
    /// ∂L/∂clip_max.
    pub clip_max: f64,
}

/// ULQ backward (see the module documentation for the formulas).
pub fn ulq_backward(x: &[f32], grad_out: &[f32], grid: &UlqGrid, bits: u32) -> UlqGradients {
    let levels = ((1u64 << bits) - 1) as f64;
    let s = f64::from(grid.scale);
    let mut input = vec![0f32; x.len()];
    let sums: Vec<(f64, f64)> = input
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(grad_out.par_chunks(CHUNK)))
        .map(|(input, (x, grad_out))| {
            let (mut g_min, mut g_max) = (0f64, 0f64);
            for ((gi, &v), &g) in input.iter_mut().zip(x).zip(grad_out) {
                let g64 = f64::from(g);
                if v < grid.lower {
                    g_min += g64;
                } else if v > grid.upper {
                    g_max += g64;
                } else {
                    *gi = g;
                    let r = f64::from(v) / s;
                    let e = (round_f64(r) - r) / levels;
                    g_max += e * g64;
                    g_min -= e * g64;
                }
            }
            (g_min, g_max)
        })
        .collect();
    let (g_min, g_max) = sums
        .iter()
        .fold((0f64, 0f64), |(a, b), (c, d)| (a + c, b + d));
    UlqGradients {
        input,
        clip_min: g_min,
        clip_max: g_max,
    }
}

/// ARQ-retrain forward for one group of weights (a tensor, or one output
/// channel): the symmetric scale of the current values and the fake-quantized
/// weights; the gradient w.r.t. the float weights is the output gradient.
pub fn arq_retrain_forward(w: &[f32], bits: u32, out: &mut [f32]) -> f32 {
    let (lo, hi) = int_range(bits);
    let max = w.iter().fold(0f32, |m, &v| m.max(v));
    let min = w.iter().fold(0f32, |m, &v| m.min(v));
    let q = if -min > max { -lo } else { hi } as f32;
    let scale = max.max(-min) / q;
    if !(scale.is_finite() && scale > f32::EPSILON) {
        out.copy_from_slice(w);
        return 1.0;
    }
    for (y, &v) in out.iter_mut().zip(w) {
        *y = round_before_clamp(v / scale).clamp(lo as f32, hi as f32) * scale;
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss L = Σ c_i·y_i for fixed weights c, with every `round(v)`
    /// replaced by `v + (round(v0) − v0)` frozen at the base point: the smooth
    /// function whose exact derivative the straight-through estimator is.
    fn surrogate_loss(
        x: &[f32],
        c: &[f64],
        (base, base_min): (&UlqGrid, f64),
        clip_min: f64,
        clip_max: f64,
    ) -> f64 {
        let levels = 255.0;
        let s = (clip_max - clip_min) / levels;
        let s0 = f64::from(base.scale);
        // offset = −128 − round(clip_min/s), round frozen at the base point.
        let m0 = base_min / s0;
        let frozen_off = (m0.round_ties_even() - m0) + clip_min / s;
        let lower = (-128.0 + 128.0 + frozen_off) * s; // (qmin − offset)·s
        let upper = (127.0 + 128.0 + frozen_off) * s;
        x.iter()
            .zip(c)
            .map(|(&v, &ci)| {
                let v = f64::from(v);
                let y = if v < f64::from(base.lower) {
                    lower
                } else if v > f64::from(base.upper) {
                    upper
                } else {
                    let r0 = v / s0;
                    let r = v / s;
                    (r + (r0.round_ties_even() - r0)) * s
                };
                ci * y
            })
            .sum()
    }

    #[test]
    fn ulq_gradients_match_finite_differences_of_the_ste_surrogate() {
        let (clip_min, clip_max) = (-0.8f32, 2.3f32);
        let grid = ulq_grid(clip_min, clip_max, 8).unwrap();
        let x: Vec<f32> = (0..400).map(|i| -1.2 + i as f32 * 0.01).collect();
        let c: Vec<f64> = (0..400)
            .map(|i| ((i * 37) % 11) as f64 / 7.0 - 0.6)
            .collect();
        let g: Vec<f32> = c.iter().map(|&v| v as f32).collect();
        let got = ulq_backward(&x, &g, &grid, 8);
        let h = 1e-4;
        let (m, mm) = (f64::from(clip_min), f64::from(clip_max));
        let base = (&grid, m);
        let d_max = (surrogate_loss(&x, &c, base, m, mm + h)
            - surrogate_loss(&x, &c, base, m, mm - h))
            / (2.0 * h);
        let d_min = (surrogate_loss(&x, &c, base, m + h, mm)
            - surrogate_loss(&x, &c, base, m - h, mm))
            / (2.0 * h);
        // The frozen offset moves the clipped ends by at most half a step / 255.
        let tol = 0.01 * (1.0 + d_max.abs().max(d_min.abs()));
        assert!(
            (got.clip_max - d_max).abs() < tol,
            "{} vs {d_max}",
            got.clip_max
        );
        assert!(
            (got.clip_min - d_min).abs() < tol,
            "{} vs {d_min}",
            got.clip_min
        );
        // ∂L/∂x is c inside the range and 0 outside.
        for (i, &v) in x.iter().enumerate() {
            let inside = v >= grid.lower && v <= grid.upper;
            assert_eq!(got.input[i], if inside { g[i] } else { 0.0 }, "x = {v}");
        }
    }

    #[test]
    fn ulq_forward_matches_a_hand_computation() {
        // [0, 2.55] with 8 bits: s = 0.01, offset = -128, grid [0, 2.55].
        let grid = ulq_grid(0.0, 2.55, 8).unwrap();
        assert!((grid.scale - 0.01).abs() < 1e-9);
        assert_eq!(grid.offset, -128);
        let mut y = [0f32; 4];
        ulq_forward(&[-0.3, 0.014, 1.005, 9.0], &grid, 8, &mut y);
        // Below 0 clips to 0; 1.4 steps round to 1; 100.5 steps round to 100 (half to even); above clips to 2.55.
        let want = [0.0, 0.01, 1.0, 2.55];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        assert!(ulq_grid(1.0, 1.0, 8).is_some(), "widened to contain 0");
        assert!(ulq_grid(0.0, 0.0, 8).is_none());
    }

    #[test]
    fn arq_retrain_uses_the_127_128_rule() {
        let mut y = [0f32; 3];
        // max |w| = 1.28 on the negative side: scale 1.28/128 = 0.01.
        let s = arq_retrain_forward(&[-1.28, 0.5, 1.2749], 8, &mut y);
        assert!((s - 0.01).abs() < 1e-9);
        assert!((y[0] + 1.28).abs() < 1e-6 && (y[1] - 0.5).abs() < 1e-6);
        // 127.49 steps round to 127: the positive end stays on the int8 grid.
        assert!((y[2] - 1.27).abs() < 1e-6, "{y:?}");
    }
}
