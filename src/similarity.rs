//! How close a candidate tensor is to a reference, accumulated piece by
//! piece so it can be streamed over batches: cosine similarity, relative L2
//! error, mean squared error and largest absolute difference.

/// Running sums over pairs of (reference, candidate) values.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Similarity {
    dot: f64,
    reference_sq: f64,
    candidate_sq: f64,
    error_sq: f64,
    max_abs: f64,
    count: u64,
}

impl Similarity {
    /// Adds matching elements of the reference and the candidate.
    pub fn add<'a>(
        &mut self,
        reference: impl IntoIterator<Item = &'a f32>,
        candidate: impl IntoIterator<Item = &'a f32>,
    ) {
        for (&r, &c) in reference.into_iter().zip(candidate) {
            let (r, c) = (f64::from(r), f64::from(c));
            self.dot += r * c;
            self.reference_sq += r * r;
            self.candidate_sq += c * c;
            self.error_sq += (r - c) * (r - c);
            self.max_abs = self.max_abs.max((r - c).abs());
            self.count += 1;
        }
    }

    /// [`Similarity::add`] for two slices, fast: blocks of the slices are
    /// summed in parallel, each in eight interleaved running sums (AVX-512
    /// vectors where the CPU has them), and the blocks' sums are added in order, so the
    /// result is the same from run to run (and equal to `add` up to rounding).
    pub fn add_slices(&mut self, reference: &[f32], candidate: &[f32]) {
        use rayon::prelude::*;
        const BLOCK: usize = 1 << 15;
        let n = reference.len().min(candidate.len());
        let (r, c) = (&reference[..n], &candidate[..n]);
        let blocks: Vec<Similarity> = r
            .par_chunks(BLOCK)
            .zip(c.par_chunks(BLOCK))
            .map(|(r, c)| block_sums(r, c))
            .collect();
        for b in blocks {
            self.merge(&b);
        }
    }

    /// Adds the sums of another accumulator.
    pub fn merge(&mut self, other: &Similarity) {
        self.dot += other.dot;
        self.reference_sq += other.reference_sq;
        self.candidate_sq += other.candidate_sq;
        self.error_sq += other.error_sq;
        self.max_abs = self.max_abs.max(other.max_abs);
        self.count += other.count;
    }

    /// Mean squared difference (0 before any element).
    pub fn mse(&self) -> f64 {
        self.error_sq / self.count.max(1) as f64
    }

    /// Cosine similarity, with AMCT's conventions: an all-zero reference
    /// counts as similar (1), an all-zero candidate against a non-zero
    /// reference as not (0).
    pub fn cosine(&self) -> f64 {
        if self.reference_sq == 0.0 {
            1.0
        } else if self.candidate_sq == 0.0 {
            0.0
        } else {
            self.dot / (self.reference_sq * self.candidate_sq).sqrt()
        }
    }

    /// ‖candidate − reference‖ / ‖reference‖ (the absolute norm when the reference is zero).
    pub fn relative_l2(&self) -> f64 {
        if self.reference_sq == 0.0 {
            self.error_sq.sqrt()
        } else {
            (self.error_sq / self.reference_sq).sqrt()
        }
    }

    /// Largest absolute difference.
    pub fn max_abs(&self) -> f64 {
        self.max_abs
    }
}

/// The sums of one block, in AVX-512 vectors where the CPU has them.
fn block_sums(r: &[f32], c: &[f32]) -> Similarity {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { lanes_avx512(r, c) };
    }
    lanes(r, c)
}

/// [`lanes`] in AVX-512 vectors: eight values a step, widened to f64, the
/// sums fused multiply-adds (the same sums up to rounding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn lanes_avx512(r: &[f32], c: &[f32]) -> Similarity {
    use std::arch::x86_64::*;
    let n = r.len().min(c.len());
    let whole = n / 8 * 8;
    let (mut dot, mut rr, mut cc, mut ee, mut mx) = (
        _mm512_setzero_pd(),
        _mm512_setzero_pd(),
        _mm512_setzero_pd(),
        _mm512_setzero_pd(),
        _mm512_setzero_pd(),
    );
    for i in (0..whole).step_by(8) {
        // SAFETY: `i + 8 <= whole <= n`, inside both slices.
        let (x, y) = unsafe {
            (
                _mm512_cvtps_pd(_mm256_loadu_ps(r.as_ptr().add(i))),
                _mm512_cvtps_pd(_mm256_loadu_ps(c.as_ptr().add(i))),
            )
        };
        let d = _mm512_sub_pd(x, y);
        dot = _mm512_fmadd_pd(x, y, dot);
        rr = _mm512_fmadd_pd(x, x, rr);
        cc = _mm512_fmadd_pd(y, y, cc);
        ee = _mm512_fmadd_pd(d, d, ee);
        // A NaN difference leaves the maximum as it was, as in `add`.
        mx = _mm512_max_pd(_mm512_abs_pd(d), mx);
    }
    let mut s = Similarity {
        dot: _mm512_reduce_add_pd(dot),
        reference_sq: _mm512_reduce_add_pd(rr),
        candidate_sq: _mm512_reduce_add_pd(cc),
        error_sq: _mm512_reduce_add_pd(ee),
        max_abs: _mm512_reduce_max_pd(mx),
        count: whole as u64,
    };
    s.add(&r[whole..n], &c[whole..n]);
    s
}

/// Eight interleaved running sums (independent chains the CPU overlaps),
/// then the tail one value at a time.
fn lanes(r: &[f32], c: &[f32]) -> Similarity {
    const LANES: usize = 8;
    let mut dot = [0.0f64; LANES];
    let mut rr = [0.0f64; LANES];
    let mut cc = [0.0f64; LANES];
    let mut ee = [0.0f64; LANES];
    let mut mx = [0.0f64; LANES];
    let (rq, cq) = (r.chunks_exact(LANES), c.chunks_exact(LANES));
    let (r_rest, c_rest) = (rq.remainder(), cq.remainder());
    for (a, b) in rq.zip(cq) {
        for i in 0..LANES {
            let (x, y) = (f64::from(a[i]), f64::from(b[i]));
            let d = x - y;
            dot[i] += x * y;
            rr[i] += x * x;
            cc[i] += y * y;
            ee[i] += d * d;
            mx[i] = if d.abs() > mx[i] { d.abs() } else { mx[i] };
        }
    }
    let mut s = Similarity {
        dot: dot.iter().sum(),
        reference_sq: rr.iter().sum(),
        candidate_sq: cc.iter().sum(),
        error_sq: ee.iter().sum(),
        max_abs: mx.iter().fold(0.0, |a, &b| a.max(b)),
        count: (r.len() - r_rest.len()) as u64,
    };
    s.add(r_rest, c_rest);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand() {
        let mut s = Similarity::default();
        s.add(&[1.0, 0.0], &[1.0, 1.0]);
        assert!((s.cosine() - 1.0 / 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(s.relative_l2(), 1.0);
        assert_eq!(s.max_abs(), 1.0);
        assert_eq!(s.mse(), 0.5);
        // The slice path gives the same figures (these sums are exact).
        let mut t = Similarity::default();
        t.add_slices(&[1.0, 0.0, 2.0, -1.0, 0.5], &[1.0, 1.0, 2.0, 1.0, 0.5]);
        let mut u = Similarity::default();
        u.add(&[1.0, 0.0, 2.0, -1.0, 0.5], &[1.0, 1.0, 2.0, 1.0, 0.5]);
        assert_eq!(t, u);
        let mut z = Similarity::default();
        z.add(&[0.0], &[3.0]);
        assert_eq!(z.cosine(), 1.0);
        let mut dead = Similarity::default();
        dead.add(&[2.0], &[0.0]);
        assert_eq!(dead.cosine(), 0.0);
    }

    /// Many blocks, a tail and a largest difference in the last block: the
    /// fast path agrees with the one-value-at-a-time definition.
    #[test]
    fn slices_in_parallel_blocks_match_the_definition() {
        let n = 3 * (1 << 15) + 1005;
        let r: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let mut c: Vec<f32> = r
            .iter()
            .enumerate()
            .map(|(i, x)| x + (i % 13) as f32 * 1e-3)
            .collect();
        c[n - 3] += 2.5;
        let mut plain = Similarity::default();
        plain.add(&r, &c);
        let mut fast = Similarity::default();
        fast.add_slices(&r, &c);
        // The portable lanes too, which a CPU with AVX-512 never takes.
        for (path, got) in [("add_slices", fast), ("portable lanes", lanes(&r, &c))] {
            assert_eq!(got.count, plain.count, "{path}");
            assert_eq!(got.max_abs, plain.max_abs, "{path}");
            for (a, b) in [
                (got.dot, plain.dot),
                (got.reference_sq, plain.reference_sq),
                (got.candidate_sq, plain.candidate_sq),
                (got.error_sq, plain.error_sq),
            ] {
                assert!((a - b).abs() <= 1e-12 * b.abs(), "{path}: {a} vs {b}");
            }
        }
    }
}
