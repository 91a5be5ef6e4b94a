//! KL (entropy) calibration: the symmetric threshold whose 8-bit quantization
//! of the |x| histogram keeps the KL divergence to the original smallest.

use super::Observer;
use super::histogram::Histogram;
use crate::quant::params::{ActParams, ParamsError, act_params};

/// State of the KL calibrator: a histogram of |x|.
#[derive(Clone, Debug)]
pub struct Kl {
    hist: Histogram,
    min: f32,
    max: f32,
    scratch: Vec<f32>,
}

impl Kl {
    /// A calibrator with `bins` bins over `[0, max|x|]`.
    pub fn new(bins: usize) -> Kl {
        Kl {
            hist: Histogram::aligned(bins.max(256)),
            min: 0.0,
            max: 0.0,
            scratch: Vec::new(),
        }
    }
}

/// Moves a little mass (`eps` counts) onto the empty bins of a histogram of
/// counts, taking it evenly from the others, so the divergence stays finite
/// where one distribution has a hole; `None` when the histogram is empty.
fn smooth(h: &[f64]) -> Option<Vec<f64>> {
    const EPS: f64 = 1e-4;
    let zeros = h.iter().filter(|&&v| v == 0.0).count();
    let nonzeros = h.len() - zeros;
    if nonzeros == 0 {
        return None;
    }
    let take = EPS * zeros as f64 / nonzeros as f64;
    let smoothed: Vec<f64> = h
        .iter()
        .map(|&v| if v == 0.0 { EPS } else { v - take })
        .collect();
    let total: f64 = smoothed.iter().sum();
    Some(smoothed.into_iter().map(|v| v / total).collect())
}

fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (Some(p), Some(q)) = (smooth(p), smooth(q)) else {
        return f64::INFINITY;
    };
    p.iter()
        .zip(&q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| {
            if *b <= 0.0 {
                f64::INFINITY
            } else {
                a * (a / b).ln()
            }
        })
        .sum()
}

/// The number of grid levels a threshold of |x| is spread over: the whole
/// grid for an asymmetric setting, half of it (one side of zero) for a
/// symmetric one, whatever the sign of the data (a symmetric grid spends its
/// negative half even on non-negative data).
pub fn levels(asymmetric: bool, bits: u32) -> usize {
    if asymmetric {
        1usize << bits
    } else {
        1usize << (bits - 1)
    }
}

/// The bin count (threshold = that many bins) minimising the divergence
/// between the clipped histogram and its quantization into `levels` bins.
pub fn best_threshold_bins(counts: &[f64], levels: usize) -> usize {
    let n = counts.len();
    if n <= levels {
        return n;
    }
    let mut best = (f64::INFINITY, n);
    for i in levels..=n {
        let mut p = counts[..i].to_vec();
        p[i - 1] += counts[i..].iter().sum::<f64>();
        // Merge the i bins into `levels` groups, spread each group's mass over its non-empty bins.
        let mut q = vec![0.0; i];
        for g in 0..levels {
            let a = g * i / levels;
            let b = ((g + 1) * i / levels).max(a + 1);
            let mass: f64 = counts[a..b].iter().sum();
            let nonzero = p[a..b].iter().filter(|&&c| c > 0.0).count();
            if nonzero > 0 {
                for j in a..b {
                    if p[j] > 0.0 {
                        q[j] = mass / nonzero as f64;
                    }
                }
            }
        }
        let d = kl_divergence(&p, &q);
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1
}

impl Observer for Kl {
    fn observe(&mut self, data: &[f32], min: f32, max: f32) {
        self.min = self.min.min(min);
        self.max = self.max.max(max);
        self.scratch.clear();
        self.scratch.extend(data.iter().map(|x| x.abs()));
        let amax = min.abs().max(max.abs());
        self.hist.add(&self.scratch, 0.0, amax);
    }

    fn params(&self, asymmetric: bool, bits: u32) -> Result<ActParams, ParamsError> {
        let i = best_threshold_bins(&self.hist.counts(), levels(asymmetric, bits));
        let t = (f64::from(self.hist.lo()) + i as f64 * self.hist.bin_width()) as f32;
        act_params(self.min.max(-t), self.max.min(t), asymmetric, bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_is_zero_for_equal_distributions() {
        assert!(kl_divergence(&[1.0, 2.0], &[2.0, 4.0]).abs() < 1e-12);
        assert!(kl_divergence(&[1.0, 1.0], &[1.0, 0.0]) > 0.1);
        assert!(kl_divergence(&[0.0, 0.0], &[1.0, 0.0]).is_infinite());
    }

    #[test]
    fn the_grid_levels_follow_the_setting_not_the_sign_of_the_data() {
        // A long-tailed, non-negative distribution (ReLU-like), and the same with
        // one tiny negative value: the symmetric threshold must not change.
        let positive: Vec<f32> = (1..50_000)
            .map(|i| -((i as f32 / 50_000.0).ln()) * 0.3)
            .collect();
        let mut signed = positive.clone();
        signed.push(-1e-6);
        let threshold = |data: &[f32], asymmetric: bool| {
            let mut o = Kl::new(2048);
            let (mn, mx) = super::super::finite_extremes(data).unwrap();
            o.observe(data, mn, mx);
            o.params(asymmetric, 8).unwrap()
        };
        let a = threshold(&positive, false);
        let b = threshold(&signed, false);
        assert!(
            (a.scale - b.scale).abs() <= 1e-6 * a.scale,
            "symmetric: {a:?} vs {b:?}"
        );
        assert_eq!((levels(false, 8), levels(true, 8)), (128, 256));
    }

    #[test]
    fn threshold_drops_a_far_outlier_but_keeps_the_bulk() {
        // Uniform on [-1, 1] and one value at 40: the |x| histogram's 2048
        // bins are 40/2048 wide and the bulk fills the first 52. Candidate
        // thresholds start at 128 bins (one bin per level, 2.5) and all of
        // them below the outlier hold the whole bulk, which a coarser grid
        // represents as well in the KL sense (uniform mass averages to
        // itself); the one at 2048 bins adds the outlier's spike. So the
        // threshold is one of the first candidates, not the outlier (40) nor
        // anywhere in between (measured: 136 bins, 2.656).
        let mut data: Vec<f32> = (0..100_000)
            .map(|i| ((i % 1000) as f32 / 1000.0 - 0.5) * 2.0)
            .collect();
        data.push(40.0);
        let mut o = Kl::new(2048);
        o.observe(&data, -1.0, 40.0);
        let p = o.params(false, 8).unwrap();
        let t = p.scale * 127.0;
        let bin = 40.0 / 2048.0;
        assert!(
            t >= 128.0 * bin * 0.999 && t <= 144.0 * bin,
            "threshold {t} ({} bins)",
            t / bin
        );
    }
}
