//! The min-max calibrator: the running extremes of everything observed.

use super::Observer;
use crate::quant::params::{ActParams, ParamsError, act_params};

/// Running minimum and maximum.
#[derive(Clone, Debug)]
pub struct MinMax {
    min: f32,
    max: f32,
}

impl Default for MinMax {
    fn default() -> Self {
        MinMax {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
}

impl Observer for MinMax {
    fn observe(&mut self, _data: &[f32], min: f32, max: f32) {
        self.min = self.min.min(min);
        self.max = self.max.max(max);
    }

    fn params(&self, asymmetric: bool, bits: u32) -> Result<ActParams, ParamsError> {
        let (min, max) = if self.min <= self.max {
            (self.min, self.max)
        } else {
            (0.0, 0.0)
        };
        act_params(min, max, asymmetric, bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed() {
        let mut o = MinMax::default();
        o.observe(&[-0.5, 1.0], -0.5, 1.0);
        o.observe(&[2.0], 2.0, 2.0);
        // asymmetric [-0.5, 2]: scale 2.5/255, offset -128 - round(-0.5*255/2.5) = -128 + 51 = -77
        let p = o.params(true, 8).unwrap();
        assert_eq!(p.scale, 2.5 / 255.0);
        assert_eq!(p.offset, -77);
        // symmetric: 2/127
        assert_eq!(o.params(false, 8).unwrap().scale, 2.0 / 127.0);
    }
}
