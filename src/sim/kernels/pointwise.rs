//! Pointwise convolution (1×1, stride 1, no padding, one group) on NCHW
//! with AVX-512: `out[m, p] = act(bias[m] + Σ_k W[m, k] · x[k, p])`, the
//! layer that makes up most of MobileNet-style networks.
//!
//! Unlike the general GEMM ([`super::conv`]), it reads the input where it
//! lies — each input channel's row of positions is already contiguous, so a
//! tile of 32 positions is two 16-lane loads per input channel, and nothing
//! is packed per call — and it applies bias and activation to each tile while
//! it is in registers, writing every output once. The weight is packed once,
//! in panels of [`MR`] output channels. A tile holds `MR × 32` sums in 24
//! vector registers; positions past the end of a row are masked off, output
//! channels past the last are zero rows of the panel that are never stored.
//! Tiles run in parallel, grouped so that each task reuses one column of
//! input tiles across several weight panels.
//!
//! Only for CPUs with AVX-512F; elsewhere [`Pointwise::new`] declines and the
//! convolution runs on the general GEMM.

use super::activation::Activation;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output channels per tile.
const MR: usize = 12;
/// Positions per tile (two 16-lane vectors).
const NR: usize = 32;

/// A pointwise convolution's weight, packed for the AVX-512 tile.
pub struct Pointwise {
    /// Panel `t` holds, for each input channel `k` in turn, the weights
    /// `W[t·MR + r, k]` for `r < MR` (zero past the last output channel).
    panels: Vec<f32>,
    c_in: usize,
    c_out: usize,
}

/// Whether this CPU runs the AVX-512 tile.
fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Pointwise {
    /// Packs `weight` (`[c_out, c_in]`, row-major); `None` when the CPU lacks
    /// AVX-512F.
    pub fn new(weight: &[f32], c_out: usize, c_in: usize) -> Option<Pointwise> {
        if !supported() || c_in == 0 {
            return None;
        }
        assert_eq!(weight.len(), c_out * c_in, "the weight is [c_out, c_in]");
        let tiles = c_out.div_ceil(MR);
        let mut panels = vec![0f32; tiles * c_in * MR];
        for (m, row) in weight.chunks_exact(c_in).enumerate() {
            let panel = &mut panels[(m / MR) * c_in * MR..][..c_in * MR];
            for (k, &v) in row.iter().enumerate() {
                panel[k * MR + m % MR] = v;
            }
        }
        Some(Pointwise {
            panels,
            c_in,
            c_out,
        })
    }

    /// `out = act(W · x + bias) (+ residual)` for `x` `[c_in, cols]` and
    /// `out` and `residual` `[c_out, cols]`, all row-major; writes every
    /// value of `out`.
    pub fn run(
        &self,
        x: &[f32],
        cols: usize,
        bias: Option<&[f32]>,
        activation: Activation,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        assert_eq!(x.len(), self.c_in * cols, "the input is [c_in, cols]");
        assert_eq!(out.len(), self.c_out * cols, "the output is [c_out, cols]");
        if let Some(r) = residual {
            assert_eq!(r.len(), out.len(), "the residual is [c_out, cols]");
        }
        if let Some(b) = bias {
            assert_eq!(b.len(), self.c_out, "one bias per output channel");
        }
        let row_tiles = self.c_out.div_ceil(MR);
        let col_tiles = cols.div_ceil(NR);
        if row_tiles == 0 || col_tiles == 0 {
            return;
        }
        // Tasks: a block of columns (as wide as keeps its input, `c_in` rows
        // of it, within 128 KiB, so it stays in cache across the panels)
        // times a run of weight panels, so that narrow outputs (7×7
        // positions: two column tiles) still make enough tasks for every
        // thread. Inside a task each panel sweeps the block's tiles, writing
        // each output row as one run.
        let wanted = 4 * rayon::current_num_threads();
        let block_tiles =
            (32 * 1024 / (self.c_in * NR)).clamp(1, col_tiles.div_ceil(wanted).max(1));
        let col_blocks = col_tiles.div_ceil(block_tiles);
        let splits = wanted.div_ceil(col_blocks).clamp(1, row_tiles);
        let per_task = row_tiles.div_ceil(splits);
        let splits = row_tiles.div_ceil(per_task);
        let dst = OutPtr(out.as_mut_ptr().cast::<f32>());
        (0..col_blocks * splits).into_par_iter().for_each(|task| {
            let (block, split) = (task / splits, task % splits);
            let tiles = split * per_task..((split + 1) * per_task).min(row_tiles);
            for t in tiles {
                let m0 = t * MR;
                let rows = MR.min(self.c_out - m0);
                let mut b = [0f32; MR];
                if let Some(bias) = bias {
                    b[..rows].copy_from_slice(&bias[m0..m0 + rows]);
                }
                let panel = &self.panels[t * self.c_in * MR..][..self.c_in * MR];
                let first = block * block_tiles;
                for col_tile in first..(first + block_tiles).min(col_tiles) {
                    let c0 = col_tile * NR;
                    let width = NR.min(cols - c0);
                    // SAFETY: AVX-512F is present (`new` checked). The tile
                    // reads `x[k, c0..c0 + width]` for k < c_in (inside `x`,
                    // asserted above) and writes `out[m0 + r, c0..c0 + width]`
                    // for r < rows, inside `out` (and reads the residual
                    // there, as large); tasks cover disjoint (row, column)
                    // ranges, so no two threads write the same value.
                    unsafe {
                        let at = m0 * cols + c0;
                        let o = dst.at(at);
                        let x = x.as_ptr().add(c0);
                        // SiLU is applied after the tile, so the residual too.
                        let silu = activation == Activation::Silu;
                        let fused = residual.filter(|_| !silu).map(|r| r.as_ptr().add(at));
                        avx512::tile(panel, x, cols, width, &b, activation, fused, o, rows);
                        if silu {
                            for r in 0..rows {
                                let row = std::slice::from_raw_parts_mut(o.add(r * cols), width);
                                Activation::Silu.apply(row);
                                if let Some(res) = residual {
                                    let res = &res[at + r * cols..][..width];
                                    row.iter_mut().zip(res).for_each(|(v, r)| *v += r);
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

/// The output, written by tasks in disjoint tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
impl OutPtr {
    /// The output from value `offset` on.
    ///
    /// # Safety
    /// `offset` must lie inside the output.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: inside the output (the caller's promise).
        unsafe { self.0.add(offset) }
    }
}

// SAFETY: tasks write disjoint tiles through the pointer (see `run`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activation, MR, NR};
    use std::arch::x86_64::*;

    /// One `MR × width` tile (`width ≤ NR`): sums over the panel's input
    /// channels, plus bias, clamped when the activation is a clamp, plus the
    /// residual if any, stored to the first `rows` rows of `out` (row stride
    /// `ld`, as `x`'s and the residual's).
    ///
    /// # Safety
    /// AVX-512F must be present; `x` must hold `panel.len() / MR` rows of
    /// `width` readable values at stride `ld`, `residual` (if any) `rows`
    /// such rows, and `out` `rows` writable rows of `width` values at
    /// stride `ld`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(
        panel: &[f32],
        x: *const f32,
        ld: usize,
        width: usize,
        bias: &[f32; MR],
        activation: Activation,
        residual: Option<*const f32>,
        out: *mut f32,
        rows: usize,
    ) {
        debug_assert!(width <= NR && rows <= MR);
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        let (m0, m1) = (lanes(width), lanes(width.saturating_sub(16)));
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for (r, a) in acc.iter_mut().enumerate() {
            let b = _mm512_set1_ps(bias[r]);
            *a = [b, b];
        }
        for (k, w) in panel.chunks_exact(MR).enumerate() {
            // SAFETY: row k of `x` holds `width` readable values; masked-off
            // lanes are not read. The address is formed with wrapping
            // arithmetic as it may point past the row when `width ≤ 16`.
            let (b0, b1) = unsafe {
                let row = x.wrapping_add(k * ld);
                (
                    _mm512_maskz_loadu_ps(m0, row),
                    _mm512_maskz_loadu_ps(m1, row.wrapping_add(16)),
                )
            };
            for (a, &wv) in acc.iter_mut().zip(w) {
                let wv = _mm512_set1_ps(wv);
                a[0] = _mm512_fmadd_ps(wv, b0, a[0]);
                a[1] = _mm512_fmadd_ps(wv, b1, a[1]);
            }
        }
        if let Activation::Clamp(lo, hi) = activation {
            // `max(lo, v)` then `min(hi, v)` keep a NaN as it is.
            let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
            for a in acc.iter_mut() {
                for v in a.iter_mut() {
                    *v = _mm512_min_ps(hi, _mm512_max_ps(lo, *v));
                }
            }
        }
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            if let Some(res) = residual {
                // SAFETY: row r < rows of the residual holds `width` values;
                // masked-off lanes are not read.
                unsafe {
                    let row = res.wrapping_add(r * ld);
                    a[0] = _mm512_add_ps(a[0], _mm512_maskz_loadu_ps(m0, row));
                    a[1] = _mm512_add_ps(a[1], _mm512_maskz_loadu_ps(m1, row.wrapping_add(16)));
                }
            }
            // SAFETY: row r < rows of `out` holds `width` writable values;
            // masked-off lanes are not written.
            unsafe {
                let row = out.wrapping_add(r * ld);
                _mm512_mask_storeu_ps(row, m0, a[0]);
                _mm512_mask_storeu_ps(row.wrapping_add(16), m1, a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::kernels::test_values as values;

    /// `p.run` into an output filled with NaN beforehand, so that a value
    /// it fails to write shows as NaN.
    fn run(p: &Pointwise, x: &[f32], cols: usize, bias: Option<&[f32]>, a: Activation) -> Vec<f32> {
        run_with(p, x, cols, bias, a, None)
    }

    /// `run` with a residual.
    fn run_with(
        p: &Pointwise,
        x: &[f32],
        cols: usize,
        bias: Option<&[f32]>,
        a: Activation,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut out = vec![MaybeUninit::new(f32::NAN); p.c_out * cols];
        p.run(x, cols, bias, a, residual, &mut out);
        // SAFETY: every value was initialised (to NaN) before the run.
        out.into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect()
    }

    /// The definition, in f64.
    fn naive(
        w: &[f32],
        x: &[f32],
        bias: &[f32],
        c_out: usize,
        c_in: usize,
        cols: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; c_out * cols];
        for m in 0..c_out {
            for p in 0..cols {
                let mut acc = f64::from(bias[m]);
                for k in 0..c_in {
                    acc += f64::from(w[m * c_in + k]) * f64::from(x[k * cols + p]);
                }
                out[m * cols + p] = acc;
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_on_random_shapes() {
        let Some(_) = Pointwise::new(&[1.0], 1, 1) else {
            eprintln!("no AVX-512F on this CPU: the general GEMM runs pointwise layers");
            return;
        };
        let mut seed = 0;
        // Output channels below, at and past a panel; positions below one
        // vector, between one and two, a whole tile and ragged tails.
        for &(c_out, c_in, cols) in &[
            (1, 1, 1),
            (5, 3, 7),
            (12, 16, 32),
            (13, 17, 49),
            (96, 16, 196),
            (40, 300, 33),
            (25, 8, 16),
            (7, 960, 17),
            (20, 8, 1000),
        ] {
            for activation in [
                Activation::None,
                Activation::Clamp(0.0, 0.5),
                Activation::Silu,
            ] {
                seed += 1;
                let w = values(seed, c_out * c_in);
                let x = values(seed + 100, c_in * cols);
                let b = values(seed + 200, c_out);
                let want = naive(&w, &x, &b, c_out, c_in, cols);
                let p = Pointwise::new(&w, c_out, c_in).expect("AVX-512F was found above");
                // Every other case adds a residual after the activation.
                let residual = (seed % 2 == 0).then(|| values(seed + 300, c_out * cols));
                let got = run_with(&p, &x, cols, Some(&b), activation, residual.as_deref());
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    let e = match activation {
                        Activation::None => *e,
                        Activation::Clamp(lo, hi) => e.clamp(f64::from(lo), f64::from(hi)),
                        Activation::Silu => e / (1.0 + (-e).exp()),
                    } + residual.as_ref().map_or(0.0, |r| f64::from(r[i]));
                    let tol = 1e-5 * (1.0 + e.abs()) * (c_in as f64).sqrt();
                    assert!(
                        (f64::from(*g) - e).abs() <= tol,
                        "{c_out}x{c_in}x{cols} {activation:?} at {i}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_nan_input_stays_nan_through_the_clamp() {
        let Some(p) = Pointwise::new(&[1.0, 1.0], 1, 2) else {
            return;
        };
        let x = [f32::NAN, 1.0, 2.0, 3.0];
        let got = run(&p, &x, 2, None, Activation::Clamp(0.0, 6.0));
        assert!(got[0].is_nan(), "{got:?}");
        assert_eq!(got[1], 4.0);
    }
}
