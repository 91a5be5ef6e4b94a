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
use std::cmp::Reverse;
use std::collections::BinaryHeap;

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
    largest: BinaryHeap<Reverse<OrdF32>>,
    smallest: BinaryHeap<OrdF32>,
    hist: Histogram,
}

/// An f32 with a total order, for the heaps.
#[derive(Clone, Copy, Debug)]
struct OrdF32(f32);
impl PartialEq for OrdF32 {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for OrdF32 {}
impl PartialOrd for OrdF32 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF32 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Ifmr {
    /// A calibrator with these settings.
    pub fn new(settings: IfmrSettings) -> Ifmr {
        Ifmr {
            settings,
            bounds: Bounds::ANY,
            count: 0,
            largest: BinaryHeap::new(),
            smallest: BinaryHeap::new(),
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
        if k <= self.largest.len() {
            let mut v: Vec<f32> = self.largest.iter().map(|r| r.0.0).collect();
            v.sort_by(|a, b| b.total_cmp(a));
            return v[k - 1];
        }
        self.hist.quantile(1.0 - k as f64 / self.count as f64)
    }

    fn kth_smallest(&self, k: usize) -> f32 {
        if k <= self.smallest.len() {
            let mut v: Vec<f32> = self.smallest.iter().map(|o| o.0).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            return v[k - 1];
        }
        self.hist.quantile(k as f64 / self.count as f64)
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
        // extremes say whether any can, a filter finds them, and a selection
        // keeps at most TAIL of them per side before the heaps see any (the
        // heaps end with the same values as if every value were pushed).
        let high = self
            .largest
            .peek()
            .filter(|_| self.largest.len() == TAIL)
            .map_or(f32::NEG_INFINITY, |r| r.0.0);
        let low = self
            .smallest
            .peek()
            .filter(|_| self.smallest.len() == TAIL)
            .map_or(f32::INFINITY, |o| o.0);
        if max > high {
            let mut above: Vec<f32> = data.iter().copied().filter(|&x| x > high).collect();
            if above.len() > TAIL {
                above.select_nth_unstable_by(TAIL, |a, b| b.total_cmp(a));
                above.truncate(TAIL);
            }
            for x in above {
                if self.largest.len() == TAIL {
                    if x <= self.largest.peek().expect("full").0.0 {
                        continue;
                    }
                    self.largest.pop();
                }
                self.largest.push(Reverse(OrdF32(x)));
            }
        }
        if min < low {
            let mut below: Vec<f32> = data.iter().copied().filter(|&x| x < low).collect();
            if below.len() > TAIL {
                below.select_nth_unstable_by(TAIL, |a, b| a.total_cmp(b));
                below.truncate(TAIL);
            }
            for x in below {
                if self.smallest.len() == TAIL {
                    if x >= self.smallest.peek().expect("full").0 {
                        continue;
                    }
                    self.smallest.pop();
                }
                self.smallest.push(OrdF32(x));
            }
        }
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

    /// AMCT's computation with every value in memory.
    fn exact(data: &[f32], s: &IfmrSettings, asymmetric: bool) -> ActParams {
        let mut sorted = data.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let n = sorted.len();
        let max0 = sorted[n - percentile_rank(n as u64, s.max_percentile)].max(0.0);
        let min0 = sorted[percentile_rank(n as u64, s.min_percentile) - 1].min(0.0);
        search(
            s,
            min0,
            max0,
            asymmetric,
            8,
            Bounds::ANY,
            |scale, lo, hi| {
                data.iter()
                    .map(|&x| quant_error(f64::from(x), scale, lo, hi))
                    .sum()
            },
        )
        .unwrap()
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
                let want = exact(&data, &s, asymmetric);
                assert_eq!(got, want, "seed {seed} asymmetric {asymmetric}");
            }
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
