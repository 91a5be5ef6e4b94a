//! Convolutions of one group with the output channels in the vector lanes:
//! `out[m, p] = act(bias[m] + Σ_k W[m, k] · B[k, p]) (+ residual[m, p])`
//! computed as tiles of 32 output channels (two 16-lane vectors) × up to 14
//! positions of one output row, each position one broadcast of `B[k, p]`
//! per row of `B`. `B` is the input itself for a pointwise layer, else the
//! tiled kernel's shifted windows of it (strides 1 and 2: each row of `B`
//! one contiguous run of a zero-padded phase plane, see
//! [`super::tiled`]), so no im2col matrix is built.
//!
//! The tiled kernel ([`super::tiled`]) puts positions in the lanes, which
//! wastes lanes when a row of outputs is not a multiple of 32: 49 positions
//! (7×7) fill 49 of 64 lanes, 196 (14×14) 196 of 224, and on shifted
//! windows it also computes the columns it drops. Here the lanes hold
//! output channels, whose counts are multiples of 16 in the layers this
//! kernel takes, and a tile of fewer positions is simply a shorter one, so
//! nothing is wasted at any plane size. The price is the store: a tile's
//! sums are a column per position, and the output is NCHW, so each tile is
//! turned around in registers (a 16 × 16 transpose per vector of channels)
//! before it is written — a cost per output, against `k` multiply-adds per
//! output, which is why only layers with deep columns ([`MIN_DEPTH`]) take
//! this kernel. Each row of `B` is read 14 consecutive values at a time;
//! while a tile sums a row it prefetches the next tile's part of it, as the
//! layer's input often comes cold from the layer before.
//!
//! Only for CPUs with AVX-512F; elsewhere the constructor declines.

use super::activation::Activation;
use super::tiled::{OutPtr, Patches, Shifted, check_sample, supported};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Positions per tile: with two vectors of output channels each, 28 sums
/// in registers, two more for the weights, of the 32 there are.
const POSITIONS: usize = 14;
/// Output channels per block of the packed weight (a layer's last block
/// may hold 16).
const BLOCK: usize = 32;
/// Rows of `B` (input channels × kernel taps) from which a layer takes
/// this kernel: storing a tile costs about as much as 16 to 20 rows of its
/// sum (a fifth of the kernel's time at 64 to 96 rows), so shallower layers
/// keep the tiled kernel (see `docs/engine.md`).
pub const MIN_DEPTH: usize = 64;

/// A layer's weight packed for the tiles, and where `B` comes from.
pub struct ChannelTiles {
    /// Block `b` (output channels `32b..`, at most 32 of them) starts at
    /// `32b · k` and holds, for each row `kk` of `B` in turn, the weights
    /// `W[32b + j, kk]` of its channels `j`.
    packed: Vec<f32>,
    c_out: usize,
    /// Rows of `B`: input channels × kernel taps.
    k: usize,
    /// `None`: `B` is the input (pointwise layer); else shifted windows of
    /// it ([`Shifted`]).
    patches: Option<Patches>,
}

impl ChannelTiles {
    /// A pointwise layer with weight `[c_out, c_in]`; `None` when the CPU
    /// lacks AVX-512F or `c_out` is not a multiple of 16.
    pub fn pointwise(weight: &[f32], c_out: usize, c_in: usize) -> Option<ChannelTiles> {
        ChannelTiles::new(weight, c_out, c_in, None)
    }

    /// A layer of one group with weight `[c_out, c_in, kh, kw]` and strides
    /// of at most 2, on shifted windows of its input; `None` when the CPU
    /// lacks AVX-512F, `c_out` is not a multiple of 16 or a stride is larger.
    pub fn patches(weight: &[f32], c_out: usize, patches: Patches) -> Option<ChannelTiles> {
        if patches.stride.0 > 2 || patches.stride.1 > 2 || patches.stride.0 * patches.stride.1 == 0
        {
            return None;
        }
        let k = patches.c_in * patches.kernel.0 * patches.kernel.1;
        ChannelTiles::new(weight, c_out, k, Some(patches))
    }

    fn new(
        weight: &[f32],
        c_out: usize,
        k: usize,
        patches: Option<Patches>,
    ) -> Option<ChannelTiles> {
        if !supported() || k == 0 || c_out == 0 || !c_out.is_multiple_of(16) {
            return None;
        }
        assert_eq!(weight.len(), c_out * k, "the weight is [c_out, k]");
        let mut packed = vec![0f32; c_out * k];
        for m0 in (0..c_out).step_by(BLOCK) {
            let width = BLOCK.min(c_out - m0);
            let block = &mut packed[m0 * k..][..width * k];
            for j in 0..width {
                for (kk, &v) in weight[(m0 + j) * k..][..k].iter().enumerate() {
                    block[kk * width + j] = v;
                }
            }
        }
        Some(ChannelTiles {
            packed,
            c_out,
            k,
            patches,
        })
    }

    /// One sample: `x` is `[c_in, h, w]`; `out` and `residual` are
    /// `[c_out, oh, ow]` (`oh × ow = h × w` for a pointwise layer). Writes
    /// every value of `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        bias: Option<&[f32]>,
        activation: Activation,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (c_out, k) = (self.c_out, self.k);
        let cols = oh * ow;
        let c_in = self.patches.map_or(k, |p| p.c_in);
        let pointwise = self.patches.is_none();
        check_sample(
            (x, c_in, (h, w)),
            pointwise,
            (out.len(), c_out, (oh, ow)),
            bias,
            residual,
        );
        if cols == 0 {
            return;
        }
        // Small layers (under ~1M multiply-adds) run on the calling thread.
        let parallel = c_out * cols * k >= 1 << 20;
        // `B` as rows of positions: a pointwise layer's is the input, one
        // row of `cols` positions per channel; shifted windows hold `oh`
        // rows of `ow` outputs each `grid` apart, plus columns to drop.
        let (planes, offsets, (rows, width, grid)) = match &self.patches {
            None => (None, (0..k).map(|kk| kk * cols).collect(), (1, cols, cols)),
            Some(p) => {
                let s = Shifted::new(p, (oh, ow));
                let (planes, offsets) = s.source(p, x, (h, w), parallel);
                (Some(planes), offsets, (oh, ow, s.row))
            }
        };
        let offsets: &[usize] = &offsets;
        let b = planes.as_deref().unwrap_or(x);
        // Tiles of at most `POSITIONS` outputs of one row, of equal sizes.
        let per_row = width.div_ceil(POSITIONS);
        let tiles = rows * per_row;
        let blocks = c_out.div_ceil(BLOCK);
        let wanted = if parallel {
            4 * rayon::current_num_threads()
        } else {
            1
        };
        // Tasks are a block of output channels × a run of tiles: whole
        // output rows where there are enough blocks.
        let runs = wanted.div_ceil(blocks).clamp(1, tiles);
        let per_run = tiles.div_ceil(runs);
        let runs = tiles.div_ceil(per_run);
        let dst = OutPtr(out.as_mut_ptr().cast::<f32>());
        let task = |task: usize| {
            let (block, run) = (task / runs, task % runs);
            let m0 = block * BLOCK;
            let channels = BLOCK.min(c_out - m0);
            let weights = &self.packed[m0 * k..][..channels * k];
            let mut lane_bias = [0f32; BLOCK];
            if let Some(b) = bias {
                lane_bias[..channels].copy_from_slice(&b[m0..m0 + channels]);
            }
            for tile in run * per_run..((run + 1) * per_run).min(tiles) {
                let (r, i) = (tile / per_row, tile % per_row);
                let (c0, c1) = (i * width / per_row, (i + 1) * width / per_row);
                let at = r * width + c0;
                let tile = avx512::Tile {
                    weights,
                    offsets,
                    b: &b[r * grid + c0..],
                    ld: cols,
                    bias: &lane_bias,
                    activation,
                    residual: residual.map(|r| &r[m0 * cols + at..]),
                };
                // SAFETY: AVX-512F is present (the constructor checked);
                // each row of `B` holds the tile's positions (the rows are
                // the input's channels, or runs of the phase planes the
                // length of the grid); the tile writes output channels
                // m0..m0 + channels at positions at..at + c1 − c0 of one
                // output row, inside `out`, and no other task writes those.
                unsafe { tile.run(channels / 16, c1 - c0, dst.at(m0 * cols + at)) };
            }
        };
        if parallel {
            (0..blocks * runs).into_par_iter().for_each(task);
        } else {
            (0..blocks * runs).for_each(task);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activation, POSITIONS};
    use crate::sim::kernels::activation::avx512::apply16;
    use std::arch::x86_64::*;

    /// One tile: up to 32 output channels × up to [`POSITIONS`] positions.
    pub struct Tile<'a> {
        /// The block's packed weights: `vectors · 16` per row of `B`.
        pub weights: &'a [f32],
        /// Where each row of `B` starts, from `b`.
        pub offsets: &'a [usize],
        /// `B` from the tile's first position on.
        pub b: &'a [f32],
        /// Row stride of the output and the residual.
        pub ld: usize,
        /// The block's biases (zero when the layer has none).
        pub bias: &'a [f32; 32],
        pub activation: Activation,
        /// The residual at the tile's first channel and position.
        pub residual: Option<&'a [f32]>,
    }

    impl Tile<'_> {
        /// Sums and stores `vectors · 16` output channels × `n` positions
        /// at `out` (rows `ld` apart).
        ///
        /// # Safety
        /// AVX-512F must be present; `out` must hold `vectors · 16` writable
        /// rows of `n` values at stride `ld`; `n ≤ POSITIONS` positions
        /// must exist in every row of `B` (`b[offsets[kk]..]`) and of the
        /// residual.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn run(&self, vectors: usize, n: usize, out: *mut f32) {
            debug_assert!((1..=2).contains(&vectors) && (1..=POSITIONS).contains(&n));
            debug_assert!(self.weights.len() == self.offsets.len() * vectors * 16);
            debug_assert!(self.offsets.iter().all(|&o| o + n <= self.b.len()));
            macro_rules! dispatch {
                ($($n:literal)*) => {
                    match (vectors, n) {
                        $(
                            (2, $n) => unsafe { self.sums::<$n, 2>(out) },
                            (_, $n) => unsafe { self.sums::<$n, 1>(out) },
                        )*
                        _ => unreachable!("at most {POSITIONS} positions"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14);
        }

        /// `run` for `N` positions and `V` vectors of channels.
        ///
        /// # Safety
        /// As for `run`, with `n = N` and `vectors = V`.
        #[target_feature(enable = "avx512f")]
        unsafe fn sums<const N: usize, const V: usize>(&self, out: *mut f32) {
            let mut acc = [[_mm512_setzero_ps(); V]; N];
            for (v, lanes) in self.bias.chunks_exact(16).take(V).enumerate() {
                // SAFETY: 16 values.
                let b = unsafe { _mm512_loadu_ps(lanes.as_ptr()) };
                for sums in acc.iter_mut() {
                    sums[v] = b;
                }
            }
            // SAFETY: as this function's contract says for `x`.
            let acc =
                unsafe { accumulate::<N, V>(acc, self.weights, self.b.as_ptr(), self.offsets) };
            let mask = ((1u32 << N) - 1) as __mmask16;
            for v in 0..V {
                // Row p: position p's 16 channels, activated; turned
                // around, vector j holds channel j's positions.
                let mut rows = [_mm512_setzero_ps(); 16];
                for (row, sums) in rows.iter_mut().zip(&acc) {
                    *row = apply16(sums[v], self.activation);
                }
                let channels = transpose16(rows);
                for (j, &y) in channels.iter().enumerate() {
                    let m = v * 16 + j;
                    // SAFETY: the masked residual load and the store touch
                    // row m's N positions, which the caller promises exist.
                    unsafe {
                        let mut y = y;
                        if let Some(r) = self.residual {
                            let r = _mm512_maskz_loadu_ps(mask, r.as_ptr().add(m * self.ld));
                            y = _mm512_add_ps(y, r);
                        }
                        _mm512_mask_storeu_ps(out.add(m * self.ld), mask, y);
                    }
                }
            }
        }
    }

    /// The 16 × 16 transpose: lane `i` of result `j` is lane `j` of `r[i]`.
    /// Four rounds of in-register shuffles (64 in all): pairs of rows
    /// interleaved, then pairs of pairs within each 128-bit lane, then
    /// 128-bit blocks twice.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for q in 0..8 {
            t[2 * q] = _mm512_unpacklo_ps(r[2 * q], r[2 * q + 1]);
            t[2 * q + 1] = _mm512_unpackhi_ps(r[2 * q], r[2 * q + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (lo01, hi01, lo23, hi23) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm512_shuffle_ps::<0x44>(lo01, lo23);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(lo01, lo23);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(hi01, hi23);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(hi01, hi23);
        }
        let mut v = [_mm512_setzero_ps(); 16];
        for h in 0..2 {
            for j in 0..4 {
                let (a, b) = (u[8 * h + j], u[8 * h + j + 4]);
                v[8 * h + j] = _mm512_shuffle_f32x4::<0x88>(a, b);
                v[8 * h + j + 4] = _mm512_shuffle_f32x4::<0xDD>(a, b);
            }
        }
        let mut o = [_mm512_setzero_ps(); 16];
        for j in 0..8 {
            o[j] = _mm512_shuffle_f32x4::<0x88>(v[j], v[j + 8]);
            o[j + 8] = _mm512_shuffle_f32x4::<0xDD>(v[j], v[j + 8]);
        }
        o
    }

    /// `acc[p][v] += Σ_k weights[k, v] · B[k, p]`, the sums taken and
    /// returned by value so that they live in registers through the loop.
    ///
    /// # Safety
    /// AVX-512F must be present; `b` must hold `N` values at each
    /// `b + offsets[kk]`, one row per `16 V` weights.
    #[inline]
    #[target_feature(enable = "avx512f")]
    // Index loops: the compiler unrolls them and keeps every sum in a
    // register (checked in the disassembly: no spills).
    #[allow(clippy::needless_range_loop)]
    unsafe fn accumulate<const N: usize, const V: usize>(
        mut acc: [[__m512; V]; N],
        weights: &[f32],
        b: *const f32,
        offsets: &[usize],
    ) -> [[__m512; V]; N] {
        for (w, &offset) in weights.chunks_exact(16 * V).zip(offsets) {
            let mut wv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                // SAFETY: 16 values of the chunk.
                wv[v] = unsafe { _mm512_loadu_ps(w.as_ptr().add(16 * v)) };
            }
            // SAFETY: the row holds N values (the caller's promise).
            let row = unsafe { b.add(offset) };
            // The next tile's part of this row (a prefetch never faults).
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(N).cast());
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(2 * N - 1).cast());
            for p in 0..N {
                // SAFETY: as above.
                let x = _mm512_set1_ps(unsafe { *row.add(p) });
                for v in 0..V {
                    acc[p][v] = _mm512_fmadd_ps(wv[v], x, acc[p][v]);
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::kernels::test_values as values;

    /// A layer's geometry in the tests: kernel, stride, dilation, padding
    /// (the same on both sides of each axis).
    type Geometry = (
        (usize, usize),
        (usize, usize),
        (usize, usize),
        (usize, usize),
    );

    /// The convolution's definition in `f64`, padding read as zeros.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        w: &[f32],
        x: &[f32],
        (c_in, c_out): (usize, usize),
        ((kh, kw), (sy, sx), (dy, dx), (py, px)): Geometry,
        (h, wd): (usize, usize),
        (oh, ow): (usize, usize),
        bias: Option<&[f32]>,
        activation: Activation,
        residual: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; c_out * oh * ow];
        for m in 0..c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = bias.map_or(0.0, |b| f64::from(b[m]));
                    for c in 0..c_in {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let y = (oy * sy + ky * dy).checked_sub(py).filter(|&y| y < h);
                                let xx = (ox * sx + kx * dx).checked_sub(px).filter(|&v| v < wd);
                                if let (Some(y), Some(xx)) = (y, xx) {
                                    let wi = ((m * c_in + c) * kh + ky) * kw + kx;
                                    s += f64::from(w[wi]) * f64::from(x[(c * h + y) * wd + xx]);
                                }
                            }
                        }
                    }
                    s = match activation {
                        Activation::None => s,
                        Activation::Clamp(lo, hi) => s.max(f64::from(lo)).min(f64::from(hi)),
                        Activation::Silu => s / (1.0 + (-s).exp()),
                    };
                    let at = (m * oh + oy) * ow + ox;
                    out[at] = s + residual.map_or(0.0, |r| f64::from(r[at]));
                }
            }
        }
        out
    }

    /// Runs `tiles` on random values, with and without bias and residual,
    /// and compares every output with the definition.
    fn check(
        tiles: &ChannelTiles,
        w: &[f32],
        (c_in, c_out): (usize, usize),
        geometry: Geometry,
        (h, wd): (usize, usize),
        (activation, seed): (Activation, u64),
    ) {
        let ((kh, kw), (sy, sx), (dy, dx), (py, px)) = geometry;
        let oh = (h + 2 * py - dy * (kh - 1) - 1) / sy + 1;
        let ow = (wd + 2 * px - dx * (kw - 1) - 1) / sx + 1;
        let x = values(seed + 100, c_in * h * wd);
        let bias = values(seed + 200, c_out);
        let residual = values(seed + 300, c_out * oh * ow);
        let k = c_in * kh * kw;
        for (bias, residual) in [(None, None), (Some(&bias[..]), Some(&residual[..]))] {
            let mut out = vec![MaybeUninit::new(f32::NAN); c_out * oh * ow];
            tiles.run(&x, (h, wd), (oh, ow), bias, activation, residual, &mut out);
            let want = naive(
                w,
                &x,
                (c_in, c_out),
                geometry,
                (h, wd),
                (oh, ow),
                bias,
                activation,
                residual,
            );
            for (j, (got, want)) in out.iter().zip(&want).enumerate() {
                // SAFETY: initialised (to NaN) before the run.
                let got = f64::from(unsafe { got.assume_init() });
                let bound = 1e-5 * (1.0 + (k as f64).sqrt()) * (1.0 + want.abs());
                assert!(
                    (got - want).abs() <= bound,
                    "{c_in}->{c_out} {geometry:?} on {h}×{wd}, {activation:?}: \
                     output {j} is {got}, want {want}"
                );
            }
        }
    }

    const ACTIVATIONS: [Activation; 3] = [
        Activation::None,
        Activation::Clamp(0.0, 6.0),
        Activation::Silu,
    ];

    #[test]
    fn pointwise_layers_match_the_definition_on_random_shapes() {
        if !super::super::avx512_or_record_skip("channel_tiles::pointwise_layers") {
            return;
        }
        // (c_out, c_in, h, w)
        let shapes = [
            (16, 1, 1, 1),
            (16, 3, 1, 13),
            (32, 7, 2, 7),
            (48, 20, 3, 5),
            (96, 576, 14, 14),
            (160, 960, 7, 7),
            (80, 33, 29, 1),
            (1280, 320, 7, 7),
            (64, 300, 1, 1),
            (112, 17, 28, 28),
        ];
        for (i, &(c_out, c_in, h, w)) in shapes.iter().enumerate() {
            let weight = values(i as u64, c_out * c_in);
            let tiles = ChannelTiles::pointwise(&weight, c_out, c_in).expect("AVX-512F");
            let pointwise = ((1, 1), (1, 1), (1, 1), (0, 0));
            let run = (ACTIVATIONS[i % 3], i as u64);
            check(&tiles, &weight, (c_in, c_out), pointwise, (h, w), run);
        }
    }

    #[test]
    fn layers_on_shifted_windows_match_the_definition_on_random_shapes() {
        if !super::super::avx512_or_record_skip("channel_tiles::layers_on_shifted_windows") {
            return;
        }
        // (c_in, c_out, h, w, geometry)
        let cases: [(usize, usize, usize, usize, Geometry); 9] = [
            (8, 16, 10, 10, ((3, 3), (1, 1), (1, 1), (1, 1))),
            (16, 32, 20, 20, ((3, 3), (2, 2), (1, 1), (1, 1))),
            (128, 64, 10, 10, ((3, 3), (2, 2), (1, 1), (1, 1))),
            (64, 48, 7, 9, ((3, 3), (1, 1), (1, 1), (1, 1))),
            (5, 16, 16, 31, ((5, 5), (2, 2), (1, 1), (2, 2))),
            (7, 32, 12, 15, ((3, 1), (1, 2), (1, 1), (1, 0))),
            (6, 16, 13, 13, ((3, 3), (1, 1), (2, 2), (2, 2))),
            (9, 16, 9, 17, ((3, 3), (2, 1), (2, 1), (0, 1))),
            (32, 16, 41, 3, ((3, 3), (1, 1), (1, 1), (0, 1))),
        ];
        for (i, &(c_in, c_out, h, w, geometry)) in cases.iter().enumerate() {
            let (kernel, stride, dilation, pads) = geometry;
            let weight = values(i as u64, c_out * c_in * kernel.0 * kernel.1);
            let patches = Patches {
                c_in,
                kernel,
                stride,
                dilation,
                pads,
            };
            let tiles = ChannelTiles::patches(&weight, c_out, patches).expect("AVX-512F");
            let run = (ACTIVATIONS[i % 3], i as u64);
            check(&tiles, &weight, (c_in, c_out), geometry, (h, w), run);
        }
    }

    #[test]
    fn a_nan_input_stays_nan_through_the_clamp() {
        if !super::super::avx512_or_record_skip("channel_tiles::a_nan_input_stays_nan") {
            return;
        }
        let tiles = ChannelTiles::pointwise(&[1.0; 16 * 2], 16, 2).expect("AVX-512F");
        let x = [f32::NAN, 1.0, 0.5, 2.0];
        let mut out = vec![MaybeUninit::new(0.0); 16 * 2];
        tiles.run(
            &x,
            (1, 2),
            (1, 2),
            None,
            Activation::Clamp(0.0, 6.0),
            None,
            &mut out,
        );
        // SAFETY: initialised before the run.
        let out: Vec<f32> = out
            .into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect();
        for m in 0..16 {
            assert!(out[m * 2].is_nan(), "channel {m}: {}", out[m * 2]);
            assert_eq!(out[m * 2 + 1], 3.0, "channel {m}");
        }
    }
}
