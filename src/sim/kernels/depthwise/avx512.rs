//! The AVX-512 depthwise kernel: every output row is cut into chunks of 16
//! outputs, and a chunk's sum `bias + Σ_(ky,kx) w · x[iy][ix0 + sx·j]` is
//! built from masked loads straight out of the input plane. The masks stand
//! for the zero padding (lanes outside the row or rows outside the plane
//! load zeros), so nothing is copied: no padded plane, no output buffer.
//! Horizontal stride 2 loads 32 values per tap and keeps the even ones.
//! Up to eight chunks are summed side by side, which hides the latency of
//! the multiply-adds; the clamp is applied before the (masked) store.
//!
//! 3×3 kernels without dilation (MobileNet's) take a sweep instead: a block
//! of up to eight output rows of one chunk column loads each input row it
//! reads once — three loads, one per kernel column, none for rows in the
//! padding — and adds it into every output row that reads it, so an output
//! costs 3 loads (stride 1) instead of 9.
//!
//! The sums run in the definition's order (bias, then the taps row by row)
//! with fused multiply-adds, as the portable kernel's AVX2 path does (a
//! test checks the sweep against that sum bit for bit).

use super::DepthwiseShape;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Outputs per chunk (one vector).
const LANES: usize = 16;

/// Whether this CPU can run the kernel on `g` (horizontal stride 1 or 2).
pub(super) fn supports(g: &DepthwiseShape) -> bool {
    matches!(g.stride.1, 1 | 2) && std::arch::is_x86_feature_detected!("avx512f")
}

/// For each chunk of an output row and each kernel column: where the
/// chunk's inputs start relative to the input row, and which loaded lanes
/// lie inside the row (bit j: value `start + j`, 16 or 32 bits).
pub(super) struct Columns {
    kw: usize,
    start: Vec<isize>,
    inside: Vec<u32>,
    store: Vec<u16>,
    /// Chunks (output row, chunk) whose every tap reads inside the plane.
    inner: Vec<(usize, usize)>,
    /// Output rows whose taps all lie in rows of the plane.
    inner_rows: Vec<usize>,
    /// Chunk columns that touch the left or right padding (run for the
    /// inner rows; the edge rows are in `edge`).
    sided: Vec<usize>,
    /// The other chunks: rows that touch the top or bottom padding.
    edge: Vec<(usize, usize)>,
}

impl Columns {
    /// The table of one layer's geometry.
    pub(super) fn new(g: &DepthwiseShape) -> Columns {
        let ow = g.out_w();
        let sx = g.stride.1;
        let chunks = ow.div_ceil(LANES);
        let loaded = LANES * sx;
        let mut start = Vec::with_capacity(chunks * g.kw);
        let mut inside = Vec::with_capacity(chunks * g.kw);
        for c in 0..chunks {
            for kx in 0..g.kw {
                let s = (c * LANES * sx + kx * g.dilation.1) as isize - g.pads[1] as isize;
                let mut bits = 0u32;
                for j in 0..loaded {
                    let ix = s + j as isize;
                    if ix >= 0 && (ix as usize) < g.w {
                        bits |= 1 << j;
                    }
                }
                start.push(s);
                inside.push(bits);
            }
        }
        let store = (0..chunks)
            .map(|c| {
                let valid = (ow - c * LANES).min(LANES);
                (((1u32 << valid) - 1) & 0xffff) as u16
            })
            .collect();
        if sweeps(g) {
            // The sweep runs every row by itself: no lists of chunks.
            return Columns {
                kw: g.kw,
                start,
                inside,
                store,
                inner: Vec::new(),
                inner_rows: Vec::new(),
                sided: Vec::new(),
                edge: Vec::new(),
            };
        }
        let full = if sx == 1 { 0xffff } else { u32::MAX };
        let inner_column: Vec<bool> = (0..chunks)
            .map(|c| inside[c * g.kw..(c + 1) * g.kw].iter().all(|&m| m == full))
            .collect();
        let inner_row = |oy: usize| {
            let top = (oy * g.stride.0) as isize - g.pads[0] as isize;
            let bottom = top + ((g.kh - 1) * g.dilation.0) as isize;
            top >= 0 && bottom < g.h as isize
        };
        let (inner_rows, edge_rows): (Vec<usize>, Vec<usize>) =
            (0..g.out_h()).partition(|&oy| inner_row(oy));
        let mut inner = Vec::new();
        for &oy in &inner_rows {
            inner.extend((0..chunks).filter(|&c| inner_column[c]).map(|c| (oy, c)));
        }
        let sided = (0..chunks).filter(|&c| !inner_column[c]).collect();
        let edge = edge_rows
            .iter()
            .flat_map(|&oy| (0..chunks).map(move |c| (oy, c)))
            .collect();
        Columns {
            kw: g.kw,
            start,
            inside,
            store,
            inner,
            inner_rows,
            sided,
            edge,
        }
    }
}

/// One plane's inputs and outputs.
pub(super) struct Plane<'a> {
    /// The input plane, `h × w` values.
    pub x: &'a [f32],
    /// The plane's taps, `kh × kw`.
    pub w: &'a [f32],
    /// The plane's bias.
    pub bias: f32,
    /// The clamp applied to every output.
    pub clamp: (f32, f32),
    /// The output plane, `out_h × out_w` values, each written once.
    pub out: &'a mut [MaybeUninit<f32>],
}

/// Computes one plane.
///
/// # Safety
/// The CPU must support AVX-512F ([`supports`]); `cols` was built for `g`;
/// `p.x` holds `h × w` values, `p.w` `kh × kw`, `p.out` `out_h × out_w`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn plane(g: &DepthwiseShape, cols: &Columns, mut p: Plane<'_>) {
    debug_assert_eq!(p.x.len(), g.h * g.w);
    debug_assert_eq!(p.w.len(), g.kh * g.kw);
    debug_assert_eq!(p.out.len(), g.out_h() * g.out_w());
    // SAFETY (every call): the caller's promises, passed on.
    unsafe {
        if sweeps(g) {
            let oh = g.out_h();
            for c in 0..cols.store.len() {
                for oy0 in (0..oh).step_by(WIDEST) {
                    sweep_rows(g, cols, &mut p, c, oy0..(oy0 + WIDEST).min(oh));
                }
            }
            return;
        }
        for units in cols.inner.chunks(WIDEST) {
            group(g, cols, &mut p, units, Kind::Inner);
        }
        for &c in &cols.sided {
            for rows in cols.inner_rows.chunks(WIDEST) {
                let mut units = [(0, 0); WIDEST];
                for (u, &oy) in units.iter_mut().zip(rows) {
                    *u = (oy, c);
                }
                group(g, cols, &mut p, &units[..rows.len()], Kind::Column);
            }
        }
        for units in cols.edge.chunks(4) {
            group(g, cols, &mut p, units, Kind::Edge);
        }
    }
}

/// Whether [`sweep_rows`] runs every row of a plane: 3×3 kernels without
/// dilation, vertical stride 1 or 2.
fn sweeps(g: &DepthwiseShape) -> bool {
    g.kh == 3 && g.kw == 3 && g.dilation == (1, 1) && matches!(g.stride.0, 1 | 2)
}

/// Chunk column `c` of the output rows `rows` (1 to `WIDEST` of them), for
/// [`sweeps`] geometries.
///
/// # Safety
/// As for [`plane`].
#[target_feature(enable = "avx512f")]
unsafe fn sweep_rows(
    g: &DepthwiseShape,
    cols: &Columns,
    p: &mut Plane<'_>,
    c: usize,
    rows: std::ops::Range<usize>,
) {
    let oy0 = rows.start;
    // SAFETY (each arm): the caller's promises; `rows` exist.
    unsafe {
        macro_rules! run {
            ($n:literal) => {
                match (g.stride.1, g.stride.0) {
                    (1, 1) => sweep::<$n, 1, 1>(g, cols, p, c, oy0),
                    (1, _) => sweep::<$n, 1, 2>(g, cols, p, c, oy0),
                    (_, 1) => sweep::<$n, 2, 1>(g, cols, p, c, oy0),
                    (_, _) => sweep::<$n, 2, 2>(g, cols, p, c, oy0),
                }
            };
        }
        match rows.len() {
            1 => run!(1),
            2 => run!(2),
            3 => run!(3),
            4 => run!(4),
            5 => run!(5),
            6 => run!(6),
            7 => run!(7),
            _ => run!(8),
        }
    }
}

/// `N` consecutive output rows from `oy0` of chunk column `c`, 3×3 taps at
/// strides `SX` (horizontal) and `SY` (vertical): each input row the block
/// reads is loaded once (its three taps) and added into every output row
/// that reads it, in the order of the definition (bias, then the taps row
/// by row), so the sums equal the other kernels'. Loads per output: 3·SY
/// instead of 9.
///
/// Input rows above or below the plane (the padding) load as zeros and are
/// added like any other, as the definition does.
///
/// # Safety
/// As for [`plane`]; the output rows `oy0 .. oy0 + N` exist.
// Indexed loops of constant bounds, which the compiler unrolls.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sweep<const N: usize, const SX: usize, const SY: usize>(
    g: &DepthwiseShape,
    cols: &Columns,
    p: &mut Plane<'_>,
    c: usize,
    oy0: usize,
) {
    let at = c * cols.kw;
    let masks = [cols.inside[at], cols.inside[at + 1], cols.inside[at + 2]];
    let starts = [cols.start[at], cols.start[at + 1], cols.start[at + 2]];
    // (Plain loops, not `array::from_fn`: a closure does not inherit the
    // target feature, so its intrinsics would not be inlined.)
    let mut wt = [[_mm512_setzero_ps(); 3]; 3];
    for ky in 0..3 {
        for kx in 0..3 {
            wt[ky][kx] = _mm512_set1_ps(p.w[ky * 3 + kx]);
        }
    }
    let mut acc = [_mm512_set1_ps(p.bias); N];
    let top = (oy0 * SY) as isize - g.pads[0] as isize;
    for q in 0..(N - 1) * SY + 3 {
        let iy = top + q as isize;
        // Only dereferenced through the masks' lanes, inside the plane.
        let row = p.x.as_ptr().wrapping_offset(iy * g.w as isize);
        let live = if (0..g.h as isize).contains(&iy) {
            u32::MAX
        } else {
            0
        };
        let mut v = [_mm512_setzero_ps(); 3];
        for kx in 0..3 {
            // SAFETY: a live row is inside the plane and the masks keep the
            // columns inside it; a dead row's mask reads nothing.
            v[kx] = unsafe { taps::<SX>(masks[kx] & live, row.wrapping_offset(starts[kx])) };
        }
        for ky in 0..3 {
            // Output j reads input row j·SY + ky.
            if q < ky || (q - ky) % SY != 0 || (q - ky) / SY >= N {
                continue;
            }
            let j = (q - ky) / SY;
            for kx in 0..3 {
                acc[j] = _mm512_fmadd_ps(wt[ky][kx], v[kx], acc[j]);
            }
        }
    }
    let mut units = [(0, c); N];
    for (j, u) in units.iter_mut().enumerate() {
        u.0 = oy0 + j;
    }
    // SAFETY: as for `store`.
    unsafe { store(g, cols, p, &units, acc) };
}

/// Chunks summed side by side: enough independent multiply-add chains to
/// cover their latency (two per cycle, four cycles each).
const WIDEST: usize = 8;

/// How a group of chunks reads its inputs.
#[derive(Clone, Copy)]
enum Kind {
    /// Every tap inside the plane: plain loads.
    Inner,
    /// One chunk column, rows inside the plane: that column's masks.
    Column,
    /// Anything else: masks per chunk, rows checked.
    Edge,
}

/// The chunks `units` (output row, chunk), 1 to `WIDEST` of them, of one kind.
#[target_feature(enable = "avx512f")]
unsafe fn group(
    g: &DepthwiseShape,
    cols: &Columns,
    p: &mut Plane<'_>,
    units: &[(usize, usize)],
    kind: Kind,
) {
    // SAFETY (each arm): as for `plane`.
    unsafe {
        match units.len() {
            1 => sized::<1>(g, cols, p, units, kind),
            2 => sized::<2>(g, cols, p, units, kind),
            3 => sized::<3>(g, cols, p, units, kind),
            4 => sized::<4>(g, cols, p, units, kind),
            5 => sized::<5>(g, cols, p, units, kind),
            6 => sized::<6>(g, cols, p, units, kind),
            7 => sized::<7>(g, cols, p, units, kind),
            _ => sized::<8>(g, cols, p, units, kind),
        }
    }
}

/// `group` for exactly `N` chunks.
#[target_feature(enable = "avx512f")]
unsafe fn sized<const N: usize>(
    g: &DepthwiseShape,
    cols: &Columns,
    p: &mut Plane<'_>,
    units: &[(usize, usize)],
    kind: Kind,
) {
    let units: &[(usize, usize); N] = units.try_into().expect("N chunks");
    // SAFETY (each arm): as for `plane`; `Columns::new` sorted the chunks
    // into kinds.
    unsafe {
        match (kind, g.stride.1) {
            (Kind::Inner, 1) => rows_sum::<N, 1, false>(g, cols, p, units),
            (Kind::Inner, _) => rows_sum::<N, 2, false>(g, cols, p, units),
            (Kind::Column, 1) => rows_sum::<N, 1, true>(g, cols, p, units),
            (Kind::Column, _) => rows_sum::<N, 2, true>(g, cols, p, units),
            (Kind::Edge, 1) => sum::<N, 1>(g, cols, p, units),
            (Kind::Edge, _) => sum::<N, 2>(g, cols, p, units),
        }
    }
}

/// The sums of `N` chunks at horizontal stride `SX` whose taps all lie in
/// rows of the plane: inner chunks (`MASKED` false: plain loads) or chunks
/// of one column that touches the left or right padding (that column's
/// masks, shared by the `N` chunks).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn rows_sum<const N: usize, const SX: usize, const MASKED: bool>(
    g: &DepthwiseShape,
    cols: &Columns,
    p: &mut Plane<'_>,
    units: &[(usize, usize); N],
) {
    let w = g.w;
    let mut base = [p.x.as_ptr(); N];
    for (b, &(oy, c)) in base.iter_mut().zip(units) {
        let top = oy * g.stride.0 - g.pads[0];
        // Only dereferenced through the loads' lanes, inside the plane.
        *b = b
            .wrapping_add(top * w)
            .wrapping_offset(cols.start[c * cols.kw]);
    }
    let column = units[0].1 * cols.kw;
    let mut acc = [_mm512_set1_ps(p.bias); N];
    let (dy, dx) = (g.dilation.0 * w, g.dilation.1);
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let wv = _mm512_set1_ps(p.w[ky * g.kw + kx]);
            let mask = if MASKED {
                cols.inside[column + kx]
            } else {
                u32::MAX
            };
            let at = ky * dy + kx * dx;
            for i in 0..N {
                // SAFETY: the rows are the plane's, and the mask keeps the
                // columns inside it (an inner chunk's 16·SX values all are,
                // as `Columns::new` checked).
                let v = unsafe { taps::<SX>(mask, base[i].wrapping_add(at)) };
                acc[i] = _mm512_fmadd_ps(wv, v, acc[i]);
            }
        }
    }
    // SAFETY: as for `store`.
    unsafe { store(g, cols, p, units, acc) };
}

/// The 16 values a chunk's tap reads from `src` on: `src[j]` (stride 1) or
/// `src[2j]` (stride 2) where bit j of `mask` is set (`2j` and `2j + 1` for
/// stride 2), zero elsewhere.
///
/// # Safety
/// AVX-512F must be present; the values the mask keeps must be readable
/// (masked-off lanes are not read).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn taps<const SX: usize>(mask: u32, src: *const f32) -> __m512 {
    // SAFETY: the caller's promise.
    unsafe {
        if SX == 1 {
            _mm512_maskz_loadu_ps(mask as u16, src)
        } else {
            let evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
            let lo = _mm512_maskz_loadu_ps(mask as u16, src);
            let hi = _mm512_maskz_loadu_ps((mask >> 16) as u16, src.wrapping_add(16));
            _mm512_permutex2var_ps(lo, evens, hi)
        }
    }
}

/// Clamps the sums of `units` and writes their valid lanes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store<const N: usize>(
    g: &DepthwiseShape,
    cols: &Columns,
    p: &mut Plane<'_>,
    units: &[(usize, usize); N],
    acc: [__m512; N],
) {
    let lo = _mm512_set1_ps(p.clamp.0);
    let hi = _mm512_set1_ps(p.clamp.1);
    let ow = g.out_w();
    let out = p.out.as_mut_ptr().cast::<f32>();
    for (&(oy, c), acc) in units.iter().zip(acc) {
        // Operands in this order keep a NaN sum (as the scalar clamp does).
        let v = _mm512_min_ps(hi, _mm512_max_ps(lo, acc));
        // SAFETY: the store mask keeps the lanes below the row's end.
        unsafe { _mm512_mask_storeu_ps(out.add(oy * ow + c * LANES), cols.store[c], v) };
    }
}

/// The sums of `N` chunks at horizontal stride `SX`, clamped and stored.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sum<const N: usize, const SX: usize>(
    g: &DepthwiseShape,
    cols: &Columns,
    p: &mut Plane<'_>,
    units: &[(usize, usize); N],
) {
    let (h, w, kw) = (g.h as isize, g.w as isize, g.kw);
    let x = p.x.as_ptr();
    let oy = units.map(|u| u.0);
    let chunk = units.map(|u| u.1);
    let mut acc = [_mm512_set1_ps(p.bias); N];
    for ky in 0..g.kh {
        let mut row = [x; N];
        let mut live = [false; N];
        for i in 0..N {
            let iy = (oy[i] * g.stride.0 + ky * g.dilation.0) as isize - g.pads[0] as isize;
            live[i] = (0..h).contains(&iy);
            // Only dereferenced through lanes that lie inside the plane.
            row[i] = x.wrapping_offset(iy * w);
        }
        for kx in 0..kw {
            let wv = _mm512_set1_ps(p.w[ky * kw + kx]);
            for i in 0..N {
                let at = chunk[i] * cols.kw + kx;
                let inside = if live[i] { cols.inside[at] } else { 0 };
                let src = row[i].wrapping_offset(cols.start[at]);
                // SAFETY: the masks select only values inside the input plane
                // (rows in 0..h, columns in 0..w); masked-off lanes are not read.
                let v = unsafe { taps::<SX>(inside, src) };
                acc[i] = _mm512_fmadd_ps(wv, v, acc[i]);
            }
        }
    }
    // SAFETY: as for `store`.
    unsafe { store(g, cols, p, units, acc) };
}
