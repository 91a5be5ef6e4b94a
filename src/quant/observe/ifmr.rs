//! IFMR, AMCT's default activation calibrator: pick the percentile extremes,
//! then search the clip maximum `r * max` (r in `search_range` by `search_step`)
//! whose quantization has the smallest mean squared error over all data.
//!
//! AMCT keeps every value of every batch to do this. We keep bounded state
//! instead, and get the same answer:
//! * the exact count, minimum and maximum;
//! * the `TAIL` largest and smallest values seen, from which the percentile
//!   extremes are exact as long as `N * (1 - p) < TAIL` (with the default
//!   p = 0.999999 that is any N below 4e9); past that a histogram quantile is used;
//! * a histogram of `BINS` bins over the data range, on which the MSE of each
//!   candidate is evaluated at the bin centres. One quantization step spans
//!   at least `BINS / 256` = 128 bins, so the error of replacing each value by
//!   its bin centre is below 1/128 of a step; candidates differ by 1 % of the
//!   range, and the test `agrees_with_the_exact_all_data_search` checks that
//!   the chosen candidate is the exact one.

use super::Observer;
use super::histogram::Histogram;
use crate::quant::params::{
    ActParams, FLT_EPSILON, ParamsError, act_params, int_range, symmetric_scale,
};
use crate::quant::value_bounds::Bounds;

/// Histogram bins used for the MSE search.
const BINS: usize = 1 << 15;
/// Extreme values kept exactly on each side.
const TAIL: usize = 4096;

/// IFMR's parameters (AMCT names and defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct IfmrSettings {
    /// Percentile of the ascending data taken as the initial maximum, in (0.5, 1].
    pub max_percentile: f64,
    /// Percentile of the descending data taken as the initial minimum, in (0.5, 1].
    pub min_percentile: f64,
    /// `[start, end)` of the factors applied to the initial maximum.
    pub search_range: [f32; 2],
    /// Step between two factors.
    pub search_step: f32,
    /// Our extension (JSON `extend_search_below`, on with `--optimize`): when
    /// the smallest factor of the range has the smallest error, keep stepping
    /// below it while the error falls (data piled up near zero with a few
    /// large values, as ReLU6 outputs often are, want clips under 0.7 × max).
    pub extend_below: bool,
}

impl Default for IfmrSettings {
    fn default() -> Self {
        IfmrSettings {
            max_percentile: 0.999999,
            min_percentile: 0.999999,
            search_range: [0.7, 1.3],
            search_step: 0.01,
            extend_below: false,
        }
    }
}

impl IfmrSettings {
    /// The search factors: `start, start + step, ...` below `end` (as numpy's arange).
    pub fn factors(&self) -> Vec<f32> {
        let [start, end] = self.search_range;
        let n = ((end - start) / self.search_step - 1e-4).ceil().max(1.0) as usize;
        (0..n)
            .map(|i| start + i as f32 * self.search_step)
            .collect()
    }
}

/// State of the IFMR calibrator.
#[derive(Clone, Debug)]
pub struct Ifmr {
    settings: IfmrSettings,
    bounds: Bounds,
    count: u64,
    /// The largest values seen.
    largest: Tail,
    /// The smallest values seen, negated (so the largest of those).
    smallest: Tail,
    hist: Histogram,
}

/// The `TAIL` largest values seen, in no order: merged a batch at a time
/// (the batch's values above the current floor appended, then the `TAIL`
/// largest selected in linear time), which ends with the same values as
/// pushing every value through a bounded heap, at a fraction of the cost.
#[derive(Clone, Debug, Default)]
struct Tail {
    values: Vec<f32>,
    /// The smallest kept value once `TAIL` are kept.
    floor: f32,
}

/// `x` as an integer in `f32::total_cmp`'s order.
fn order_key(x: f32) -> i32 {
    let bits = x.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

impl Tail {
    /// Values at or below this cannot enter (−∞ until `TAIL` are kept).
    fn threshold(&self) -> f32 {
        if self.values.len() == TAIL {
            self.floor
        } else {
            f32::NEG_INFINITY
        }
    }

    /// Offers `data` (negated when `NEGATE`), whose largest value is `largest`.
    fn offer<const NEGATE: bool>(&mut self, data: &[f32], largest: f32) {
        let value = |x: f32| if NEGATE { -x } else { x };
        let t = self.threshold();
        if largest <= t {
            return;
        }
        let sampled = t == f32::NEG_INFINITY
            && data.len() >= 16 * TAIL
            && self.extend_above_sampled_floor::<NEGATE>(data);
        if !sampled {
            self.values
                .extend(data.iter().map(|&x| value(x)).filter(|&x| x > t));
        }
        if self.values.len() >= TAIL {
            if self.values.len() > TAIL {
                self.values
                    .select_nth_unstable_by(TAIL - 1, |a, b| b.total_cmp(a));
                self.values.truncate(TAIL);
                // A first batch may have appended all its values.
                self.values.shrink_to(2 * TAIL);
            }
            self.floor = self.values.iter().copied().fold(f32::INFINITY, f32::min);
        }
    }

    /// For a tail not yet full and a large batch (a first batch): rather than
    /// select among every value, guesses a floor from a sample of the batch
    /// and checks it. When `TAIL` values of the batch reach the floor, no
    /// value below it can be among the `TAIL` largest, so only those above
    /// it, and as many copies of it as are needed, are appended (and true is
    /// returned); else nothing is. Values compare in `total_cmp`'s order.
    fn extend_above_sampled_floor<const NEGATE: bool>(&mut self, data: &[f32]) -> bool {
        let value = |x: f32| if NEGATE { -x } else { x };
        // About 4·TAIL sampled values; the guess ranks where 2·TAIL values of
        // the batch are expected at or above it.
        let stride = data.len() / (4 * TAIL);
        let mut sample: Vec<f32> = data.iter().step_by(stride).map(|&x| value(x)).collect();
        let rank = (2 * TAIL / stride).clamp(1, sample.len());
        sample.select_nth_unstable_by(rank - 1, |a, b| b.total_cmp(a));
        let floor = order_key(sample[rank - 1]);
        let (mut above, mut equal) = (0usize, 0usize);
        for &x in data {
            let k = order_key(value(x));
            above += usize::from(k > floor);
            equal += usize::from(k == floor);
        }
        if above + equal < TAIL {
            return false;
        }
        // Copies of the floor value are alike: only as many as can be kept
        // (ReLU outputs hold zeros by the hundred thousand).
        let (mut above, mut ties) = (above, TAIL.saturating_sub(above));
        self.values.reserve(above + ties);
        for &x in data {
            if above == 0 && ties == 0 {
                break; // all taken
            }
            let v = value(x);
            let k = order_key(v);
            if k > floor {
                above -= 1;
                self.values.push(v);
            } else if k == floor && ties > 0 {
                ties -= 1;
                self.values.push(v);
            }
        }
        true
    }

    /// The `k`-th largest kept value (1-based), if kept.
    fn kth(&self, k: usize) -> Option<f32> {
        if k == 0 || k > self.values.len() {
            return None;
        }
        let mut v = self.values.clone();
        v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        Some(v[k - 1])
    }
}

impl Ifmr {
    /// A calibrator with these settings.
    pub fn new(settings: IfmrSettings) -> Ifmr {
        Ifmr {
            settings,
            bounds: Bounds::ANY,
            count: 0,
            largest: Tail::default(),
            smallest: Tail::default(),
            hist: Histogram::aligned(BINS),
        }
    }

    /// The same calibrator, never clipping beyond what the model can produce.
    pub fn within(mut self, bounds: Bounds) -> Ifmr {
        self.bounds = bounds;
        self
    }

    /// The `k`-th largest value (1-based), exact while the tail holds it.
    fn kth_largest(&self, k: usize) -> f32 {
        match self.largest.kth(k) {
            Some(v) => v,
            None => self.hist.quantile(1.0 - k as f64 / self.count as f64),
        }
    }

    fn kth_smallest(&self, k: usize) -> f32 {
        match self.smallest.kth(k) {
            Some(v) => -v,
            None => self.hist.quantile(k as f64 / self.count as f64),
        }
    }
}

/// AMCT's index of the percentile pick: `N - int(p * N)`, at least 1.
pub fn percentile_rank(n: u64, p: f64) -> usize {
    if p >= 1.0 {
        return 1;
    }
    (n - (p * n as f64) as u64).max(1) as usize
}

/// Consecutive factors below the range without a smaller error after which
/// the extended search stops.
const EXTENSION_PATIENCE: usize = 3;

/// The clip candidates' scales and the one with the smallest MSE, given a
/// function that returns the MSE of a (scale, clip_lo, clip_hi) choice.
/// No candidate clips beyond `bounds`, the values the model can produce.
pub fn search(
    settings: &IfmrSettings,
    min0: f32,
    max0: f32,
    asymmetric: bool,
    bits: u32,
    bounds: Bounds,
    mse: impl Fn(f32, f32, f32) -> f64,
) -> Result<ActParams, ParamsError> {
    let (lo, hi) = int_range(bits);
    let levels = ((1u64 << bits) - 1) as f32;
    let bound = max0.abs().max(min0.abs());
    let cap = if asymmetric {
        bounds.hi
    } else {
        bounds.hi.abs().max(bounds.lo.abs())
    };
    let candidate = |r: f32| -> Option<(f64, f32)> {
        let (scale, clip_lo, clip_hi) = if asymmetric {
            let c = (max0 * r).min(cap);
            ((c - min0) / levels, min0, c)
        } else {
            // The grid is [lo, hi]·scale: with the negative side dominating
            // (scale = c/128) the positive end is 127·scale, below c.
            let c = (bound * r).min(cap);
            let q = if min0.abs() > max0.abs() { -lo } else { hi };
            let scale = c / q as f32;
            (scale, -c, c.min(hi as f32 * scale))
        };
        (scale >= FLT_EPSILON).then(|| (mse(scale, clip_lo, clip_hi), scale))
    };
    let mut best: Option<(f64, f32)> = None;
    let mut best_index = 0;
    for (i, r) in settings.factors().into_iter().enumerate() {
        let Some((loss, scale)) = candidate(r) else {
            continue;
        };
        if best.is_none_or(|(b, _)| loss < b) {
            best = Some((loss, scale));
            best_index = i;
        }
    }
    if settings.extend_below && best.is_some() && best_index == 0 {
        let [start, _] = settings.search_range;
        let mut misses = 0;
        for k in 1.. {
            let r = start - k as f32 * settings.search_step;
            if r < settings.search_step / 2.0 || misses == EXTENSION_PATIENCE {
                break;
            }
            match candidate(r) {
                Some((loss, scale)) if best.is_none_or(|(b, _)| loss < b) => {
                    best = Some((loss, scale));
                    misses = 0;
                }
                _ => misses += 1,
            }
        }
    }
    let Some((_, scale)) = best else {
        return act_params(min0, max0, asymmetric, bits);
    };
    if asymmetric {
        let offset = lo - (min0 / scale).round_ties_even() as i32;
        Ok(ActParams { scale, offset })
    } else {
        symmetric_scale(-scale, scale, bits)?; // only validates finiteness
        Ok(ActParams { scale, offset: 0 })
    }
}

/// Squared error of quantizing `x` with step `scale` after clipping to `[lo, hi]`.
pub fn quant_error(x: f64, scale: f32, lo: f32, hi: f32) -> f64 {
    let s = f64::from(scale);
    let q = (x.clamp(f64::from(lo), f64::from(hi)) / s).round_ties_even() * s;
    (q - x) * (q - x)
}

impl Observer for Ifmr {
    fn observe(&mut self, data: &[f32], min: f32, max: f32) {
        if data.is_empty() {
            return;
        }
        self.count += data.len() as u64;
        // Only values beyond the current tails can enter them: the batch's
        // extremes say whether any can.
        self.largest.offer::<false>(data, max);
        self.smallest.offer::<true>(data, -min);
        self.hist.add(data, min, max);
    }

    fn params(&self, asymmetric: bool, bits: u32) -> Result<ActParams, ParamsError> {
        if self.count == 0 {
            return act_params(0.0, 0.0, asymmetric, bits);
        }
        let max0 = self
            .kth_largest(percentile_rank(self.count, self.settings.max_percentile))
            .max(0.0);
        let min0 = self
            .kth_smallest(percentile_rank(self.count, self.settings.min_percentile))
            .min(0.0);
        let counts = self.hist.counts();
        let centers: Vec<(f64, f64)> = (0..counts.len())
            .filter(|&i| counts[i] > 0.0)
            .map(|i| (self.hist.center(i), counts[i]))
            .collect();
        search(
            &self.settings,
            min0,
            max0,
            asymmetric,
            bits,
            self.bounds,
            |scale, lo, hi| {
                centers
                    .iter()
                    .map(|&(c, n)| n * quant_error(c, scale, lo, hi))
                    .sum()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AMCT's computation with every value in memory, written out here on
    /// its own (not through `search` or `quant_error`): the percentile clips
    /// from a sort, then 60 factors 0.70, 0.71, …, 1.29 of the clip, each
    /// scored by the squared error of quantizing every value, the first
    /// smallest kept. Returns (scale_d, offset_d).
    fn exact(data: &[f32], s: &IfmrSettings, asymmetric: bool) -> (f32, i32) {
        let mut sorted = data.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let n = sorted.len();
        let from_top = |p: f64| (n - (p * n as f64) as usize).max(1);
        let max0 = sorted[n - from_top(s.max_percentile)].max(0.0);
        let min0 = sorted[from_top(s.min_percentile) - 1].min(0.0);
        let mut best = (f64::INFINITY, 0f32);
        for i in 0..60 {
            let r = 0.7 + i as f32 * 0.01;
            let (scale, lo, hi) = if asymmetric {
                let c = max0 * r;
                ((c - min0) / 255.0, min0, c)
            } else {
                let c = max0.abs().max(min0.abs()) * r;
                let q = if min0.abs() > max0.abs() {
                    128.0
                } else {
                    127.0
                };
                (c / q, -c, c.min(127.0 * (c / q)))
            };
            let error: f64 = data
                .iter()
                .map(|&x| {
                    let x = f64::from(x);
                    let step = f64::from(scale);
                    let back =
                        (x.clamp(f64::from(lo), f64::from(hi)) / step).round_ties_even() * step;
                    (back - x).powi(2)
                })
                .sum();
            if error < best.0 {
                best = (error, scale);
            }
        }
        let scale = best.1;
        let offset = if asymmetric {
            -128 - (min0 / scale).round_ties_even() as i32
        } else {
            0
        };
        (scale, offset)
    }

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64) as f32
            })
            .collect()
    }

    #[test]
    fn factors_match_numpy_arange() {
        let f = IfmrSettings::default().factors();
        assert_eq!(f.len(), 60);
        assert!((f[0] - 0.7).abs() < 1e-6 && (f[59] - 1.29).abs() < 1e-5);
    }

    #[test]
    fn agrees_with_the_exact_all_data_search() {
        let s = IfmrSettings::default();
        for seed in 0..6u64 {
            // Heavy-tailed, ReLU-like and signed data, fed in 4 batches.
            let u = lcg(seed, 40_000);
            let data: Vec<f32> = u
                .iter()
                .enumerate()
                .map(|(i, &v)| match seed % 3 {
                    0 => (-(1.0 - v).ln()) * 0.5,
                    1 => (v - 0.3).max(0.0) * 3.0,
                    _ => ((v - 0.5) * 4.0).powi(3) + if i % 997 == 0 { 5.0 } else { 0.0 },
                })
                .collect();
            for asymmetric in [true, false] {
                let mut o = Ifmr::new(s.clone());
                for chunk in data.chunks(10_000) {
                    let (mn, mx) = super::super::finite_extremes(chunk).unwrap();
                    o.observe(chunk, mn, mx);
                }
                let got = o.params(asymmetric, 8).unwrap();
                let (scale, offset) = exact(&data, &s, asymmetric);
                assert_eq!(
                    (got.scale, got.offset),
                    (scale, offset),
                    "seed {seed} asymmetric {asymmetric}"
                );
            }
        }
    }

    #[test]
    fn order_keys_sort_as_total_cmp() {
        let v = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-45,
            -0.0,
            0.0,
            1e-45,
            2.0,
            f32::INFINITY,
        ];
        for a in v {
            for b in v {
                assert_eq!(
                    order_key(a).cmp(&order_key(b)),
                    a.total_cmp(&b),
                    "{a} vs {b}"
                );
            }
        }
    }

    /// The tails hold exactly the `TAIL` largest and smallest values of all
    /// batches (checked against a sort of everything): through the sampled
    /// floor of a large first batch, its fallback when the sample misleads
    /// (large values exactly at the sampled positions), ties and later batches.
    #[test]
    fn tails_keep_the_exact_extremes_whatever_the_batches() {
        let spikes: Vec<f32> = (0..200_000)
            .map(|i| {
                if i % 12 == 0 {
                    100.0 + (i % 1000) as f32
                } else {
                    (i % 77) as f32
                }
            })
            .collect();
        let heavy: Vec<f32> = lcg(7, 175_000).iter().map(|v| -(1.0 - v).ln()).collect();
        let relu: Vec<f32> = lcg(8, 150_000).iter().map(|v| (v - 0.6).max(0.0)).collect();
        let cases: [(&str, Vec<Vec<f32>>); 4] = [
            ("one large batch", vec![lcg(6, 300_000)]),
            (
                "large, then smaller batches",
                vec![
                    heavy[..100_000].to_vec(),
                    heavy[100_000..170_000].to_vec(),
                    heavy[170_000..].to_vec(),
                ],
            ),
            ("sample on the spikes", vec![spikes]),
            ("ties at zero", vec![relu]),
        ];
        for (label, batches) in cases {
            let (mut high, mut low) = (Tail::default(), Tail::default());
            for b in &batches {
                let (mn, mx) = super::super::finite_extremes(b).unwrap();
                high.offer::<false>(b, mx);
                low.offer::<true>(b, -mn);
            }
            let mut all = batches.concat();
            all.sort_by(|a, b| a.total_cmp(b));
            let mut got: Vec<f32> = high.values.clone();
            got.sort_by(|a, b| a.total_cmp(b));
            assert_eq!(got, all[all.len() - TAIL..], "{label}: largest");
            let mut got: Vec<f32> = low.values.iter().map(|v| -v).collect();
            got.sort_by(|a, b| a.total_cmp(b));
            assert_eq!(got, all[..TAIL], "{label}: smallest");
        }
    }

    /// IFMR's symmetric choice by brute force, written out independently of
    /// `search`/`quant_error`: every candidate `r = 0.70, 0.71, ... 1.29`,
    /// scale `bound·r/q`, integers clamped to the int8 grid [-128, 127].
    fn brute_force_symmetric(data: &[f32]) -> f32 {
        let max = data.iter().fold(0f32, |m, &x| m.max(x));
        let min = data.iter().fold(0f32, |m, &x| m.min(x));
        let q = if min.abs() > max.abs() { 128.0 } else { 127.0 };
        let bound = max.max(-min);
        let mut best = (f64::MAX, 0f32);
        for k in 0..60 {
            let r = 0.7 + 0.01 * k as f32;
            let c = bound * r;
            let scale = c / q;
            let err: f64 = data
                .iter()
                .map(|&x| {
                    let clipped = x.clamp(-c, c) as f64;
                    let level = (clipped / scale as f64)
                        .round_ties_even()
                        .clamp(-128.0, 127.0);
                    (level * scale as f64 - x as f64).powi(2)
                })
                .sum();
            if err < best.0 {
                best = (err, scale);
            }
        }
        best.1
    }

    #[test]
    fn symmetric_search_matches_a_brute_force_with_the_grid_clamped() {
        // The integers 0..=10: the rounding error decides between the candidates.
        let ints: Vec<f32> = (0..=10).map(|i| i as f32).collect();
        // The negative side dominates (scale = c/128) and 10.47 sits near the
        // top: counting +128 as representable picks r = 1.00 instead of 1.16.
        let skewed = vec![-10.5, 8.83, 8.53, 7.97, 9.52, 7.82, 10.47, 6.74];
        for data in [ints, skewed] {
            let mut o = Ifmr::new(IfmrSettings::default());
            let (mn, mx) = super::super::finite_extremes(&data).unwrap();
            o.observe(&data, mn, mx);
            let got = o.params(false, 8).unwrap();
            let want = brute_force_symmetric(&data);
            assert!(
                (got.scale - want).abs() <= 1e-6 * want,
                "got {} want {want}",
                got.scale
            );
            assert_eq!(got.offset, 0);
        }
    }
}
