//! HFMG: a histogram merged across batches, and a search over clip windows
//! that shrinks greedily from the sparser tail, scoring each window by the
//! expected squared error of quantizing the histogram into `2^bits` levels.

use super::Observer;
use super::histogram::Histogram;
use crate::quant::params::{ActParams, ParamsError, act_params};

/// Samples removed per shrinking step: `ceil(total / STEP_DIVISOR)`.
const STEP_DIVISOR: f64 = 100_000.0;
/// The search stops when the window is no wider than `bins / MIN_BIN_RATIO`.
const MIN_BIN_RATIO: usize = 4;

/// State of the HFMG calibrator.
#[derive(Clone, Debug)]
pub struct Hfmg {
    hist: Histogram,
}

impl Hfmg {
    /// A calibrator with `bins` histogram bins.
    pub fn new(bins: usize) -> Hfmg {
        Hfmg {
            hist: Histogram::new(bins),
        }
    }
}

/// Expected squared quantization error of the histogram when the window of
/// bins `[left, right]` is mapped onto `levels` equal destination bins and
/// every value is replaced by its destination bin's centre (values outside
/// the window go to the end bins).
pub fn window_error(
    counts: &[f64],
    bin_width: f64,
    left: usize,
    right: usize,
    levels: usize,
) -> f64 {
    let dst_width = bin_width * (right - left + 1) as f64 / levels as f64;
    if dst_width <= 0.0 {
        return 0.0;
    }
    let half = dst_width / 2.0;
    let cube = |v: f64| v * v * v;
    let dst_bin = |pos: f64| ((pos / dst_width).floor().max(0.0) as usize).min(levels - 1);
    let mut norm = 0.0;
    for (i, &c) in counts.iter().enumerate() {
        if c == 0.0 {
            continue;
        }
        let density = c / bin_width;
        let begin = (i as f64 - left as f64) * bin_width;
        let end = begin + bin_width;
        let (b, e) = (dst_bin(begin), dst_bin(end));
        let center = |d: usize| (d as f64 + 0.5) * dst_width;
        if b == e {
            norm += density * (cube(end - center(e)) - cube(begin - center(b))) / 3.0;
        } else {
            norm += density * (cube(half) - cube(begin - center(b))) / 3.0;
            norm += (e - b - 1) as f64 * density * (cube(half) - cube(-half)) / 3.0;
            norm += density * (cube(end - center(e)) - cube(-half)) / 3.0;
        }
    }
    norm
}

/// The clip windows HFMG tries: greedy shrinking from `[0, bins-1]`.
pub fn candidate_windows(counts: &[f64]) -> Vec<(usize, usize)> {
    let n = counts.len();
    let total: f64 = counts.iter().sum();
    let step = (total / STEP_DIVISOR).ceil().max(1.0);
    let min_width = n.div_ceil(MIN_BIN_RATIO);
    let (mut left, mut right) = (0usize, n - 1);
    let mut out = vec![(left, right)];
    while right - left + 1 > min_width {
        // Bins dropped on each side to remove `step` samples.
        let (mut l, mut acc_l) = (left, 0.0);
        while l < right && acc_l + counts[l] < step {
            acc_l += counts[l];
            l += 1;
        }
        let (mut r, mut acc_r) = (right, 0.0);
        while r > left && acc_r + counts[r] < step {
            acc_r += counts[r];
            r -= 1;
        }
        let drop_l = l - left + 1;
        let drop_r = right - r + 1;
        if drop_l >= drop_r {
            left = (left + drop_l).min(right);
        } else {
            right = right.saturating_sub(drop_r).max(left);
        }
        if right <= left {
            break;
        }
        out.push((left, right));
    }
    out
}

impl Observer for Hfmg {
    fn observe(&mut self, data: &[f32], min: f32, max: f32) {
        self.hist.add(data, min, max);
    }

    fn params(&self, asymmetric: bool, bits: u32) -> Result<ActParams, ParamsError> {
        let counts = &self.hist.counts()[..];
        let width = self.hist.bin_width();
        if width <= 0.0 {
            return act_params(self.hist.lo(), self.hist.hi(), asymmetric, bits);
        }
        let levels = 1usize << bits;
        let (left, right) = candidate_windows(counts)
            .into_iter()
            .map(|(l, r)| (window_error(counts, width, l, r, levels), (l, r)))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, w)| w)
            .expect("at least the full window");
        let lo = f64::from(self.hist.lo());
        let clip_min = (lo + left as f64 * width) as f32;
        let clip_max = (lo + (right + 1) as f64 * width) as f32;
        act_params(clip_min, clip_max, asymmetric, bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_error_of_a_uniform_histogram_is_the_uniform_quantization_noise() {
        // 256 source bins of width 1 mapped onto 256 levels: each value sits in a
        // destination bin of width 1, error per unit density = 1/12 per bin.
        let counts = vec![1.0; 256];
        let e = window_error(&counts, 1.0, 0, 255, 256);
        assert!((e - 256.0 / 12.0).abs() < 1e-9, "{e}");
        // Halving the window doubles the step for the kept half and clips the rest.
        assert!(window_error(&counts, 1.0, 0, 127, 256) > e);
    }

    #[test]
    fn a_sparse_tail_is_cut() {
        // One outlier at 20 among a million values in [0, 1): keeping it costs
        // 1e6 * (20/255)^2 / 12 = 513 of rounding noise, clipping it about 19^2 = 361.
        let mut data: Vec<f32> = (0..1_000_000).map(|i| (i % 1000) as f32 / 1000.0).collect();
        data.push(20.0);
        let mut o = Hfmg::new(4096);
        o.observe(&data, 0.0, 20.0);
        let p = o.params(true, 8).unwrap();
        let (_, hi) = p.range(8);
        assert!(hi < 10.0, "clip max {hi} should drop the outlier");
        assert!(hi > 0.9, "clip max {hi} must keep the bulk");
    }

    /// The squared error of quantizing `data` to 256 levels over `[lo, hi]`,
    /// measured on the values themselves.
    fn measured_error(data: &[f32], lo: f32, hi: f32) -> f64 {
        let step = f64::from(hi - lo) / 255.0;
        data.iter()
            .map(|&x| {
                let level = ((f64::from(x) - f64::from(lo)) / step)
                    .round()
                    .clamp(0.0, 255.0);
                let back = f64::from(lo) + level * step;
                (f64::from(x) - back).powi(2)
            })
            .sum()
    }

    #[test]
    fn the_range_is_as_good_as_a_brute_force_search_on_the_data() {
        // A ramp with a sparse tail: the best upper clip, searched here over
        // 2000 candidates by measuring the error on the data, against HFMG's.
        let mut data: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0).collect();
        data.extend((0..20).map(|i| 4.0 + i as f32 / 4.0));
        let mut o = Hfmg::new(2048);
        o.observe(&data, 0.0, 8.75);
        let (lo, hi) = o.params(true, 8).unwrap().range(8);
        let best = (1..=2000)
            .map(|k| measured_error(&data, 0.0, k as f32 * 8.75 / 2000.0))
            .fold(f64::INFINITY, f64::min);
        let got = measured_error(&data, lo, hi);
        assert!(
            got <= 1.05 * best,
            "HFMG's [{lo}, {hi}] error {got} vs best {best}"
        );
        // And the check can fail: a clip inside the bulk, or a range four
        // times too wide, is far worse.
        assert!(measured_error(&data, 0.0, 0.5) > 1.5 * best);
        assert!(measured_error(&data, 0.0, 35.0) > 1.5 * best);
    }
}
