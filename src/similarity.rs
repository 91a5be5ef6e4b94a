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

    /// [`Similarity::add`] for two slices, in four interleaved running sums
    /// (independent chains the CPU overlaps; the same sums up to rounding).
    pub fn add_slices(&mut self, reference: &[f32], candidate: &[f32]) {
        const LANES: usize = 4;
        let n = reference.len().min(candidate.len());
        let (r, c) = (&reference[..n], &candidate[..n]);
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
        self.dot += dot.iter().sum::<f64>();
        self.reference_sq += rr.iter().sum::<f64>();
        self.candidate_sq += cc.iter().sum::<f64>();
        self.error_sq += ee.iter().sum::<f64>();
        self.max_abs = mx.iter().fold(self.max_abs, |a, &b| a.max(b));
        self.count += (n - r_rest.len()) as u64;
        self.add(r_rest, c_rest);
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
}
