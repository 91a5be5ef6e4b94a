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

/// SiLU of every value in place.
pub fn silu(v: &mut [f32]) {
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
    pub unsafe fn silu(v: &mut [f32]) {
        for x in v {
            *x *= super::sigmoid_value(*x);
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
    fn sigmoid_and_silu_match_their_definitions() {
        let xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.025).collect();
        let mut s = xs.clone();
        sigmoid(&mut s);
        let mut q = xs.clone();
        silu(&mut q);
        for ((x, s), q) in xs.iter().zip(&s).zip(&q) {
            let want = 1.0 / (1.0 + (-f64::from(*x)).exp());
            // Relative to the value, or absolutely negligible (below e^−87 the
            // exponential is clamped).
            assert!(
                (f64::from(*s) - want).abs() <= 1e-6 * want + 1e-37,
                "{x}: {s} vs {want}"
            );
            let want_q = f64::from(*x) * want;
            assert!(
                (f64::from(*q) - want_q).abs() <= 1e-6 * want_q.abs() + 1e-35,
                "{x}: {q} vs {want_q}"
            );
        }
        // Saturation far out.
        let mut far = vec![-200.0f32, 200.0];
        sigmoid(&mut far);
        assert!(far[0] < 1e-37 && far[1] == 1.0, "{far:?}");
    }
}
