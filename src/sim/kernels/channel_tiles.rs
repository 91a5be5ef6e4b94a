//! Pointwise convolutions with the output channels in the vector lanes:
//! `out[m, p] = act(bias[m] + Σ_k W[m, k] · x[k, p]) (+ residual[m, p])`
//! computed as tiles of 32 output channels (two 16-lane vectors) × 14
//! positions, each position one broadcast of `x[k, p]` per input channel.
//!
//! The tiled kernel ([`super::tiled`]) puts positions in the lanes, which
//! wastes lanes when a plane's size is not a multiple of 32: 49 positions
//! (7×7) fill 49 of 64 lanes, 196 (14×14) 196 of 224. Here the lanes hold
//! output channels, whose counts are multiples of 16 in the layers this
//! kernel takes, and a tile of fewer positions is simply a shorter one, so
//! nothing is wasted at any plane size. The price is the store: a tile's
//! sums are a column per position, and the output is NCHW, so each tile is
//! turned around in registers (a 16 × 16 transpose per vector of channels)
//! before it is written — a cost per output, against `k` multiply-adds per
//! output, which is why only layers with deep columns ([`MIN_DEPTH`]) take
//! this kernel. Each row
//! of `x` is read as 14 consecutive values, one row after another at a
//! fixed stride: a pattern the hardware prefetcher follows, where the tiled
//! kernel's rows of 32 values a plane apart need software prefetches.
//!
//! Only for CPUs with AVX-512F; elsewhere the constructor declines.

use super::activation::Activation;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Positions per tile: with two vectors of output channels each, 28 sums
/// in registers, two more for the weights, of the 32 there are.
const POSITIONS: usize = 14;
/// Output channels per block of the packed weight (a layer's last block
/// may hold 16).
const BLOCK: usize = 32;
/// Input channels from which a pointwise layer takes this kernel: storing
/// a tile costs about as much as 16 to 20 rows of its sum (a fifth of the
/// kernel's time at 64 to 96 input channels), so shallower layers keep the
/// tiled kernel (see `docs/engine.md`).
pub const MIN_DEPTH: usize = 64;

/// A pointwise layer's weight packed for the tiles.
pub struct ChannelTiles {
    /// Block `b` (output channels `32b..`, at most 32 of them) starts at
    /// `32b · k` and holds, for each input channel `kk` in turn, the
    /// weights `W[32b + j, kk]` of its channels `j`.
    packed: Vec<f32>,
    c_out: usize,
    k: usize,
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

impl ChannelTiles {
    /// A pointwise layer with weight `[c_out, k]`; `None` when the CPU lacks
    /// AVX-512F or `c_out` is not a multiple of 16.
    pub fn new(weight: &[f32], c_out: usize, k: usize) -> Option<ChannelTiles> {
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
        Some(ChannelTiles { packed, c_out, k })
    }

    /// Output channels.
    pub fn c_out(&self) -> usize {
        self.c_out
    }

    /// One sample: `x` is `[k, cols]`; `out` and `residual` are
    /// `[c_out, cols]`. Writes every value of `out`.
    pub fn run(
        &self,
        x: &[f32],
        cols: usize,
        bias: Option<&[f32]>,
        activation: Activation,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (c_out, k) = (self.c_out, self.k);
        assert_eq!(x.len(), k * cols, "the input is [k, cols]");
        assert_eq!(out.len(), c_out * cols, "the output is [c_out, cols]");
        if let Some(r) = residual {
            assert_eq!(r.len(), out.len(), "the residual is [c_out, cols]");
        }
        if let Some(b) = bias {
            assert_eq!(b.len(), c_out, "one bias per output channel");
        }
        if cols == 0 {
            return;
        }
        let blocks = c_out.div_ceil(BLOCK);
        let tiles = cols.div_ceil(POSITIONS);
        // Small layers (under ~1M multiply-adds) run on the calling thread.
        let parallel = c_out * cols * k >= 1 << 20;
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
            let width = BLOCK.min(c_out - m0);
            let weights = &self.packed[m0 * k..][..width * k];
            let mut lane_bias = [0f32; BLOCK];
            if let Some(b) = bias {
                lane_bias[..width].copy_from_slice(&b[m0..m0 + width]);
            }
            for tile in run * per_run..((run + 1) * per_run).min(tiles) {
                let p0 = tile * POSITIONS;
                let tile = avx512::Tile {
                    weights,
                    k,
                    x: &x[p0..],
                    cols,
                    bias: &lane_bias,
                    activation,
                    residual: residual.map(|r| &r[m0 * cols + p0..]),
                };
                let n = POSITIONS.min(cols - p0);
                // SAFETY: AVX-512F is present (the constructor checked);
                // the tile writes output channels m0..m0 + width at
                // positions p0..p0 + n, inside `out` (rows of `cols`), and
                // no other task writes those.
                unsafe { tile.run(width / 16, n, dst.at(m0 * cols + p0)) };
            }
        };
        if parallel {
            (0..blocks * runs).into_par_iter().for_each(task);
        } else {
            (0..blocks * runs).for_each(task);
        }
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
    use super::{Activation, POSITIONS};
    use crate::sim::kernels::activation::avx512::apply16;
    use std::arch::x86_64::*;

    /// One tile: up to 32 output channels × up to [`POSITIONS`] positions.
    pub struct Tile<'a> {
        /// The block's packed weights: `vectors · 16` per input channel.
        pub weights: &'a [f32],
        /// Input channels.
        pub k: usize,
        /// The input from the tile's first position on; channel `kk` at
        /// `x[kk · cols..]`.
        pub x: &'a [f32],
        /// Positions per channel (row stride of input, output, residual).
        pub cols: usize,
        /// The block's biases (zero when the layer has none).
        pub bias: &'a [f32; 32],
        pub activation: Activation,
        /// The residual at the tile's first channel and position.
        pub residual: Option<&'a [f32]>,
    }

    impl Tile<'_> {
        /// Sums and stores `vectors · 16` output channels × `n` positions
        /// at `out` (rows `cols` apart).
        ///
        /// # Safety
        /// AVX-512F must be present; `out` must hold `vectors · 16` writable
        /// rows of `n` values at stride `cols`; `n ≤ POSITIONS` positions
        /// must exist in every row of `x` and of the residual.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn run(&self, vectors: usize, n: usize, out: *mut f32) {
            debug_assert!((1..=2).contains(&vectors) && (1..=POSITIONS).contains(&n));
            debug_assert!(self.weights.len() == self.k * vectors * 16);
            debug_assert!(self.x.len() >= (self.k - 1) * self.cols + n);
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
            let acc = unsafe { accumulate::<N, V>(acc, self.weights, self.x.as_ptr(), self.cols) };
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
                            let r = _mm512_maskz_loadu_ps(mask, r.as_ptr().add(m * self.cols));
                            y = _mm512_add_ps(y, r);
                        }
                        _mm512_mask_storeu_ps(out.add(m * self.cols), mask, y);
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

    /// `acc[p][v] += Σ_k weights[k, v] · x[k, p]`, the sums taken and
    /// returned by value so that they live in registers through the loop.
    ///
    /// # Safety
    /// AVX-512F must be present; `x` must hold `N` values at each
    /// `x + kk · cols`, `kk < weights.len() / (16 V)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    // Index loops: the compiler unrolls them and keeps every sum in a
    // register (checked in the disassembly: no spills).
    #[allow(clippy::needless_range_loop)]
    unsafe fn accumulate<const N: usize, const V: usize>(
        mut acc: [[__m512; V]; N],
        weights: &[f32],
        x: *const f32,
        cols: usize,
    ) -> [[__m512; V]; N] {
        for (kk, w) in weights.chunks_exact(16 * V).enumerate() {
            let mut wv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                // SAFETY: 16 values of the chunk.
                wv[v] = unsafe { _mm512_loadu_ps(w.as_ptr().add(16 * v)) };
            }
            // SAFETY: row kk holds N values (the caller's promise).
            let row = unsafe { x.add(kk * cols) };
            // The next tile's part of this row (a prefetch never faults).
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(N).cast());
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(2 * N - 1).cast());
            for p in 0..N {
                // SAFETY: as above.
                let b = _mm512_set1_ps(unsafe { *row.add(p) });
                for v in 0..V {
                    acc[p][v] = _mm512_fmadd_ps(wv[v], b, acc[p][v]);
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

    /// The definition in `f64`.
    fn naive(
        w: &[f32],
        x: &[f32],
        (c_out, k, cols): (usize, usize, usize),
        bias: Option<&[f32]>,
        activation: Activation,
        residual: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; c_out * cols];
        for m in 0..c_out {
            for p in 0..cols {
                let mut s = bias.map_or(0.0, |b| f64::from(b[m]));
                for kk in 0..k {
                    s += f64::from(w[m * k + kk]) * f64::from(x[kk * cols + p]);
                }
                s = match activation {
                    Activation::None => s,
                    Activation::Clamp(lo, hi) => s.max(f64::from(lo)).min(f64::from(hi)),
                    Activation::Silu => s / (1.0 + (-s).exp()),
                };
                out[m * cols + p] = s + residual.map_or(0.0, |r| f64::from(r[m * cols + p]));
            }
        }
        out
    }

    #[test]
    fn layers_match_the_definition_on_random_shapes() {
        let Some(_) = ChannelTiles::new(&[0.0; 16], 16, 1) else {
            eprintln!("no AVX-512F: the kernel declines, nothing to test");
            return;
        };
        let shapes = [
            (16, 1, 1),
            (16, 3, 13),
            (32, 7, 14),
            (48, 20, 15),
            (96, 576, 196),
            (160, 960, 49),
            (80, 33, 29),
            (1280, 320, 49),
            (64, 300, 1),
            (112, 17, 784),
        ];
        let activations = [
            Activation::None,
            Activation::Clamp(0.0, 6.0),
            Activation::Silu,
        ];
        for (i, &(c_out, k, cols)) in shapes.iter().enumerate() {
            let seed = i as u64;
            let w = values(seed, c_out * k);
            let x = values(seed + 100, k * cols);
            let bias = values(seed + 200, c_out);
            let residual = values(seed + 300, c_out * cols);
            let tiles = ChannelTiles::new(&w, c_out, k).expect("AVX-512F is present");
            let activation = activations[i % 3];
            for (bias, residual) in [(None, None), (Some(&bias[..]), Some(&residual[..]))] {
                let mut out = vec![MaybeUninit::new(f32::NAN); c_out * cols];
                tiles.run(&x, cols, bias, activation, residual, &mut out);
                let want = naive(&w, &x, (c_out, k, cols), bias, activation, residual);
                for (j, (got, want)) in out.iter().zip(&want).enumerate() {
                    // SAFETY: initialised (to NaN) before the run.
                    let got = f64::from(unsafe { got.assume_init() });
                    let bound = 1e-5 * (1.0 + (k as f64).sqrt()) * (1.0 + want.abs());
                    assert!(
                        (got - want).abs() <= bound,
                        "{c_out}×{k}×{cols} {activation:?}: output {j} is {got}, want {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_nan_input_stays_nan_through_the_clamp() {
        let Some(tiles) = ChannelTiles::new(&[1.0; 16 * 2], 16, 2) else {
            return;
        };
        let x = [f32::NAN, 1.0, 0.5, 2.0];
        let mut out = vec![MaybeUninit::new(0.0); 16 * 2];
        tiles.run(&x, 2, None, Activation::Clamp(0.0, 6.0), None, &mut out);
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
