//! Kernels the CPU engine owns: convolution as AVX-512 tiles (`tiled`, and
//! `channel_tiles` for layers with deep columns) or on a packed GEMM
//! (`rten-gemm`), a SIMD depthwise convolution, a dense
//! layer, and the exact integer
//! convolution and dense layer of deploy models. Each is tested against
//! the operator's definition on random shapes.

pub mod activation;
pub mod channel_tiles;
pub mod conv;
pub mod conv_grad;
pub mod depthwise;
pub mod int_conv;
pub mod int_gemm;
pub mod tiled;

use std::mem::MaybeUninit;

/// A vector of `len` values that `fill` writes, without the zero fill of
/// `vec![0.0; len]` (on MobileNetV2 the layers' zero fills took a tenth of
/// the run time, all of it on one thread).
///
/// # Safety
/// `fill` must write every value of the slice it is given.
pub(crate) unsafe fn written_by(
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller promises that `fill` wrote all `len` values.
    unsafe { v.set_len(len) };
    v
}

/// Whether this CPU runs the AVX-512 kernels. When it does not, the calling
/// test cannot check them: the skip is written to stderr and appended to
/// `target/skipped-tests.txt`, which `.ci/run` prints after the tests, so
/// the gap is visible instead of a silent pass. (The layers those kernels
/// would take run on the general GEMM there, which `conv.rs` tests.)
#[cfg(test)]
pub(crate) fn avx512_or_record_skip(test: &str) -> bool {
    if std::arch::is_x86_feature_detected!("avx512f") {
        return true;
    }
    let line = format!("{test}: skipped, this CPU has no AVX-512F\n");
    eprint!("{line}");
    let log = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/skipped-tests.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = std::io::Write::write_all(&mut f, line.as_bytes());
    }
    false
}

/// The output size of a window sliding over `n` values padded by
/// `pads` (both sides), counted position by position: the tests' reference
/// for the kernels' own closed-form `out_hw`.
#[cfg(test)]
pub(crate) fn counted_positions(
    n: usize,
    pads: usize,
    k: usize,
    stride: usize,
    dilation: usize,
) -> usize {
    (0..)
        .take_while(|&o: &usize| o * stride + dilation * (k - 1) < n + pads)
        .count()
}

/// The output height and width of `g` on `h × w`, counted ([`counted_positions`]).
#[cfg(test)]
pub(crate) fn counted_out_hw(g: &conv::ConvGeometry, h: usize, w: usize) -> (usize, usize) {
    (
        counted_positions(
            h,
            g.pads[0] + g.pads[2],
            g.kernel.0,
            g.stride.0,
            g.dilation.0,
        ),
        counted_positions(
            w,
            g.pads[1] + g.pads[3],
            g.kernel.1,
            g.stride.1,
            g.dilation.1,
        ),
    )
}

/// Reproducible values in [−1, 1) for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(2862933555777941757)
        .wrapping_add(3037000493);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
