//! Activation calibrators: each watches a layer input batch by batch with
//! bounded state, then turns what it saw into activation factors.

mod hfmg;
pub mod histogram;
mod ifmr;
mod kl;
mod minmax;
mod percentile;

pub use hfmg::Hfmg;
pub use ifmr::{Ifmr, IfmrSettings};
pub use kl::Kl;
pub use minmax::MinMax;
pub use percentile::Percentile;

use super::params::{ActParams, ParamsError};
use super::value_bounds::Bounds;

/// Which calibrator to use for a layer's activations, with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum ActAlgo {
    /// AMCT's default: search the clip maximum that minimises quantization MSE.
    Ifmr(IfmrSettings),
    /// AMCT's histogram search over clip windows.
    Hfmg {
        /// Histogram bins: 1024, 2048, 4096 or 8192.
        num_of_bins: usize,
    },
    /// The observed minimum and maximum.
    Minmax,
    /// Clip at a percentile of the observed values.
    Percentile {
        /// Percentage of values kept inside the range, e.g. 99.999.
        percentile: f64,
    },
    /// Symmetric threshold minimising the KL divergence (entropy calibration).
    Kl {
        /// Histogram bins of |x| (at least 256).
        num_of_bins: usize,
    },
}

impl Default for ActAlgo {
    fn default() -> Self {
        ActAlgo::Ifmr(IfmrSettings::default())
    }
}

impl ActAlgo {
    /// The algorithm's name as written in configs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            ActAlgo::Ifmr(_) => "ifmr",
            ActAlgo::Hfmg { .. } => "hfmg",
            ActAlgo::Minmax => "minmax",
            ActAlgo::Percentile { .. } => "percentile",
            ActAlgo::Kl { .. } => "kl",
        }
    }

    /// A fresh observer for this algorithm.
    pub fn observer(&self) -> Box<dyn Observer> {
        self.observer_within(Bounds::ANY)
    }

    /// A fresh observer for a value the model keeps within `bounds`: IFMR
    /// searches no clip beyond them (the others are fitted afterwards, see
    /// [`Bounds::fit`]).
    pub fn observer_within(&self, bounds: Bounds) -> Box<dyn Observer> {
        match self {
            ActAlgo::Ifmr(s) => Box::new(Ifmr::new(s.clone()).within(bounds)),
            ActAlgo::Hfmg { num_of_bins } => Box::new(Hfmg::new(*num_of_bins)),
            ActAlgo::Minmax => Box::new(MinMax::default()),
            ActAlgo::Percentile { percentile } => Box::new(Percentile::new(*percentile)),
            ActAlgo::Kl { num_of_bins } => Box::new(Kl::new(*num_of_bins)),
        }
    }
}

/// Watches the values of one tensor over many batches, keeping bounded state.
pub trait Observer: Send + Sync {
    /// Adds one batch of finite values whose extremes are `min` and `max`.
    fn observe(&mut self, data: &[f32], min: f32, max: f32);
    /// The activation factors for what was observed.
    fn params(&self, asymmetric: bool, bits: u32) -> Result<ActParams, ParamsError>;
}

/// The extremes of a batch, or the index of its first non-finite value
/// (NaN or infinity).
pub fn finite_extremes(data: &[f32]) -> Result<(f32, f32), usize> {
    // Eight running minima and maxima, written as comparisons so the loop
    // vectorises; `x · 0` is NaN exactly when `x` is NaN or infinite, so one
    // sum of those tells whether any value is not finite.
    const LANES: usize = 8;
    let mut min = [f32::INFINITY; LANES];
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut poison = [0.0f32; LANES];
    let chunks = data.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let x = c[i];
            min[i] = if x < min[i] { x } else { min[i] };
            max[i] = if x > max[i] { x } else { max[i] };
            poison[i] += x * 0.0;
        }
    }
    for (i, &x) in rest.iter().enumerate() {
        min[i] = if x < min[i] { x } else { min[i] };
        max[i] = if x > max[i] { x } else { max[i] };
        poison[i] += x * 0.0;
    }
    if poison.iter().any(|p| p.is_nan()) || data.is_empty() {
        return Err(data.iter().position(|x| !x.is_finite()).unwrap_or(0));
    }
    let lo = min.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let hi = max.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::finite_extremes;

    #[test]
    fn extremes_and_the_first_non_finite_value() {
        // 21 values (two lanes' worth and a remainder), extremes in the remainder and a lane.
        let mut data: Vec<f32> = (0..21).map(|i| (i as f32 * 0.37).sin()).collect();
        data[5] = -3.5;
        data[19] = 7.25;
        assert_eq!(finite_extremes(&data), Ok((-3.5, 7.25)));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 9, 20] {
                let mut d = data.clone();
                d[at] = bad;
                assert_eq!(finite_extremes(&d), Err(at), "{bad} at {at}");
            }
        }
        assert_eq!(finite_extremes(&[]), Err(0));
        assert_eq!(finite_extremes(&[-0.0, 2.0]), Ok((-0.0, 2.0)));
    }
}
