//! Quantization factors and the rules that turn a clipping range into them
//! (AMCT conventions: `q = clamp(round(x / scale) + offset, -2^(b-1), 2^(b-1)-1)`).

use serde::{Deserialize, Serialize};

/// float32 machine epsilon: scales below it are replaced by 1.0.
pub const FLT_EPSILON: f32 = 1.192_092_9e-7;

/// Activation factors of one layer input: one scale and one integer offset.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActParams {
    /// `scale_d`: the float step between two integer levels.
    pub scale: f32,
    /// `offset_d`: the integer that float 0 maps to (0 when symmetric).
    pub offset: i32,
}

/// Errors computing factors from a range.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamsError {
    /// The range or the resulting scale is not finite.
    #[error(
        "quantization range [{min}, {max}] gives a non-finite scale; the data holds huge values"
    )]
    NotFinite {
        /// Lower end.
        min: f32,
        /// Upper end.
        max: f32,
    },
}

/// Lowest and highest integer of a signed `bits`-bit grid.
pub fn int_range(bits: u32) -> (i32, i32) {
    (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
}

fn check(min: f32, max: f32, scale: f32) -> Result<(), ParamsError> {
    if !scale.is_finite() || !(1.0 / scale).is_finite() {
        return Err(ParamsError::NotFinite { min, max });
    }
    Ok(())
}

/// Symmetric scale for the range [min, max]: `max(|min|, |max|) / 127`, or
/// `/ 128` when the negative side has the larger magnitude (8 bits).
pub fn symmetric_scale(min: f32, max: f32, bits: u32) -> Result<f32, ParamsError> {
    let (lo, hi) = int_range(bits);
    let bound = min.abs().max(max.abs());
    let levels = if min.abs() > max.abs() { -lo } else { hi };
    let mut scale = bound / levels as f32;
    if scale < FLT_EPSILON {
        scale = 1.0;
    }
    check(min, max, scale)?;
    Ok(scale)
}

/// Factors for clipping range [min, max]: symmetric (offset 0) or asymmetric
/// (range widened to contain 0, `scale = (max-min)/(2^b-1)`,
/// `offset = -2^(b-1) - round(min/scale)`).
pub fn act_params(
    min: f32,
    max: f32,
    asymmetric: bool,
    bits: u32,
) -> Result<ActParams, ParamsError> {
    if !asymmetric {
        return Ok(ActParams {
            scale: symmetric_scale(min, max, bits)?,
            offset: 0,
        });
    }
    let (lo, _) = int_range(bits);
    let (min, max) = (min.min(0.0), max.max(0.0));
    let levels = ((1u64 << bits) - 1) as f32;
    let scale = (max - min) / levels;
    if scale < FLT_EPSILON {
        return Ok(ActParams {
            scale: 1.0,
            offset: lo,
        });
    }
    check(min, max, scale)?;
    let offset = lo - (min / scale).round_ties_even() as i32;
    Ok(ActParams { scale, offset })
}

impl ActParams {
    /// The float range this grid represents.
    pub fn range(&self, bits: u32) -> (f32, f32) {
        let (lo, hi) = int_range(bits);
        (
            (lo - self.offset) as f32 * self.scale,
            (hi - self.offset) as f32 * self.scale,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_uses_127_or_128() {
        assert_eq!(symmetric_scale(-1.0, 2.54, 8).unwrap(), 2.54 / 127.0);
        assert_eq!(symmetric_scale(-2.56, 1.0, 8).unwrap(), 2.56 / 128.0);
        assert_eq!(symmetric_scale(0.0, 0.0, 8).unwrap(), 1.0);
    }

    #[test]
    fn asymmetric_matches_hand_computation() {
        // [0, 1] -> scale 1/255, offset -128 (the record example of the spec).
        let p = act_params(0.0, 1.0, true, 8).unwrap();
        assert_eq!(p.scale, 1.0 / 255.0);
        assert_eq!(p.offset, -128);
        // [-1, 3]: scale 4/255, offset -128 - round(-1 / (4/255)) = -128 + 64 = -64.
        let p = act_params(-1.0, 3.0, true, 8).unwrap();
        assert_eq!(p.scale, 4.0 / 255.0);
        assert_eq!(p.offset, -64);
        // Positive-only ranges are widened to contain 0.
        assert_eq!(
            act_params(2.0, 3.0, true, 8).unwrap(),
            act_params(0.0, 3.0, true, 8).unwrap()
        );
        // Degenerate range.
        assert_eq!(
            act_params(0.0, 0.0, true, 8).unwrap(),
            ActParams {
                scale: 1.0,
                offset: -128
            }
        );
    }

    #[test]
    fn the_grid_covers_the_range() {
        // offset -64, scale 4/255: [-64 * 4/255, 191 * 4/255]
        let p = act_params(-1.0, 3.0, true, 8).unwrap();
        let (lo, hi) = p.range(8);
        assert!(
            (lo + 64.0 * 4.0 / 255.0).abs() < 1e-6 && (hi - 191.0 * 4.0 / 255.0).abs() < 1e-6,
            "{lo} {hi}"
        );
    }

    #[test]
    fn infinite_ranges_are_errors() {
        assert!(act_params(f32::MIN, f32::MAX, true, 8).is_err());
    }
}
