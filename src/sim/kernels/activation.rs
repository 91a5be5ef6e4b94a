//! Activations applied to a whole buffer, fused into the kernels that
//! produce it: a clamp (Relu, ReLU6, Clip) and SiLU (`x · sigmoid(x)`, the
//! detector activation), with an exponential that vectorises.

/// What a kernel applies to each of its outputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// Nothing.
    None,
    /// `min(max(x, lo), hi)`.
    Clamp(f32, f32),
    /// `x · sigmoid(x)`.
    Silu,
}

impl Activation {
    /// Applies the activation to every value of `v` in place.
    pub fn apply(self, v: &mut [f32]) {
        match self {
            Activation::None => {}
            Activation::Clamp(lo, hi) => {
                for x in v {
                    *x = clamp_value(*x, (lo, hi));
                }
            }
            Activation::Silu => silu(v),
        }
    }
}

/// `v` clamped to `[lo, hi]` (compiles to a min and a max).
#[inline]
pub fn clamp_value(v: f32, (lo, hi): (f32, f32)) -> f32 {
    let v = if v < lo { lo } else { v };
    if v > hi { hi } else { v }
}

/// Round half to even, exactly for |x| < 2^22 (adding and removing 1.5·2^23
/// leaves the rounded value in the mantissa), inline and vectorisable where
/// `f32::round_ties_even` is a library call on baseline x86-64. Larger
/// values may move by one, which the integer clamp that always follows in
/// its uses makes irrelevant (the grid ends at ±255).
#[inline(always)]
pub fn round_before_clamp(x: f32) -> f32 {
    const SHIFTER: f32 = 12_582_912.0;
    (x + SHIFTER) - SHIFTER
}

/// `e^x` within about 2 ulp for `x` in [−87, 88] (clamped outside): `n` is
/// `x·log2 e` rounded, `r = x − n·ln 2` (ln 2 in two parts, so `r` is exact
/// to float precision) lies in [−0.35, 0.35], `e^r` by its Taylor polynomial
/// of degree 6 (error below 1.3e-7 relative), `2^n` built in the exponent
/// bits. No branches, so loops over it vectorise.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let x = clamp_value(x, (-87.0, 88.0));
    let k = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = k - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from n's bits in k (plain integer arithmetic, which vectorises).
    let n_bits = k.to_bits().wrapping_sub(SHIFTER.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `1 / (1 + e^−x)`.
#[inline(always)]
pub fn sigmoid_value(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// Sigmoid of every value in place.
pub fn sigmoid(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { simd::sigmoid(v) };
        return;
    }
    for x in v {
        *x = sigmoid_value(*x);
    }
}

/// The error function by Abramowitz & Stegun's 7.1.26 on [`exp_approx`]
/// (absolute error under 3e-7; ±1 from |x| = 4 on, where 1 − erf is below
/// f32's resolution). No branches, so loops over it vectorise.
#[inline(always)]
pub fn erf_value(x: f32) -> f32 {
    let z = x.abs().min(4.0);
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_7) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp_approx(-z * z)).copysign(x)
}

/// GELU's exact form, `x · (1 + erf(x / √2)) / 2`, on [`erf_value`].
#[inline(always)]
pub fn gelu_value(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_value(x / std::f32::consts::SQRT_2))
}

/// GELU of every value in place.
pub fn gelu(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { simd::gelu(v) };
        return;
    }
    for x in v {
        *x = gelu_value(*x);
    }
}

/// The error function of every value in place (GELU's exact form).
pub fn erf(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { simd::erf(v) };
        return;
    }
    for x in v {
        *x = erf_value(*x);
    }
}

/// SiLU of every value in place.
pub fn silu(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        unsafe { avx512::silu(v) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { simd::silu(v) };
        return;
    }
    for x in v {
        *x *= sigmoid_value(*x);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    /// The portable loops compiled with AVX2 + FMA, which the compiler
    /// vectorises (no calls, no branches in the body).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sigmoid(v: &mut [f32]) {
        for x in v {
            *x = super::sigmoid_value(*x);
        }
    }

    /// See [`sigmoid`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu(v: &mut [f32]) {
        for x in v {
            *x = super::gelu_value(*x);
        }
    }

    /// See [`sigmoid`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn erf(v: &mut [f32]) {
        for x in v {
            *x = super::erf_value(*x);
        }
    }

    /// See [`sigmoid`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu(v: &mut [f32]) {
        for x in v {
            *x *= super::sigmoid_value(*x);
        }
    }
}

/// SiLU on AVX-512: the tiled convolution's activation, and the buffer
/// pass on CPUs that have it.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// `x · sigmoid(x)` on 16 lanes, within 1e-6 relative of the exact
    /// value (tested against `f64`): `e^−x` as `2^n · e^r` with the
    /// polynomial of `activation::exp_approx` evaluated with fused
    /// multiply-adds and `2^n` applied by `scalef`, and `1 / (1 + e^−x)` from
    /// the 14-bit reciprocal estimate refined by one Newton step — no
    /// division, whose throughput (one per ten cycles or so) held the
    /// detector's layers back (the whole network 4–5 % faster without it).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn silu16(x: __m512) -> __m512 {
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let set = _mm512_set1_ps;
        // −x clamped (a NaN stays NaN): at most e^87, whose reciprocal is
        // still a normal float, so x = −∞ gives −∞ · tiny = −∞, not NaN.
        let t = _mm512_sub_ps(_mm512_setzero_ps(), x);
        let t = _mm512_min_ps(set(87.0), _mm512_max_ps(set(-87.0), t));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(t, set(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, set(LN2_HI), t);
        let r = _mm512_fnmadd_ps(n, set(LN2_LO), r);
        let mut p = set(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, set(c));
        }
        let d = _mm512_add_ps(set(1.0), _mm512_scalef_ps(p, n));
        // y ≈ 1/d to 14 bits; y + y·(1 − d·y) to about 24.
        let y = _mm512_rcp14_ps(d);
        let y = _mm512_fmadd_ps(_mm512_fnmadd_ps(d, y, set(1.0)), y, y);
        _mm512_mul_ps(x, y)
    }

    /// `activation` on 16 lanes (a NaN stays NaN through the clamp).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn apply16(v: __m512, activation: super::Activation) -> __m512 {
        match activation {
            super::Activation::None => v,
            // `max(lo, v)` then `min(hi, v)` keep a NaN as it is.
            super::Activation::Clamp(lo, hi) => {
                _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), v))
            }
            super::Activation::Silu => silu16(v),
        }
    }

    /// [`silu16`] over a buffer, 16 values at a time (the tail masked).
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu(v: &mut [f32]) {
        for chunk in v.chunks_mut(16) {
            let mask = ((1u32 << chunk.len()) - 1) as __mmask16;
            let p = chunk.as_mut_ptr();
            // SAFETY: the mask keeps the lanes inside the chunk.
            unsafe { _mm512_mask_storeu_ps(p, mask, silu16(_mm512_maskz_loadu_ps(mask, p))) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponential_is_within_two_ulp_of_the_standard_one() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (f64::from(exp_approx(x)), f64::from(x).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[test]
    fn erf_is_within_3e_7_of_the_series() {
        // Against the series Σ (−1)^n x^(2n+1) / (n!(2n+1)) · 2/√π in f64,
        // summed until its terms vanish (accurate to 1e-12 on |x| ≤ 4.5).
        let series = |x: f64| {
            let (mut term, mut sum, mut n) = (x, x, 1);
            while term.abs() > 1e-17 * sum.abs().max(1e-300) && n < 200 {
                term *= -x * x / f64::from(n);
                sum += term / f64::from(2 * n + 1);
                n += 1;
            }
            sum * std::f64::consts::FRAC_2_SQRT_PI
        };
        let xs: Vec<f32> = (-450..=450).map(|i| i as f32 / 100.0).collect();
        let mut v = xs.clone();
        erf(&mut v);
        for (x, got) in xs.iter().zip(&v) {
            let want = series(f64::from(*x));
            assert!(
                (f64::from(*got) - want).abs() < 3e-7,
                "erf({x}) = {got}, want {want}"
            );
            assert_eq!(*got, erf_value(*x), "the loop and the value agree at {x}");
        }
        let mut g = xs.clone();
        gelu(&mut g);
        for (x, got) in xs.iter().zip(&g) {
            let x64 = f64::from(*x);
            let want = 0.5 * x64 * (1.0 + series(x64 / std::f64::consts::SQRT_2));
            assert!(
                (f64::from(*got) - want).abs() < 2e-6,
                "gelu({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn sigmoid_and_silu_match_their_definitions() {
        let xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.025).collect();
        let mut s = xs.clone();
        sigmoid(&mut s);
        // Every path this CPU can take, not only the one `silu` picks.
        let mut paths: Vec<Vec<f32>> = vec![xs.iter().map(|x| x * sigmoid_value(*x)).collect()];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                let mut q = xs.clone();
                // SAFETY: checked just above.
                unsafe { simd::silu(&mut q) };
                paths.push(q);
            }
            if has!("avx512f") {
                let mut q = xs.clone();
                // SAFETY: checked just above.
                unsafe { avx512::silu(&mut q) };
                paths.push(q);
            }
        }
        let mut q = xs.clone();
        silu(&mut q);
        paths.push(q);
        for q in &paths {
            assert_eq!(q.len(), xs.len());
        }
        for (i, (x, s)) in xs.iter().zip(&s).enumerate() {
            let want = 1.0 / (1.0 + (-f64::from(*x)).exp());
            // Relative to the value, or absolutely negligible (below e^−87 the
            // exponential is clamped).
            assert!(
                (f64::from(*s) - want).abs() <= 1e-6 * want + 1e-37,
                "{x}: {s} vs {want}"
            );
            let want_q = f64::from(*x) * want;
            for (path, q) in paths.iter().enumerate() {
                let q = q[i];
                assert!(
                    (f64::from(q) - want_q).abs() <= 1e-6 * want_q.abs() + 1e-35,
                    "path {path}, {x}: {q} vs {want_q}"
                );
            }
        }
        // Saturation far out.
        let mut far = vec![-200.0f32, 200.0];
        sigmoid(&mut far);
        assert!(far[0] < 1e-37 && far[1] == 1.0, "{far:?}");
    }
}
