//! Convolutions of one group as AVX-512 GEMM tiles writing NCHW outputs:
//! `out[m, p] = act(bias[m] + Σ_k W[m, k] · B[k, p]) (+ residual[m, p])`,
//! where `B` is the input itself for a pointwise layer (1×1, stride 1, no
//! padding: each input channel's row of positions is already contiguous)
//! and the im2col matrix of the input otherwise, built a block of columns
//! at a time, in cache, by whole runs of image rows.
//!
//! Against the general GEMM ([`super::conv`]) this packs nothing per call
//! for pointwise layers, builds im2col blocks with row copies where the
//! GEMM's packer gathers value by value, and applies bias, activation
//! (clamp or SiLU) and a residual to each tile while it is in registers,
//! writing every output once. The weight is packed once, in panels of 12
//! output channels (8 when the layer's channel count is a multiple of 8 but
//! not of 12, so no panel is part empty). A tile holds 12 (or 8) × 32 sums
//! in 24 (or 16) vector registers; positions past the end of a row are
//! masked off, output channels past the last are zero rows of the panel
//! that are never stored. The sum over `k` runs in slices of 256 rows of
//! `B` (partial sums wait in the output between slices), so that a slice of
//! a block and of a panel stay in cache. While a tile sums a row of `B` it
//! prefetches the next tile's part of that row: rows lie far apart (a
//! pointwise layer's are the input's channel planes), too many streams for
//! the hardware prefetcher, and a layer's input is often no longer in the
//! core's own cache. Tasks (in parallel) are a block of
//! columns times a run of panels, so that narrow outputs (7×7 positions)
//! still make enough tasks.
//!
//! Only for CPUs with AVX-512F; elsewhere the constructors decline and the
//! convolution runs on the general GEMM.

use super::activation::Activation;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// Output channels per tile: 12, or 8 for layers whose channel count is a
/// multiple of 8 but not of 12.
fn panel_rows(c_out: usize) -> usize {
    if !c_out.is_multiple_of(12) && c_out.is_multiple_of(8) {
        8
    } else {
        12
    }
}
/// Positions per tile (two 16-lane vectors).
const NR: usize = 32;
/// Values of `B` a task's block of columns holds at most (128 KiB), and
/// the rows of `B` summed between visits to the output (a slice of the
/// block, at most 256 rows, is read once per panel and stays in the core's
/// cache).
const BLOCK_VALUES: usize = 32 * 1024;
const DEPTH: usize = 256;

/// A convolution's weight packed for the tiles, and where `B` comes from.
pub struct TiledConv {
    /// Panel `t` holds, for each row `k` of `B` in turn, the weights
    /// `W[t·mr + r, k]` for `r < mr` (zero past the last output channel).
    panels: Vec<f32>,
    /// Output channels per panel ([`panel_rows`]).
    mr: usize,
    /// Rows of `B`.
    k: usize,
    c_out: usize,
    /// `None`: `B` is the input (pointwise layer).
    patches: Option<Patches>,
    /// Whether strides of 1 and 2 read shifted windows of the input
    /// ([`Shifted`]) rather than im2col blocks (the tests run both).
    shift: bool,
}

/// Checks one sample's arguments to a kernel for layers of one group:
/// `x` is `[c_in, h, w]`, the output (`out_len` values) and the residual
/// `[c_out, oh, ow]`, one bias per output channel, and a pointwise layer
/// keeps the positions.
pub(super) fn check_sample(
    (x, c_in, (h, w)): (&[f32], usize, (usize, usize)),
    pointwise: bool,
    (out_len, c_out, (oh, ow)): (usize, usize, (usize, usize)),
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) {
    assert_eq!(x.len(), c_in * h * w, "the input is [c_in, h, w]");
    if pointwise {
        assert_eq!(h * w, oh * ow, "a pointwise layer keeps the positions");
    }
    assert_eq!(out_len, c_out * oh * ow, "the output is [c_out, oh, ow]");
    if let Some(r) = residual {
        assert_eq!(r.len(), out_len, "the residual is [c_out, oh, ow]");
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), c_out, "one bias per output channel");
    }
}

/// The im2col geometry of a convolution of one group.
#[derive(Clone, Copy, Debug)]
pub struct Patches {
    /// Input channels.
    pub c_in: usize,
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Vertical and horizontal stride.
    pub stride: (usize, usize),
    /// Vertical and horizontal dilation.
    pub dilation: (usize, usize),
    /// Padding above and on the left.
    pub pads: (usize, usize),
}

/// Whether this CPU runs the AVX-512 tiles (here and in
/// [`super::channel_tiles`]).
pub(super) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// A task's block of im2col columns (reused from task to task).
    static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A task's outputs over the shifted grid, before they are compacted
    /// into the output (reused from task to task).
    static GRID_OUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl TiledConv {
    /// A pointwise layer with weight `[c_out, c_in]`; `None` when the CPU
    /// lacks AVX-512F.
    pub fn pointwise(weight: &[f32], c_out: usize, c_in: usize) -> Option<TiledConv> {
        TiledConv::new(weight, c_out, c_in, None)
    }

    /// A layer with weight `[c_out, c_in, kh, kw]` on im2col columns;
    /// `None` when the CPU lacks AVX-512F.
    pub fn patches(weight: &[f32], c_out: usize, patches: Patches) -> Option<TiledConv> {
        let k = patches.c_in * patches.kernel.0 * patches.kernel.1;
        TiledConv::new(weight, c_out, k, Some(patches))
    }

    fn new(weight: &[f32], c_out: usize, k: usize, patches: Option<Patches>) -> Option<TiledConv> {
        if !supported() || k == 0 {
            return None;
        }
        assert_eq!(weight.len(), c_out * k, "the weight is [c_out, k]");
        let mr = panel_rows(c_out);
        let tiles = c_out.div_ceil(mr);
        let mut panels = vec![0f32; tiles * k * mr];
        for (m, row) in weight.chunks_exact(k).enumerate() {
            let panel = &mut panels[(m / mr) * k * mr..][..k * mr];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * mr + m % mr] = v;
            }
        }
        Some(TiledConv {
            panels,
            mr,
            k,
            c_out,
            patches,
            shift: true,
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
        let cols = oh * ow;
        let c_in = self.patches.map_or(self.k, |p| p.c_in);
        let pointwise = self.patches.is_none();
        check_sample(
            (x, c_in, (h, w)),
            pointwise,
            (out.len(), self.c_out, (oh, ow)),
            bias,
            residual,
        );
        let shifted = match self.patches {
            Some(p) if self.shift && shifted_windows(&p, self.c_out) => {
                Some(Shifted::new(&p, (oh, ow)))
            }
            _ => None,
        };
        // Columns of `B`: output positions, or the shifted grid's.
        let span = shifted.as_ref().map_or(cols, |s| s.columns);
        let row_tiles = self.c_out.div_ceil(self.mr);
        let col_tiles = span.div_ceil(NR);
        if row_tiles == 0 || col_tiles == 0 {
            return;
        }
        // Small layers (under ~1M multiply-adds, some 30 µs) run on the
        // calling thread: splitting them costs more than it gains.
        let parallel = self.c_out * cols * self.k >= 1 << 20;
        let wanted = if parallel {
            4 * rayon::current_num_threads()
        } else {
            1
        };
        let block_tiles =
            (BLOCK_VALUES / (self.k.min(DEPTH) * NR)).clamp(1, col_tiles.div_ceil(wanted).max(1));
        let col_blocks = col_tiles.div_ceil(block_tiles);
        // Splitting the panels of a block between tasks makes each task
        // build the block's im2col again: im2col layers do not split.
        let splits = match (self.patches, &shifted) {
            (Some(_), None) => 1,
            _ => wanted.div_ceil(col_blocks).clamp(1, row_tiles),
        };
        let per_task = row_tiles.div_ceil(splits);
        let splits = row_tiles.div_ceil(per_task);
        let output = Output {
            ld: cols,
            origin: (0, 0),
            bias,
            activation,
            residual,
            dst: OutPtr(out.as_mut_ptr().cast::<f32>()),
        };
        // Where each row of `B` starts.
        // (im2col blocks make their own per task.)
        let (source, offsets) = match (&self.patches, &shifted) {
            (None, _) => (Vec::new(), (0..self.k).map(|k| k * cols).collect()),
            (Some(p), Some(s)) => s.source(p, x, (h, w), parallel),
            (Some(_), None) => (Vec::new(), Vec::new()),
        };
        let task = |task: usize| {
            let (block, split) = (task / splits, task % splits);
            let c0 = block * block_tiles * NR;
            let c1 = (c0 + block_tiles * NR).min(span);
            let tiles = split * per_task..((split + 1) * per_task).min(row_tiles);
            match (&self.patches, &shifted) {
                (None, _) => self.sweep((x, &offsets, 0), c0..c1, tiles, &output),
                (Some(p), None) => BLOCK.with_borrow_mut(|block| {
                    block.resize(self.k * (c1 - c0), 0.0);
                    im2col_block(p, x, (h, w), ow, c0..c1, block);
                    let rows: Vec<usize> = (0..self.k).map(|k| k * (c1 - c0)).collect();
                    self.sweep((block.as_slice(), &rows, c0), c0..c1, tiles, &output)
                }),
                (Some(_), Some(s)) => GRID_OUT.with_borrow_mut(|grid| {
                    let m0 = tiles.start * self.mr;
                    let m1 = (tiles.end * self.mr).min(self.c_out);
                    grid.resize((m1 - m0) * (c1 - c0), 0.0);
                    let staged = Output {
                        ld: c1 - c0,
                        origin: (m0, c0),
                        residual: None,
                        dst: OutPtr(grid.as_mut_ptr()),
                        ..output
                    };
                    self.sweep((&source, &offsets, 0), c0..c1, tiles, &staged);
                    // SAFETY: this task owns output channels m0..m1 at the
                    // positions of grid columns c0..c1 (no other task's).
                    unsafe { s.compact(grid, (m0..m1, c0..c1), (oh, ow), &output) };
                }),
            }
        };
        if parallel {
            (0..col_blocks * splits).into_par_iter().for_each(task);
        } else {
            (0..col_blocks * splits).for_each(task);
        }
    }

    /// The panels `tiles` over the columns `range` of `B`, whose row `k`
    /// starts at `b[offsets[k]]`, its first column being column `b_first`.
    fn sweep(
        &self,
        b: (&[f32], &[usize], usize),
        range: std::ops::Range<usize>,
        tiles: std::ops::Range<usize>,
        output: &Output<'_>,
    ) {
        match self.mr {
            8 => self.sweep_with::<8>(b, range, tiles, output),
            _ => self.sweep_with::<12>(b, range, tiles, output),
        }
    }

    /// `sweep` with `MR` rows per panel (`self.mr`).
    fn sweep_with<const MR: usize>(
        &self,
        (b, offsets, b_first): (&[f32], &[usize], usize),
        range: std::ops::Range<usize>,
        tiles: std::ops::Range<usize>,
        output: &Output<'_>,
    ) {
        debug_assert_eq!(offsets.len(), self.k);
        // The sum over `k` in slices of `DEPTH` rows of `B`: a slice of the
        // block and of a panel stay in cache while every panel and tile uses
        // them; between slices the partial sums wait in the output.
        for k0 in (0..self.k).step_by(DEPTH) {
            let depth = DEPTH.min(self.k - k0);
            let rows = &offsets[k0..k0 + depth];
            let b = (b, rows, b_first);
            self.slice_with::<MR>(k0, b, range.clone(), tiles.clone(), output);
        }
    }

    /// One slice of the sum, from row `k0` of `B` on: that slice's rows
    /// (start of row `kk` at `offsets[kk]`, from column `b_first` on).
    fn slice_with<const MR: usize>(
        &self,
        k0: usize,
        (b, offsets, b_first): (&[f32], &[usize], usize),
        range: std::ops::Range<usize>,
        tiles: std::ops::Range<usize>,
        output: &Output<'_>,
    ) {
        let Output {
            ld,
            origin,
            bias,
            activation,
            residual,
            dst,
        } = *output;
        let depth = offsets.len();
        let stage = match (k0 == 0, k0 + depth == self.k) {
            (_, true) if k0 == 0 => avx512::Stage::Only,
            (_, true) => avx512::Stage::Last,
            (true, false) => avx512::Stage::First,
            (false, false) => avx512::Stage::Middle,
        };
        for t in tiles.clone() {
            let m0 = t * MR;
            let rows = MR.min(self.c_out - m0);
            let mut tile_bias = [0f32; MR];
            if let Some(bias) = bias {
                tile_bias[..rows].copy_from_slice(&bias[m0..m0 + rows]);
            }
            let panel = &self.panels[(t * self.k + k0) * MR..][..depth * MR];
            for c0 in range.clone().step_by(NR) {
                let width = NR.min(range.end - c0);
                let at = (m0 - origin.0) * ld + c0 - origin.1;
                let b_at = c0 - b_first;
                // SAFETY: AVX-512F is present (the constructors checked).
                // The tile reads `width` values from each
                // `b[b_at + offsets[kk]..]`, kk < depth, inside `b` (each
                // row of the slice holds the tile's columns), and reads
                // (after the first slice) and writes
                // `out[m0 + r, c0..c0 + width]` for r < rows, inside `out`
                // (reading the residual there, as large); tasks cover
                // disjoint (row, column) ranges, so no two threads touch
                // the same value.
                unsafe {
                    let tile = avx512::Tile {
                        panel,
                        b: b.as_ptr().add(b_at),
                        offsets,
                        width,
                        bias: &tile_bias,
                        activation,
                        residual: residual.map(|r| r.as_ptr().add(at)),
                        ld,
                        rows,
                        stage,
                    };
                    tile.run(dst.at(at));
                }
            }
        }
    }
}

/// Columns `range` of the im2col matrix of `x` (`[c_in, h, w]`) into `b`
/// (`k` rows of `range.len()` values): row `(c, ky, kx)` holds, for each
/// output position, the input value its tap reads, or 0 in the padding.
/// Each output row's run of positions is one copy (stride 1) or one strided
/// gather, with the padding's zeros at its ends.
fn im2col_block(
    p: &Patches,
    x: &[f32],
    (h, w): (usize, usize),
    ow: usize,
    range: std::ops::Range<usize>,
    b: &mut [f32],
) {
    let width = range.len();
    let (kh, kw) = p.kernel;
    let (sy, sx) = p.stride;
    let (dy, dx) = p.dilation;
    let mut row = 0;
    for c in 0..p.c_in {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for ky in 0..kh {
            for kx in 0..kw {
                let dst = &mut b[row * width..(row + 1) * width];
                row += 1;
                let off_x = (kx * dx) as isize - p.pads.1 as isize;
                let mut col = range.start;
                while col < range.end {
                    let (oy, ox) = (col / ow, col % ow);
                    let run = (ow - ox).min(range.end - col);
                    let d = &mut dst[col - range.start..][..run];
                    col += run;
                    let iy = (oy * sy + ky * dy) as isize - p.pads.0 as isize;
                    if iy < 0 || iy >= h as isize {
                        d.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                    // Positions j of the run whose tap lies inside the row:
                    // 0 ≤ (ox + j)·sx + off_x < w.
                    let first = (-off_x).max(0) as usize;
                    let lo = first.div_ceil(sx).saturating_sub(ox).min(run);
                    let last = w as isize - 1 - off_x;
                    let hi = if last < 0 {
                        0
                    } else {
                        (last as usize / sx + 1).saturating_sub(ox).clamp(lo, run)
                    };
                    d[..lo].fill(0.0);
                    d[hi..].fill(0.0);
                    if lo == hi {
                        continue;
                    }
                    let start = ((ox + lo) * sx) as isize + off_x;
                    if sx == 1 {
                        d[lo..hi].copy_from_slice(&src[start as usize..][..hi - lo]);
                    } else if sx == 2 {
                        every_other(as_slots(&mut d[lo..hi]), &src[start as usize..]);
                    } else {
                        let taps = src[start as usize..].iter().step_by(sx);
                        for (v, s) in d[lo..hi].iter_mut().zip(taps) {
                            *v = *s;
                        }
                    }
                }
            }
        }
    }
}

/// Whether a layer with `patches` and `c_out` outputs reads shifted windows
/// ([`Shifted`]) rather than im2col blocks: strides of 1 and 2, and columns
/// deeper than the outputs — shifted windows trade im2col's `k` values per
/// position for a copy of the `c_out` outputs (the compaction); measured
/// 1.5–2.5× faster on 3×3 layers of 16 and 32 channels, slower on a first
/// layer of 3 input channels and 32 outputs.
pub fn shifted_windows(patches: &Patches, c_out: usize) -> bool {
    let k = patches.c_in * patches.kernel.0 * patches.kernel.1;
    k > c_out && patches.stride.0 <= 2 && patches.stride.1 <= 2
}

/// `B` without im2col, for strides of 1 and 2: the input is copied once,
/// zero-padded, into `sy × sx` phase planes per channel (phase `(py, px)`
/// holds the padded rows `≡ py` and columns `≡ px` modulo the strides), each
/// `rows × row` values. Tap `(ky, kx)` of output `(oy, ox)` then reads its
/// phase plane at `(oy + ky·dy / sy, ox + kx·dx / sx)`, so over the grid of
/// `oh × row` positions every row of `B` is one contiguous run of a phase
/// plane, shifted. The grid's last `row − ow` columns of each output row
/// are computed and dropped ([`Shifted::compact`]); the copy costs a pass
/// over the input where im2col wrote every value `kh × kw` times.
pub(super) struct Shifted {
    /// Columns of the grid (`oh × row`).
    columns: usize,
    /// Values per row of a phase plane.
    pub(super) row: usize,
    /// Rows of a phase plane: the output's, the kernel's reach, and one
    /// more for the reads of a last row's dropped columns.
    rows: usize,
    stride: (usize, usize),
}

impl Shifted {
    pub(super) fn new(p: &Patches, (oh, ow): (usize, usize)) -> Shifted {
        let (sy, sx) = p.stride;
        let reach_y = (p.kernel.0 - 1) * p.dilation.0 / sy;
        let reach_x = (p.kernel.1 - 1) * p.dilation.1 / sx;
        let row = ow + reach_x;
        Shifted {
            columns: oh * row,
            row,
            rows: oh + reach_y + 1,
            stride: (sy, sx),
        }
    }

    /// Values of one channel's phase planes.
    fn channel(&self) -> usize {
        self.stride.0 * self.stride.1 * self.rows * self.row
    }

    /// The phase planes of `x` (`[c_in, h, w]`) and where each row of `B`
    /// (`(c, ky, kx)`, the weight's order) starts in them.
    /// Channels are copied in parallel when `parallel`.
    pub(super) fn source(
        &self,
        p: &Patches,
        x: &[f32],
        (h, w): (usize, usize),
        parallel: bool,
    ) -> (Vec<f32>, Vec<usize>) {
        let (sy, sx) = self.stride;
        let plane = self.rows * self.row;
        // Every value is written once below, padding included, so the planes
        // are not zeroed first (a whole extra pass over them).
        let total = p.c_in * self.channel();
        let mut planes: Vec<MaybeUninit<f32>> = Vec::with_capacity(total);
        // SAFETY: slots need no initialisation; each is written below.
        unsafe { planes.set_len(total) };
        if cfg!(debug_assertions) {
            // A slot the copy missed would then show in the tests' outputs.
            planes.fill(MaybeUninit::new(f32::NAN));
        }
        let image = (h * w).max(1);
        let copy = |(dst, src): (&mut [MaybeUninit<f32>], &[f32])| {
            let zero = MaybeUninit::new(0.0);
            for (phase, dst) in dst.chunks_exact_mut(plane).enumerate() {
                let (py, px) = (phase / sx, phase % sx);
                // Input columns of this phase: x0, x0 + sx, …, from plane column `col`.
                let x0 = (px + sx - p.pads.1 % sx) % sx;
                let col = ((x0 + p.pads.1) / sx).min(self.row);
                let n = if x0 < w {
                    (w - x0).div_ceil(sx).min(self.row - col)
                } else {
                    0
                };
                for (r, d) in dst.chunks_exact_mut(self.row).enumerate() {
                    let y = (r * sy + py)
                        .checked_sub(p.pads.0)
                        .filter(|&y| y < h && n > 0);
                    let Some(y) = y else {
                        d.fill(zero);
                        continue;
                    };
                    let line = &src[y * w..(y + 1) * w];
                    d[..col].fill(zero);
                    if sx == 1 {
                        d[col..col + n].write_copy_of_slice(&line[x0..x0 + n]);
                    } else {
                        every_other(&mut d[col..col + n], &line[x0..]);
                    }
                    d[col + n..].fill(zero);
                }
            }
        };
        if parallel {
            planes
                .par_chunks_exact_mut(self.channel())
                .zip(x.par_chunks_exact(image))
                .for_each(copy);
        } else {
            planes
                .chunks_exact_mut(self.channel())
                .zip(x.chunks_exact(image))
                .for_each(copy);
        }
        // SAFETY: every slot was written (each plane row of each phase of
        // each channel, above); same layout.
        let planes = unsafe {
            let mut planes = std::mem::ManuallyDrop::new(planes);
            Vec::from_raw_parts(
                planes.as_mut_ptr().cast::<f32>(),
                planes.len(),
                planes.capacity(),
            )
        };
        let (kh, kw) = p.kernel;
        let mut offsets = Vec::with_capacity(p.c_in * kh * kw);
        for c in 0..p.c_in {
            for ky in 0..kh {
                for kx in 0..kw {
                    let (ry, rx) = (ky * p.dilation.0, kx * p.dilation.1);
                    let phase = (ry % sy) * sx + rx % sx;
                    offsets
                        .push(c * self.channel() + phase * plane + (ry / sy) * self.row + rx / sx);
                }
            }
        }
        debug_assert!(
            offsets.iter().all(|&o| o + self.columns <= planes.len()),
            "every row of B lies in the phase planes"
        );
        (planes, offsets)
    }

    /// Writes output channels `m` of grid columns `c` from `grid` (their
    /// sums, `c.len()` per channel) to the output, adding the residual,
    /// leaving out the grid's dropped columns.
    ///
    /// # Safety
    /// No other thread may write those outputs meanwhile.
    unsafe fn compact(
        &self,
        grid: &[f32],
        (m, c): (std::ops::Range<usize>, std::ops::Range<usize>),
        (oh, ow): (usize, usize),
        output: &Output<'_>,
    ) {
        let cols = oh * ow;
        for (i, ch) in m.enumerate() {
            let sums = &grid[i * c.len()..(i + 1) * c.len()];
            let mut f = c.start;
            while f < c.end {
                let (oy, ox) = (f / self.row, f % self.row);
                let run = (self.row - ox).min(c.end - f);
                if ox < ow {
                    let n = run.min(ow - ox);
                    let at = ch * cols + oy * ow + ox;
                    let from = &sums[f - c.start..][..n];
                    // SAFETY: output `at .. at + n` lies in channel `ch`'s
                    // row `oy`, which only this task writes (the caller's
                    // promise).
                    let to = unsafe {
                        std::slice::from_raw_parts_mut(
                            output.dst.at(at).cast::<MaybeUninit<f32>>(),
                            n,
                        )
                    };
                    match output.residual {
                        Some(r) => {
                            for ((t, s), r) in to.iter_mut().zip(from).zip(&r[at..at + n]) {
                                t.write(s + r);
                            }
                        }
                        None => {
                            to.write_copy_of_slice(from);
                        }
                    }
                }
                f += run;
            }
        }
    }
}

/// `dst[j] = src[2j]` (`src` holds at least `2·dst.len() − 1` values): 16
/// values at a time from two loads and one permutation with AVX-512.
fn every_other(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert!(src.len() + 1 >= 2 * dst.len(), "the source holds every tap");
    #[cfg(target_arch = "x86_64")]
    if supported() {
        // SAFETY: AVX-512F is present; lengths asserted above.
        unsafe { avx512::every_other(dst, src) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src.iter().step_by(2)) {
        d.write(*s);
    }
}

/// `values` as slots to write (only ever written with initialised values).
fn as_slots(values: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; the slots are only written with floats, so the
    // values stay initialised.
    unsafe { &mut *(values as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// What every tile of one run shares: where it writes (row `m`, column
/// `c` at `dst[(m − origin.0)·ld + c − origin.1]`, the residual alike) and
/// what is applied before writing.
#[derive(Clone, Copy)]
struct Output<'a> {
    ld: usize,
    origin: (usize, usize),
    bias: Option<&'a [f32]>,
    activation: Activation,
    residual: Option<&'a [f32]>,
    dst: OutPtr,
}

/// The output, written by tasks in disjoint tiles.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);

impl OutPtr {
    /// The output from value `offset` on.
    ///
    /// # Safety
    /// `offset` must lie inside the output.
    pub(super) unsafe fn at(self, offset: usize) -> *mut f32 {
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
    use super::{Activation, NR};
    use crate::sim::kernels::activation::avx512::apply16 as activate;
    use std::arch::x86_64::*;

    /// One `MR × width` tile (`width ≤ NR`) of the product.
    pub struct Tile<'a, const MR: usize> {
        /// The weight panel: `MR` weights per row of `b`.
        pub panel: &'a [f32],
        /// The tile's first column of `B`; row `k` at `b + offsets[k]`.
        pub b: *const f32,
        pub offsets: &'a [usize],
        pub width: usize,
        pub bias: &'a [f32; MR],
        pub activation: Activation,
        /// Added after the activation; rows at stride `ld`.
        pub residual: Option<*const f32>,
        /// Row stride of the output and the residual.
        pub ld: usize,
        /// Output rows to store (the panel's real output channels).
        pub rows: usize,
        /// Which slice of the sum over `k` the panel holds.
        pub stage: Stage,
    }

    /// Where a tile's slice of the sum over `k` lies in the whole.
    #[derive(Clone, Copy, PartialEq)]
    pub enum Stage {
        /// The whole sum: start from the bias, finish with activation and
        /// residual.
        Only,
        /// The first of several: start from the bias, store partial sums.
        First,
        /// Neither first nor last: continue from the stored partial sums.
        Middle,
        /// The last of several: continue, then activation and residual.
        Last,
    }

    impl<const MR: usize> Tile<'_, MR> {
        /// Computes the tile and stores its first `rows` rows at `out`.
        ///
        /// # Safety
        /// AVX-512F must be present; each row `b + offsets[k]` must hold
        /// `width` readable values, the residual (if
        /// any) `rows` such rows at stride `ld`, and `out` `rows` writable
        /// rows of `width` values at stride `ld`, holding the previous
        /// slices' partial sums for the `Middle` and `Last` stages.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn run(&self, out: *mut f32) {
            debug_assert!(self.width <= NR && self.rows <= MR);
            let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
            let (m0, m1) = (lanes(self.width), lanes(self.width.saturating_sub(16)));
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            let resume = matches!(self.stage, Stage::Middle | Stage::Last);
            #[allow(clippy::needless_range_loop)]
            for r in 0..MR {
                acc[r] = if !resume {
                    let b = _mm512_set1_ps(self.bias[r]);
                    [b, b]
                } else if r < self.rows {
                    // SAFETY: row r < rows of `out` holds the `width`
                    // partial sums the previous slice stored.
                    unsafe {
                        let row = out.wrapping_add(r * self.ld);
                        [
                            _mm512_maskz_loadu_ps(m0, row),
                            _mm512_maskz_loadu_ps(m1, row.wrapping_add(16)),
                        ]
                    }
                } else {
                    [_mm512_setzero_ps(); 2]
                };
            }
            // SAFETY: as this function's contract says for `b`.
            let acc = unsafe { accumulate(acc, self.panel, self.b, self.offsets, (m0, m1)) };
            // By value, no references into `acc`: it stays in registers.
            let finish = matches!(self.stage, Stage::Only | Stage::Last);
            #[allow(clippy::needless_range_loop)]
            for r in 0..MR {
                if r >= self.rows {
                    break;
                }
                let [mut v0, mut v1] = acc[r];
                if finish {
                    v0 = activate(v0, self.activation);
                    v1 = activate(v1, self.activation);
                    if let Some(res) = self.residual {
                        // SAFETY: row r < rows of the residual holds
                        // `width` values; masked-off lanes are not read.
                        unsafe {
                            let row = res.wrapping_add(r * self.ld);
                            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.wrapping_add(16)));
                        }
                    }
                }
                // SAFETY: row r < rows of `out` holds `width` writable
                // values; masked-off lanes are not written.
                unsafe {
                    let row = out.wrapping_add(r * self.ld);
                    _mm512_mask_storeu_ps(row, m0, v0);
                    _mm512_mask_storeu_ps(row.wrapping_add(16), m1, v1);
                }
            }
        }
    }

    /// `acc[r] += Σ_k panel[k, r] · b[k, ..]` over the panel's rows, for the
    /// columns `masks` keep. A function of its own, taking and returning the
    /// sums by value, so that they live in registers through the loop.
    ///
    /// # Safety
    /// AVX-512F must be present; each row `b + offsets[k]` (one per row of
    /// the panel) must hold the masks' readable values.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    unsafe fn accumulate<const MR: usize>(
        mut acc: [[__m512; 2]; MR],
        panel: &[f32],
        b: *const f32,
        offsets: &[usize],
        (m0, m1): (__mmask16, __mmask16),
    ) -> [[__m512; 2]; MR] {
        for (w, &offset) in panel.chunks_exact(MR).zip(offsets) {
            // SAFETY: row k of `b` holds the masks' values; masked-off lanes
            // are not read. The address is formed with wrapping arithmetic
            // as it may point past the row when at most 16 lanes are kept.
            let (b0, b1) = unsafe {
                let row = b.wrapping_add(offset);
                // The next tile's part of this row, asked for now so that it
                // has arrived when that tile runs (a prefetch never faults).
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(NR).cast());
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(NR + 16).cast());
                (
                    _mm512_maskz_loadu_ps(m0, row),
                    _mm512_maskz_loadu_ps(m1, row.wrapping_add(16)),
                )
            };
            for r in 0..MR {
                let wv = _mm512_set1_ps(w[r]);
                acc[r][0] = _mm512_fmadd_ps(wv, b0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(wv, b1, acc[r][1]);
            }
        }
        acc
    }

    /// `dst[j] = src[2j]`.
    ///
    /// # Safety
    /// AVX-512F must be present; `src` must hold `2·dst.len() − 1` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn every_other(dst: &mut [std::mem::MaybeUninit<f32>], src: &[f32]) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        for (i, chunk) in dst.chunks_mut(16).enumerate() {
            // Source values 32i .. 32i + 32, as far as they exist.
            let left = src.len() - 32 * i;
            let (lo, hi) = (lanes(left), lanes(left.saturating_sub(16)));
            // SAFETY: the masks keep the loads inside `src`, and the store
            // inside the chunk; the addresses are formed with wrapping
            // arithmetic as they may point past the end when masked.
            unsafe {
                let p = src.as_ptr().wrapping_add(32 * i);
                let a = _mm512_maskz_loadu_ps(lo, p);
                let b = _mm512_maskz_loadu_ps(hi, p.wrapping_add(16));
                let v = _mm512_permutex2var_ps(a, even, b);
                _mm512_mask_storeu_ps(chunk.as_mut_ptr().cast(), lanes(chunk.len()), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::kernels::test_values as values;

    /// `c.run` into an output filled with NaN beforehand, so that a value
    /// it fails to write shows as NaN.
    #[allow(clippy::too_many_arguments)]
    fn run(
        c: &TiledConv,
        x: &[f32],
        hw: (usize, usize),
        ohw: (usize, usize),
        bias: Option<&[f32]>,
        a: Activation,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut out = vec![MaybeUninit::new(f32::NAN); c.c_out * ohw.0 * ohw.1];
        c.run(x, hw, ohw, bias, a, residual, &mut out);
        // SAFETY: every value was initialised (to NaN) before the run.
        out.into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect()
    }

    /// The definition of a convolution of one group, in f64.
    fn naive(
        w: &[f32],
        x: &[f32],
        bias: &[f32],
        c_out: usize,
        p: &Patches,
        (h, wd): (usize, usize),
        (oh, ow): (usize, usize),
    ) -> Vec<f64> {
        let (kh, kw) = p.kernel;
        let mut out = vec![0f64; c_out * oh * ow];
        for m in 0..c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = f64::from(bias[m]);
                    for c in 0..p.c_in {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * p.stride.0 + ky * p.dilation.0) as isize
                                    - p.pads.0 as isize;
                                let ix = (ox * p.stride.1 + kx * p.dilation.1) as isize
                                    - p.pads.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                acc += f64::from(w[((m * p.c_in + c) * kh + ky) * kw + kx])
                                    * f64::from(x[(c * h + iy as usize) * wd + ix as usize]);
                            }
                        }
                    }
                    out[(m * oh + oy) * ow + ox] = acc;
                }
            }
        }
        out
    }

    fn activated(e: f64, a: Activation) -> f64 {
        match a {
            Activation::None => e,
            Activation::Clamp(lo, hi) => e.clamp(f64::from(lo), f64::from(hi)),
            Activation::Silu => e / (1.0 + (-e).exp()),
        }
    }

    /// Builds the layer `p` (pointwise or im2col) with random weights, runs
    /// it on a random input, with a residual every other seed, and checks
    /// every output against the definition.
    fn check(
        p: &Patches,
        c_out: usize,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        seed: u64,
        activation: Activation,
        pointwise: bool,
    ) {
        let k = p.c_in * p.kernel.0 * p.kernel.1;
        let wt = values(seed, c_out * k);
        let x = values(seed + 1, p.c_in * h * w);
        let b = values(seed + 2, c_out);
        let want = naive(&wt, &x, &b, c_out, p, (h, w), (oh, ow));
        let residual = seed
            .is_multiple_of(2)
            .then(|| values(seed + 3, c_out * oh * ow));
        // Layers with patches run on shifted windows and on im2col blocks.
        for shift in [true, false] {
            let conv = if pointwise {
                TiledConv::pointwise(&wt, c_out, p.c_in)
            } else {
                TiledConv::patches(&wt, c_out, *p)
            };
            let mut conv = conv.expect("AVX-512F was found");
            conv.shift = shift;
            let got = run(
                &conv,
                &x,
                (h, w),
                (oh, ow),
                Some(&b),
                activation,
                residual.as_deref(),
            );
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                let e =
                    activated(*e, activation) + residual.as_ref().map_or(0.0, |r| f64::from(r[i]));
                let tol = 1e-5 * (1.0 + e.abs()) * (k as f64).sqrt();
                assert!(
                    (f64::from(*g) - e).abs() <= tol,
                    "{c_out} outputs of {p:?} on {h}x{w} {activation:?} (shifted: {shift}) at {i}: {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn pointwise_layers_match_the_definition_on_random_shapes() {
        if !super::super::avx512_or_record_skip("tiled::pointwise_layers") {
            return;
        }
        let mut seed = 0;
        // Output channels below, at and past a panel; positions below one
        // vector, between one and two, a whole tile, ragged tails, blocks.
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
                let p = Patches {
                    c_in,
                    kernel: (1, 1),
                    stride: (1, 1),
                    dilation: (1, 1),
                    pads: (0, 0),
                };
                check(&p, c_out, (1, cols), (1, cols), seed, activation, true);
            }
        }
    }

    #[test]
    fn im2col_layers_match_the_definition_on_random_shapes() {
        if !super::super::avx512_or_record_skip("tiled::im2col_layers") {
            return;
        }
        let mut seed = 1000;
        // (c_in, c_out, h, w, kernel, stride, dilation, pads): padding on
        // either side, strides 1 to 3, dilation, kernels wider than tall,
        // inputs narrower than a tile and wider than a block.
        for &(c_in, c_out, h, w, k, s, d, pads) in &[
            (3, 16, 20, 20, (3, 3), (2, 2), (1, 1), (1, 1)),
            (16, 13, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1)),
            (4, 5, 7, 7, (5, 5), (1, 1), (1, 1), (2, 2)),
            (2, 3, 12, 10, (3, 3), (1, 1), (2, 2), (2, 2)),
            (5, 8, 13, 17, (1, 3), (3, 2), (1, 1), (0, 1)),
            (8, 24, 6, 40, (3, 3), (2, 1), (1, 1), (0, 0)),
            (1, 2, 3, 3, (3, 3), (1, 1), (1, 1), (2, 2)),
            (64, 20, 10, 10, (3, 3), (1, 1), (1, 1), (1, 1)),
            // Many panels over one block.
            (16, 50, 9, 13, (3, 3), (2, 2), (1, 1), (1, 1)),
            (40, 64, 8, 11, (3, 3), (1, 1), (1, 1), (1, 0)),
        ] {
            for activation in [Activation::None, Activation::Silu] {
                seed += 1;
                let p = Patches {
                    c_in,
                    kernel: k,
                    stride: s,
                    dilation: d,
                    pads,
                };
                // Bottom and right padding mirror the top and left.
                let size = |n: usize, kk: usize, s: usize, d: usize, pad: usize| {
                    (n + 2 * pad - d * (kk - 1) - 1) / s + 1
                };
                let (oh, ow) = (
                    size(h, k.0, s.0, d.0, pads.0),
                    size(w, k.1, s.1, d.1, pads.1),
                );
                check(&p, c_out, (h, w), (oh, ow), seed, activation, false);
            }
        }
    }

    #[test]
    fn silu_in_the_tile_matches_its_definition() {
        if !super::super::avx512_or_record_skip("tiled::silu_in_the_tile") {
            return;
        }
        let conv = TiledConv::pointwise(&[1.0], 1, 1).expect("AVX-512F");
        let mut x: Vec<f32> = (-40000..40000).map(|i| i as f32 * 0.0025).collect();
        // Far out: below −87 the value is x · e^−87, as negligible as the
        // exact one (this side of −2000).
        x.extend([-2000.0, -200.0, -88.5, -87.5, 87.5, 200.0, f32::MAX]);
        let got = run(
            &conv,
            &x,
            (1, x.len()),
            (1, x.len()),
            None,
            Activation::Silu,
            None,
        );
        for (v, g) in x.iter().zip(&got) {
            let v64 = f64::from(*v);
            let want = v64 / (1.0 + (-v64).exp());
            // Relative, or absolutely negligible where e^−x is clamped.
            assert!(
                (f64::from(*g) - want).abs() <= 1e-6 * want.abs() + 1e-33,
                "silu({v}): {g} vs {want}"
            );
        }
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        let got = run(
            &conv,
            &specials,
            (1, 3),
            (1, 3),
            None,
            Activation::Silu,
            None,
        );
        assert!(got[0].is_nan(), "NaN stays NaN: {got:?}");
        assert_eq!(got[1], f32::INFINITY, "{got:?}");
        assert_eq!(got[2], f32::NEG_INFINITY, "{got:?}");
    }

    #[test]
    fn every_other_value_is_gathered_at_any_length() {
        for n in [0usize, 1, 5, 15, 16, 17, 31, 32, 33, 70] {
            for extra in [0, 1] {
                let src: Vec<f32> = (0..(2 * n).saturating_sub(1) + extra)
                    .map(|i| i as f32)
                    .collect();
                let mut dst = vec![f32::NAN; n];
                every_other(as_slots(&mut dst), &src);
                let want: Vec<f32> = (0..n).map(|j| (2 * j) as f32).collect();
                assert_eq!(dst, want, "{n} values from {}", src.len());
            }
        }
    }

    #[test]
    fn a_nan_input_stays_nan_through_the_clamp() {
        if !super::super::avx512_or_record_skip("tiled::a_nan_input_stays_nan") {
            return;
        }
        let conv = TiledConv::pointwise(&[1.0, 1.0], 1, 2).expect("AVX-512F");
        let x = [f32::NAN, 1.0, 2.0, 3.0];
        let got = run(
            &conv,
            &x,
            (1, 2),
            (1, 2),
            None,
            Activation::Clamp(0.0, 6.0),
            None,
        );
        assert!(got[0].is_nan(), "{got:?}");
        assert_eq!(got[1], 4.0);
    }
}
