//! The percentile calibrator: clips the rarest values on each side, read from
//! a fine histogram so memory does not grow with the data.

use super::Observer;
use super::histogram::Histogram;
use crate::quant::params::{ActParams, ParamsError, act_params};

/// Bins of the histogram the percentiles are read from.
const BINS: usize = 1 << 14;

/// Clips at `percentile` % of the values (upper) and `100 - percentile` % (lower).
#[derive(Clone, Debug)]
pub struct Percentile {
    percentile: f64,
    hist: Histogram,
}

impl Percentile {
    /// A calibrator keeping `percentile` percent of the values inside the range.
    pub fn new(percentile: f64) -> Percentile {
        Percentile {
            percentile,
            hist: Histogram::aligned(BINS),
        }
    }
}

impl Observer for Percentile {
    fn observe(&mut self, data: &[f32], min: f32, max: f32) {
        self.hist.add(data, min, max);
    }

    fn params(&self, asymmetric: bool, bits: u32) -> Result<ActParams, ParamsError> {
        let q = self.percentile / 100.0;
        let max = self.hist.quantile(q).min(self.hist.hi());
        let min = if self.hist.lo() < 0.0 {
            self.hist.quantile(1.0 - q).max(self.hist.lo())
        } else {
            self.hist.lo()
        };
        act_params(min, max, asymmetric, bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignores_a_rare_outlier_and_reads_the_percentile_within_a_bin() {
        // A ramp with a far outlier: the 99th and 99.9th percentiles, found by
        // sorting here, must come back within one histogram bin (8/16384) plus
        // the quantization grid's step (the range is rounded to 255 levels).
        let mut data: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0).collect();
        data.push(8.0);
        let mut sorted = data.clone();
        sorted.sort_by(f32::total_cmp);
        for percentile in [99.0, 99.9] {
            let mut o = Percentile::new(percentile);
            o.observe(&data, 0.0, 8.0);
            let (lo, hi) = o.params(true, 8).unwrap().range(8);
            let rank = ((percentile / 100.0) * (sorted.len() - 1) as f64).round() as usize;
            let want = sorted[rank];
            let tolerance = 8.0 / BINS as f32 + want / 255.0;
            assert!(
                (hi - want).abs() <= tolerance && lo.abs() <= tolerance,
                "{percentile}: [{lo}, {hi}] vs {want} (± {tolerance})"
            );
        }
    }
}
