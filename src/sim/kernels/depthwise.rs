//! Depthwise 2-D convolution (one filter per channel, NCHW) with an optional
//! clamp fused in (Relu, ReLU6): the layer that dominates MobileNet-style
//! networks and that general convolution code runs badly.
//!
//! Each (sample, channel) plane is copied once into a zero-padded buffer;
//! for a horizontal stride of 2 the padded rows are also split into even and
//! odd columns. Every kernel tap then reads a contiguous run of the buffer,
//! and an output row is `bias + Σ_t w_t · src_t[0..OW]`, which the AVX2+FMA
//! path computes 32 outputs at a time (four independent accumulators, so the
//! FMA latency is hidden) and the portable path one at a time. Planes run in
//! parallel. CPUs with AVX-512 run horizontal strides 1 and 2 on the
//! kernel of [`avx512`] instead, which reads the input plane in place.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod grad;

use super::activation::clamp_value;
use super::written_by;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The geometry of one depthwise convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DepthwiseShape {
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height and width.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Vertical and horizontal stride.
    pub stride: (usize, usize),
    /// Vertical and horizontal dilation.
    pub dilation: (usize, usize),
    /// Padding: top, left, bottom, right.
    pub pads: [usize; 4],
}

impl DepthwiseShape {
    /// Output height.
    pub fn out_h(&self) -> usize {
        out_size(
            self.h,
            self.pads[0] + self.pads[2],
            self.kh,
            self.stride.0,
            self.dilation.0,
        )
    }

    /// Height and width of the zero-padded plane.
    fn padded(&self) -> (usize, usize) {
        (
            self.h + self.pads[0] + self.pads[2],
            self.w + self.pads[1] + self.pads[3],
        )
    }

    /// Output width.
    pub fn out_w(&self) -> usize {
        out_size(
            self.w,
            self.pads[1] + self.pads[3],
            self.kw,
            self.stride.1,
            self.dilation.1,
        )
    }
}

fn out_size(size: usize, pads: usize, k: usize, stride: usize, dilation: usize) -> usize {
    let span = dilation * (k - 1) + 1;
    (size + pads).saturating_sub(span) / stride + 1
}

/// Computes `out[p] = clamp(bias[c] + Σ w[c] ⋆ x[p], lo, hi)` for every plane
/// `p < planes` of `x` (planes of `h × w`, channel `c = p % channels`);
/// returns `planes × out_h × out_w` values.
pub fn depthwise(
    g: &DepthwiseShape,
    planes: usize,
    channels: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    clamp: (f32, f32),
) -> Vec<f32> {
    depthwise_on(g, planes, channels, x, weight, bias, clamp, true)
}

/// `depthwise`, on the AVX-512 kernel only when `wide` and the CPU has it
/// (the tests run both kernels).
#[allow(clippy::too_many_arguments)]
fn depthwise_on(
    g: &DepthwiseShape,
    planes: usize,
    channels: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    clamp: (f32, f32),
    wide: bool,
) -> Vec<f32> {
    let (oh, ow) = (g.out_h(), g.out_w());
    assert_eq!(x.len(), planes * g.h * g.w, "the input holds the planes");
    if g.h * g.w == 0 {
        // An empty image: every tap falls in the padding.
        return (0..planes * oh * ow)
            .map(|i| clamp_value(bias.map_or(0.0, |b| b[i / (oh * ow) % channels]), clamp))
            .collect();
    }
    // SAFETY: there are `planes` input planes (asserted above, none empty),
    // one task per output plane, and `plane` writes every value of its own.
    unsafe {
        written_by(planes * oh * ow, |out| {
            planes_into(g, channels, x, weight, bias, clamp, wide, out)
        })
    }
}

/// `depthwise` into `out`.
#[allow(clippy::too_many_arguments)]
fn planes_into(
    g: &DepthwiseShape,
    channels: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    clamp: (f32, f32),
    wide: bool,
    out: &mut [MaybeUninit<f32>],
) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let plane_in = g.h * g.w;
    let taps = g.kh * g.kw;
    // Enough planes per task that the task overhead stays small.
    let per_task = (4096 / (oh * ow).max(1)).max(1);
    // The AVX-512 kernel's table of this geometry, when it runs.
    #[cfg(target_arch = "x86_64")]
    let wide = (wide && avx512::supports(g)).then(|| avx512::Columns::new(g));
    #[cfg(not(target_arch = "x86_64"))]
    let _ = wide;
    out.par_chunks_mut((oh * ow).max(1))
        .zip(x.par_chunks(plane_in.max(1)))
        .enumerate()
        .with_min_len(per_task)
        .for_each_init(Scratch::default, |scratch, (p, (o, xi))| {
            let c = p % channels;
            let (w, b) = (
                &weight[c * taps..(c + 1) * taps],
                bias.map_or(0.0, |b| b[c]),
            );
            #[cfg(target_arch = "x86_64")]
            if let Some(cols) = &wide {
                let plane = avx512::Plane {
                    x: xi,
                    w,
                    bias: b,
                    clamp,
                    out: o,
                };
                // SAFETY: `supports` checked the CPU; `cols` is this
                // geometry's; the slices are one plane's (asserted sizes).
                unsafe { avx512::plane(g, cols, plane) };
                return;
            }
            plane(g, xi, w, b, clamp, o, scratch);
        });
}

/// Buffers one task reuses from plane to plane.
#[derive(Default)]
struct Scratch {
    padded: Vec<f32>,
    split: Vec<f32>,
    flat: Vec<f32>,
}

/// One plane: pad, then one pass over the whole padded plane (stride 1:
/// every tap reads a contiguous run, the columns past the output width are
/// computed and dropped) or over its four polyphase sub-planes (stride 2);
/// other strides run the definition. Writes every value of `out`.
fn plane(
    g: &DepthwiseShape,
    x: &[f32],
    w: &[f32],
    bias: f32,
    clamp: (f32, f32),
    out: &mut [MaybeUninit<f32>],
    scratch: &mut Scratch,
) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let (hp, wp) = g.padded();
    let (sy, sx) = g.stride;
    let (dy, dx) = g.dilation;
    let taps = g.kh * g.kw;
    if sy == 2 && sx == 2 && taps <= 49 {
        return polyphase(g, x, w, bias, clamp, out, scratch);
    }
    // One spare row: the flat pass reads up to (kw - 1)·dx values past the
    // last padded row's end.
    let padded = &mut scratch.padded;
    padded.clear();
    padded.resize((hp + 1) * wp, 0.0);
    for y in 0..g.h {
        let dst = (y + g.pads[0]) * wp + g.pads[1];
        padded[dst..dst + g.w].copy_from_slice(&x[y * g.w..(y + 1) * g.w]);
    }
    let mut sources: [&[f32]; 49] = [&[]; 49];
    if sy == 1 && sx == 1 && taps <= 49 {
        let n = oh * wp;
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let start = ky * dy * wp + kx * dx;
                sources[ky * g.kw + kx] = &padded[start..start + n];
            }
        }
        let flat = &mut scratch.flat;
        flat.resize(n, 0.0);
        taps_row(flat, &sources[..taps], w, bias, clamp);
        for oy in 0..oh {
            out[oy * ow..(oy + 1) * ow].write_copy_of_slice(&flat[oy * wp..oy * wp + ow]);
        }
        return;
    }
    // Other strides: the definition, one output at a time.
    for oy in 0..oh {
        for ox in 0..ow {
            let mut acc = bias;
            for ky in 0..g.kh {
                let row = (oy * sy + ky * dy) * wp;
                for kx in 0..g.kw {
                    acc += w[ky * g.kw + kx] * padded[row + ox * sx + kx * dx];
                }
            }
            out[oy * ow + ox].write(clamp_value(acc, clamp));
        }
    }
}

/// Stride 2 × 2: the padded plane as four polyphase sub-planes (row parity
/// × column parity), each `rows × half`, written straight from the input;
/// tap (ky, kx) of output (oy, ox) reads sub-plane (ky·dy % 2, kx·dx % 2)
/// at (oy + ky·dy/2, ox + kx·dx/2), so again one contiguous run per tap.
fn polyphase(
    g: &DepthwiseShape,
    x: &[f32],
    w: &[f32],
    bias: f32,
    clamp: (f32, f32),
    out: &mut [MaybeUninit<f32>],
    scratch: &mut Scratch,
) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let (hp, wp) = g.padded();
    let (dy, dx) = g.dilation;
    let half = wp.div_ceil(2);
    let rows = hp.div_ceil(2) + 1;
    let sub = rows * half;
    let split = &mut scratch.split;
    split.clear();
    split.resize(4 * sub, 0.0);
    let pl = g.pads[1];
    // Input column 2k goes to `first[k + o1]`, 2k + 1 to `second[k + o2]`.
    let (first_odd, o1, o2) = if pl.is_multiple_of(2) {
        (false, pl / 2, pl / 2)
    } else {
        (true, (pl - 1) / 2, pl.div_ceil(2))
    };
    let pairs = g.w / 2;
    for y in 0..g.h {
        let yp = y + g.pads[0];
        let base = (yp % 2) * 2 * sub + (yp / 2) * half;
        let (even, odd) = split[base..base + sub + half].split_at_mut(sub);
        let (even, odd) = (&mut even[..half], &mut odd[..half]);
        let (first, second) = if first_odd { (odd, even) } else { (even, odd) };
        let src = &x[y * g.w..(y + 1) * g.w];
        for ((a, b), pair) in first[o1..o1 + pairs]
            .iter_mut()
            .zip(second[o2..o2 + pairs].iter_mut())
            .zip(src.chunks_exact(2))
        {
            *a = pair[0];
            *b = pair[1];
        }
        if g.w % 2 == 1 {
            first[o1 + pairs] = src[g.w - 1];
        }
    }
    let n = oh * half;
    let mut sources: [&[f32]; 49] = [&[]; 49];
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let (ry, rx) = (ky * dy, kx * dx);
            let start = ((ry % 2) * 2 + rx % 2) * sub + (ry / 2) * half + rx / 2;
            sources[ky * g.kw + kx] = &split[start..start + n];
        }
    }
    let flat = &mut scratch.flat;
    flat.resize(n, 0.0);
    taps_row(flat, &sources[..g.kh * g.kw], w, bias, clamp);
    for oy in 0..oh {
        out[oy * ow..(oy + 1) * ow].write_copy_of_slice(&flat[oy * half..oy * half + ow]);
    }
}

/// `out[i] = clamp(bias + Σ_t w[t] · sources[t][i], lo, hi)`.
fn taps_row(out: &mut [f32], sources: &[&[f32]], w: &[f32], bias: f32, clamp: (f32, f32)) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { avx2::taps_row(out, sources, w, bias, clamp) };
        return;
    }
    taps_row_portable(out, sources, w, bias, clamp, 0);
}

/// The portable loop, from output `start` on.
fn taps_row_portable(
    out: &mut [f32],
    sources: &[&[f32]],
    w: &[f32],
    bias: f32,
    clamp: (f32, f32),
    start: usize,
) {
    for (i, v) in out.iter_mut().enumerate().skip(start) {
        let mut acc = bias;
        for (s, wt) in sources.iter().zip(w) {
            acc += wt * s[i];
        }
        *v = clamp_value(acc, clamp);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// AVX2 + FMA version of `taps_row`: 32 outputs per step in four
    /// accumulators, then 8 per step, then the portable loop for the rest.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; every source holds at least
    /// `out.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn taps_row(
        out: &mut [f32],
        sources: &[&[f32]],
        w: &[f32],
        bias: f32,
        clamp: (f32, f32),
    ) {
        let n = out.len();
        debug_assert!(sources.iter().all(|s| s.len() >= n));
        // SAFETY (all loads and stores below): i + 32 ≤ n (or i + 8 ≤ n) and
        // every source holds n values, so each access is in bounds; the
        // target features are enabled on this function.
        let i = unsafe {
            let lo = _mm256_set1_ps(clamp.0);
            let hi = _mm256_set1_ps(clamp.1);
            let b = _mm256_set1_ps(bias);
            let o = out.as_mut_ptr();
            let mut i = 0;
            while i + 32 <= n {
                let (mut a0, mut a1, mut a2, mut a3) = (b, b, b, b);
                for (s, &wt) in sources.iter().zip(w) {
                    let p = s.as_ptr().add(i);
                    let wv = _mm256_set1_ps(wt);
                    a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p), a0);
                    a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p.add(8)), a1);
                    a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p.add(16)), a2);
                    a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p.add(24)), a3);
                }
                _mm256_storeu_ps(o.add(i), _mm256_min_ps(_mm256_max_ps(a0, lo), hi));
                _mm256_storeu_ps(o.add(i + 8), _mm256_min_ps(_mm256_max_ps(a1, lo), hi));
                _mm256_storeu_ps(o.add(i + 16), _mm256_min_ps(_mm256_max_ps(a2, lo), hi));
                _mm256_storeu_ps(o.add(i + 24), _mm256_min_ps(_mm256_max_ps(a3, lo), hi));
                i += 32;
            }
            while i + 8 <= n {
                let mut a = b;
                for (s, &wt) in sources.iter().zip(w) {
                    a = _mm256_fmadd_ps(_mm256_set1_ps(wt), _mm256_loadu_ps(s.as_ptr().add(i)), a);
                }
                _mm256_storeu_ps(o.add(i), _mm256_min_ps(_mm256_max_ps(a, lo), hi));
                i += 8;
            }
            i
        };
        super::taps_row_portable(out, sources, w, bias, clamp, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::kernels::test_values as values;

    /// The definition, written out: zero padding, one filter per channel.
    fn naive(g: &DepthwiseShape, c: usize, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let (oh, ow) = (g.out_h(), g.out_w());
        let planes = x.len() / (g.h * g.w);
        let mut out = vec![0f32; planes * oh * ow];
        for p in 0..planes {
            let ch = p % c;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = f64::from(b[ch]);
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let iy =
                                (oy * g.stride.0 + ky * g.dilation.0) as isize - g.pads[0] as isize;
                            let ix =
                                (ox * g.stride.1 + kx * g.dilation.1) as isize - g.pads[1] as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                acc += f64::from(w[ch * g.kh * g.kw + ky * g.kw + kx])
                                    * f64::from(x[p * g.h * g.w + iy as usize * g.w + ix as usize]);
                            }
                        }
                    }
                    out[(p * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_on_random_shapes() {
        let mut seed = 0;
        for &(k, stride, dilation) in &[
            (3, (1, 1), 1),
            (3, (2, 2), 1),
            (5, (1, 1), 1),
            (5, (2, 2), 1),
            (3, (1, 1), 2),
            (3, (2, 2), 2),
            (3, (3, 3), 1),
            (1, (1, 1), 1),
            (7, (2, 2), 1),
            (3, (2, 1), 1),
            (5, (1, 2), 2),
            (3, (3, 2), 1),
        ] {
            for &(h, w, pad) in &[(7, 7, 1), (13, 45, 2), (56, 56, 1), (5, 3, 0), (20, 71, 3)] {
                if (h + 2 * pad) < dilation * (k - 1) + 1 || (w + 2 * pad) < dilation * (k - 1) + 1
                {
                    continue;
                }
                seed += 1;
                let (n, c) = (2, 3);
                let g = DepthwiseShape {
                    h,
                    w,
                    kh: k,
                    kw: k,
                    stride,
                    dilation: (dilation, dilation),
                    pads: [pad, pad, pad.saturating_sub(1), pad.div_ceil(2)],
                };
                let x = values(seed, n * c * h * w);
                let wt = values(seed + 1000, c * k * k);
                let b = values(seed + 2000, c);
                let want = naive(&g, c, &x, &wt, &b);
                let unbounded = (f32::NEG_INFINITY, f32::INFINITY);
                for wide in [true, false] {
                    let got = depthwise_on(&g, n * c, c, &x, &wt, Some(&b), unbounded, wide);
                    assert_eq!(got.len(), want.len());
                    for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                            "{g:?} (wide: {wide}) at {i}: {a} vs {e}"
                        );
                    }
                    // The clamp is applied to every output.
                    let got = depthwise_on(&g, n * c, c, &x, &wt, Some(&b), (0.0, 0.5), wide);
                    for (a, e) in got.iter().zip(&want) {
                        assert!((a - e.clamp(0.0, 0.5)).abs() <= 1e-5, "{a} vs {e}");
                    }
                }
            }
        }
    }

    /// The definition in `f32`, summed as the kernels sum: bias, then the
    /// taps row by row, each a fused multiply-add (padding as zeros).
    fn fused_in_order(g: &DepthwiseShape, c: usize, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let (oh, ow) = (g.out_h(), g.out_w());
        let planes = x.len() / (g.h * g.w);
        let mut out = vec![0f32; planes * oh * ow];
        for p in 0..planes {
            let ch = p % c;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = b[ch];
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let iy = (oy * g.stride.0 + ky) as isize - g.pads[0] as isize;
                            let ix = (ox * g.stride.1 + kx) as isize - g.pads[1] as isize;
                            let inside =
                                iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w;
                            let v = if inside {
                                x[p * g.h * g.w + iy as usize * g.w + ix as usize]
                            } else {
                                0.0
                            };
                            acc = w[ch * g.kh * g.kw + ky * g.kw + kx].mul_add(v, acc);
                        }
                    }
                    out[(p * oh + oy) * ow + ox] = acc;
                }
            }
        }
        out
    }

    #[test]
    fn the_wide_kernel_sums_in_the_definitions_order() {
        // The AVX-512 kernel's 3×3 sweep loads each input row once for every
        // output row that reads it; the sums must still run bias, then the
        // taps row by row, so its values are the in-order fused sums, bit for
        // bit (unclamped).
        if !super::super::avx512_or_record_skip("depthwise::the_wide_kernel_sums_in_order") {
            return;
        }
        let mut seed = 500;
        for stride in [(1, 1), (2, 2), (1, 2), (2, 1)] {
            for (h, w) in [(28, 28), (7, 7), (14, 40), (57, 19), (3, 3), (112, 112)] {
                seed += 1;
                let g = DepthwiseShape {
                    h,
                    w,
                    kh: 3,
                    kw: 3,
                    stride,
                    dilation: (1, 1),
                    pads: [1, 1, 1, 1],
                };
                let c = 5;
                let x = values(seed, c * h * w);
                let wt = values(seed + 1000, c * 9);
                let b = values(seed + 2000, c);
                let unbounded = (f32::NEG_INFINITY, f32::INFINITY);
                let got = depthwise_on(&g, c, c, &x, &wt, Some(&b), unbounded, true);
                let want = fused_in_order(&g, c, &x, &wt, &b);
                for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), e.to_bits(), "{g:?} at {i}: {a} vs {e}");
                }
            }
        }
    }
}
