//! Resize and Upsample in every mode ONNX defines (nearest with its four
//! roundings, linear, cubic with any `cubic_coeff_a` and `exclude_outside`)
//! and every coordinate transformation (half_pixel, half_pixel_symmetric,
//! pytorch_half_pixel, align_corners, asymmetric, tf_crop_and_resize), with
//! `axes` and `keep_aspect_ratio_policy`: parsed once into [`Resize`], run on
//! float tensors one axis at a time (the N-d interpolation is the product
//! of the 1-D ones). Coordinates follow onnxruntime's arithmetic (f32), so
//! the conformance fixtures match to rounding. Antialiasing is refused.

use crate::onnx::NodeProto;
use crate::onnx::attr::{float_attr, floats_attr, int_attr, ints_attr, string_attr};
use crate::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

/// How a nearest resize rounds a source coordinate to an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Round, halves down.
    RoundPreferFloor,
    /// Round, halves up.
    RoundPreferCeil,
    /// Down.
    Floor,
    /// Up.
    Ceil,
    /// Opset 10 and Upsample: truncate when enlarging, up when shrinking.
    Simple,
}

/// The interpolation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// The nearest input value.
    Nearest(Rounding),
    /// Linear between the two neighbours.
    Linear,
    /// Cubic convolution over four neighbours.
    Cubic {
        /// `cubic_coeff_a` (−0.75 by default, PyTorch's bicubic; TF uses −0.5).
        a: f32,
        /// `exclude_outside`: neighbours outside the input get no weight.
        exclude_outside: bool,
    },
}

/// How an output index maps to a source coordinate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coordinates {
    /// `(x + 0.5) / scale − 0.5` (the default).
    HalfPixel,
    /// Half-pixel, centred when the output size was rounded (opset 19).
    HalfPixelSymmetric,
    /// Half-pixel, 0 for an output of length 1.
    PytorchHalfPixel,
    /// Corners on corners: `x · (in − 1) / (out − 1)`.
    AlignCorners,
    /// `x / scale`.
    Asymmetric,
    /// A region of interest (`roi`) resized; outside it, the extrapolation value.
    TfCropAndResize,
}

/// What decides the output's size.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A scale per axis (output = ⌊input · scale⌋).
    Scales(Vec<f32>),
    /// A size per axis.
    Sizes(Vec<i64>),
}

/// How given sizes keep the aspect ratio (opset 18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AspectPolicy {
    /// Each axis takes its size.
    Stretch,
    /// One scale for all, the largest that fits within the sizes.
    NotLarger,
    /// One scale for all, the smallest that covers the sizes.
    NotSmaller,
}

/// A Resize with its attributes and constant operands resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Resize {
    /// The interpolation.
    pub mode: Mode,
    /// The coordinate transformation.
    pub coordinates: Coordinates,
    /// Value outside the region of interest (tf_crop_and_resize).
    pub extrapolation: f32,
    /// The axes `target` and `roi` speak of (all, in order, when `None`).
    pub axes: Option<Vec<i64>>,
    /// Scales or sizes for those axes.
    pub target: Target,
    /// Region of interest: starts then ends, for those axes (tf_crop_and_resize).
    pub roi: Option<Vec<f32>>,
    /// How sizes keep the aspect ratio.
    pub policy: AspectPolicy,
}

/// Whether `node` resizes by cubic interpolation (read without its operands).
pub fn is_cubic(node: &NodeProto) -> bool {
    string_attr(node, "mode") == Some(b"cubic")
}

/// One output index's source taps along an axis: input indices and weights,
/// or `None` for the extrapolation value.
type Taps = Option<Vec<(usize, f32)>>;

impl Resize {
    /// The Resize (or Upsample) `node` computes under `opset`, with
    /// `operand(k)` giving its constant input `k` (`None` when absent or not
    /// constant). An error names what is unsupported or malformed.
    pub fn parse<'a>(
        node: &NodeProto,
        opset: i64,
        operand: &dyn Fn(usize) -> Option<&'a Tensor>,
    ) -> Result<Resize, String> {
        let present = |k: usize| node.input.get(k).is_some_and(|v| !v.is_empty());
        let text = |name: &str, default: &str| {
            string_attr(node, name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| default.to_string())
        };
        let floats = |k: usize, what: &str| -> Result<Vec<f32>, String> {
            match operand(k) {
                Some(Tensor::F32(a)) => Ok(a.iter().copied().collect()),
                Some(other) => Err(format!("its {what} are {}, not float32", other.dtype())),
                None => Err(format!("its {what} are not a constant")),
            }
        };
        let legacy = node.op_type() == "Upsample" || opset < 11;
        if int_attr(node, "antialias").unwrap_or(0) != 0 {
            return Err("antialiased Resize is not supported".into());
        }
        let mode_name = text("mode", "nearest");
        let mode = match mode_name.as_str() {
            "nearest" => Mode::Nearest(if legacy {
                Rounding::Simple
            } else {
                match text("nearest_mode", "round_prefer_floor").as_str() {
                    "round_prefer_floor" => Rounding::RoundPreferFloor,
                    "round_prefer_ceil" => Rounding::RoundPreferCeil,
                    "floor" => Rounding::Floor,
                    "ceil" => Rounding::Ceil,
                    other => return Err(format!("nearest_mode '{other}' is not an ONNX mode")),
                }
            }),
            "linear" | "bilinear" => Mode::Linear,
            "cubic" if !legacy => Mode::Cubic {
                a: float_attr(node, "cubic_coeff_a").unwrap_or(-0.75),
                exclude_outside: int_attr(node, "exclude_outside").unwrap_or(0) != 0,
            },
            other => return Err(format!("mode '{other}' is not an ONNX Resize mode")),
        };
        let coordinates = if legacy {
            Coordinates::Asymmetric
        } else {
            match text("coordinate_transformation_mode", "half_pixel").as_str() {
                "half_pixel" => Coordinates::HalfPixel,
                "half_pixel_symmetric" => Coordinates::HalfPixelSymmetric,
                "pytorch_half_pixel" => Coordinates::PytorchHalfPixel,
                "align_corners" => Coordinates::AlignCorners,
                "asymmetric" => Coordinates::Asymmetric,
                "tf_crop_and_resize" => Coordinates::TfCropAndResize,
                "tf_half_pixel_for_nn" => {
                    return Err("tf_half_pixel_for_nn (opset 11 only) is not supported".into());
                }
                other => {
                    return Err(format!(
                        "coordinate_transformation_mode '{other}' is not an ONNX mode"
                    ));
                }
            }
        };
        let policy = match text("keep_aspect_ratio_policy", "stretch").as_str() {
            "stretch" => AspectPolicy::Stretch,
            "not_larger" => AspectPolicy::NotLarger,
            "not_smaller" => AspectPolicy::NotSmaller,
            other => {
                return Err(format!(
                    "keep_aspect_ratio_policy '{other}' is not an ONNX policy"
                ));
            }
        };
        let target = if node.op_type() == "Upsample" && opset < 9 {
            Target::Scales(floats_attr(node, "scales").ok_or("Upsample has no scales")?)
        } else if legacy {
            Target::Scales(floats(1, "scales")?)
        } else if present(3) {
            match operand(3) {
                Some(t) => Target::Sizes(super::ints_of(t)?),
                None => return Err("its sizes are not a constant".into()),
            }
        } else if present(2) {
            Target::Scales(floats(2, "scales")?)
        } else {
            return Err("neither scales nor sizes are given".into());
        };
        if let Target::Scales(s) = &target
            && s.iter().any(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err(format!("scales {s:?} must be positive and finite"));
        }
        let roi = if !legacy && coordinates == Coordinates::TfCropAndResize && present(1) {
            Some(floats(1, "roi")?)
        } else {
            None
        };
        Ok(Resize {
            mode,
            coordinates,
            extrapolation: float_attr(node, "extrapolation_value").unwrap_or(0.0),
            axes: ints_attr(node, "axes"),
            target,
            roi,
            policy,
        })
    }

    /// Per axis of an input of `shape`: (output length, scale, roi start, roi end).
    fn plan(&self, shape: &[usize]) -> Result<Vec<(usize, f32, f32, f32)>, String> {
        let rank = shape.len();
        let axes: Vec<usize> = match &self.axes {
            None => (0..rank).collect(),
            Some(a) => a
                .iter()
                .map(|&v| super::layout::axis_index(v, rank))
                .collect::<Result<_, _>>()?,
        };
        let count = match &self.target {
            Target::Scales(s) => s.len(),
            Target::Sizes(s) => s.len(),
        };
        if count != axes.len() {
            return Err(format!(
                "{count} scales or sizes for {} axes of a rank-{rank} input",
                axes.len()
            ));
        }
        let mut plan: Vec<(usize, f32, f32, f32)> =
            shape.iter().map(|&n| (n, 1.0, 0.0, 1.0)).collect();
        match &self.target {
            Target::Scales(s) => {
                for (&axis, &scale) in axes.iter().zip(s) {
                    let out = (scale * shape[axis] as f32) as usize;
                    plan[axis] = (out, scale, 0.0, 1.0);
                }
            }
            Target::Sizes(sizes) => {
                if sizes.iter().any(|&v| v < 0) {
                    return Err(format!("sizes {sizes:?} must not be negative"));
                }
                let ratio = |k: usize| sizes[k] as f32 / shape[axes[k]] as f32;
                let common = match self.policy {
                    AspectPolicy::Stretch => None,
                    AspectPolicy::NotLarger => {
                        Some((0..axes.len()).map(ratio).fold(f32::INFINITY, f32::min))
                    }
                    AspectPolicy::NotSmaller => {
                        Some((0..axes.len()).map(ratio).fold(0.0, f32::max))
                    }
                };
                for (k, &axis) in axes.iter().enumerate() {
                    plan[axis] = match common {
                        None => (sizes[k] as usize, ratio(k), 0.0, 1.0),
                        Some(s) => ((s * shape[axis] as f32).round() as usize, s, 0.0, 1.0),
                    };
                }
            }
        }
        if let Some(roi) = &self.roi {
            if roi.len() != 2 * axes.len() {
                return Err(format!(
                    "roi of {} values for {} axes",
                    roi.len(),
                    axes.len()
                ));
            }
            for (k, &axis) in axes.iter().enumerate() {
                plan[axis].2 = roi[k];
                plan[axis].3 = roi[k + axes.len()];
            }
        }
        Ok(plan)
    }

    /// The output shape for an input of `shape`.
    pub fn output_shape(&self, shape: &[usize]) -> Result<Vec<usize>, String> {
        Ok(self.plan(shape)?.iter().map(|p| p.0).collect())
    }

    /// The source coordinate of output index `x` along an axis of `len_in`
    /// values resized to `len_out` by `scale` (onnxruntime's f32 arithmetic).
    fn source(&self, x: usize, len_in: usize, len_out: usize, scale: f32, roi: (f32, f32)) -> f32 {
        let x = x as f32;
        match self.coordinates {
            Coordinates::HalfPixel => (x + 0.5) / scale - 0.5,
            Coordinates::HalfPixelSymmetric => {
                let adjustment = len_out as f32 / (scale * len_in as f32);
                let center = len_in as f32 / 2.0;
                let offset = center * (1.0 - adjustment);
                offset + (x + 0.5) / scale - 0.5
            }
            Coordinates::PytorchHalfPixel => {
                if len_out > 1 {
                    (x + 0.5) / scale - 0.5
                } else {
                    0.0
                }
            }
            Coordinates::AlignCorners => {
                if len_out == 1 {
                    0.0
                } else {
                    x * (len_in as f32 - 1.0) / (len_out as f32 - 1.0)
                }
            }
            Coordinates::Asymmetric => x / scale,
            Coordinates::TfCropAndResize => {
                let span = len_in as f32 - 1.0;
                if len_out > 1 {
                    roi.0 * span + x * (roi.1 - roi.0) * span / (len_out as f32 - 1.0)
                } else {
                    0.5 * (roi.0 + roi.1) * span
                }
            }
        }
    }

    /// The taps of every output index along one axis.
    fn taps(&self, len_in: usize, len_out: usize, scale: f32, roi: (f32, f32)) -> Vec<Taps> {
        let last = len_in as i64 - 1;
        let clamp = |i: i64| i.clamp(0, last) as usize;
        (0..len_out)
            .map(|x| {
                let s = self.source(x, len_in, len_out, scale, roi);
                if self.coordinates == Coordinates::TfCropAndResize && (s < 0.0 || s > last as f32)
                {
                    return None;
                }
                Some(match self.mode {
                    Mode::Nearest(r) => {
                        let i = match r {
                            Rounding::RoundPreferFloor if s == s.trunc() + 0.5 => s.floor(),
                            Rounding::RoundPreferCeil if s == s.trunc() + 0.5 => s.ceil(),
                            Rounding::RoundPreferFloor | Rounding::RoundPreferCeil => s.round(),
                            Rounding::Floor => s.floor(),
                            Rounding::Ceil => s.ceil(),
                            Rounding::Simple if scale < 1.0 => s.ceil(),
                            Rounding::Simple => s.trunc(),
                        };
                        vec![(clamp(i as i64), 1.0)]
                    }
                    Mode::Linear => {
                        let s = s.clamp(0.0, last as f32);
                        let i0 = s as i64;
                        let t = s - i0 as f32;
                        vec![(clamp(i0), 1.0 - t), (clamp(i0 + 1), t)]
                    }
                    Mode::Cubic { a, exclude_outside } => {
                        let i0 = s.floor();
                        let t = s - i0;
                        let w = cubic_weights(t, a);
                        let mut taps: Vec<(i64, f32)> =
                            (0..4).map(|k| (i0 as i64 - 1 + k, w[k as usize])).collect();
                        if exclude_outside {
                            taps.iter_mut()
                                .filter(|(i, _)| *i < 0 || *i > last)
                                .for_each(|(_, w)| *w = 0.0);
                            let sum: f32 = taps.iter().map(|(_, w)| w).sum();
                            if sum != 0.0 {
                                taps.iter_mut().for_each(|(_, w)| *w /= sum);
                            }
                        }
                        taps.into_iter().map(|(i, w)| (clamp(i), w)).collect()
                    }
                })
            })
            .collect()
    }

    /// Resizes `x`.
    pub fn run(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>, String> {
        let plan = self.plan(x.shape())?;
        let total = plan
            .iter()
            .try_fold(1usize, |acc, p| acc.checked_mul(p.0))
            .filter(|&n| n <= super::layout::MAX_VALUES)
            .ok_or("the output would be too large")?;
        let mut shape = x.shape().to_vec();
        let mut data: Vec<f32> = x.iter().copied().collect();
        if total == 0 || data.is_empty() {
            let out: Vec<usize> = plan.iter().map(|p| p.0).collect();
            let fill = if data.is_empty() {
                0.0
            } else {
                self.extrapolation
            };
            return Ok(ArrayD::from_elem(IxDyn(&out), fill));
        }
        for (axis, &(len_out, scale, r0, r1)) in plan.iter().enumerate() {
            let len_in = shape[axis];
            let identity = len_out == len_in
                && self.coordinates != Coordinates::TfCropAndResize
                && (0..len_out).all(|x| {
                    let s = self.source(x, len_in, len_out, scale, (r0, r1));
                    s == x as f32
                });
            if identity {
                continue;
            }
            let taps = self.taps(len_in, len_out, scale, (r0, r1));
            data = resize_axis(&data, &shape, axis, &taps, self.extrapolation);
            shape[axis] = len_out;
        }
        ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| e.to_string())
    }
}

/// The cubic convolution weights of the four neighbours at offsets −1, 0,
/// 1, 2 for a source coordinate `t` past the floor (Keys' kernel with `a`).
fn cubic_weights(t: f32, a: f32) -> [f32; 4] {
    let near = |d: f32| ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0;
    let far = |d: f32| ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// One axis resampled by `taps`: the input viewed as `[outer, len, inner]`.
fn resize_axis(data: &[f32], shape: &[usize], axis: usize, taps: &[Taps], fill: f32) -> Vec<f32> {
    let len_in = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let len_out = taps.len();
    let mut out = vec![0f32; outer * len_out * inner];
    out.par_chunks_mut(inner.max(1))
        .enumerate()
        .for_each(|(row, dst)| {
            let (o, x) = (row / len_out, row % len_out);
            match &taps[x] {
                None => dst.fill(fill),
                Some(t) => {
                    let src =
                        |i: usize| &data[(o * len_in + i) * inner..(o * len_in + i + 1) * inner];
                    let (i0, w0) = t[0];
                    for (d, &v) in dst.iter_mut().zip(src(i0)) {
                        *d = w0 * v;
                    }
                    for &(i, w) in &t[1..] {
                        for (d, &v) in dst.iter_mut().zip(src(i)) {
                            *d += w * v;
                        }
                    }
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resize(mode: Mode, coordinates: Coordinates, target: Target) -> Resize {
        Resize {
            mode,
            coordinates,
            extrapolation: 0.0,
            axes: None,
            target,
            roi: None,
            policy: AspectPolicy::Stretch,
        }
    }

    #[test]
    fn cubic_weights_sum_to_one_and_interpolate_on_the_grid() {
        for &t in &[0.0f32, 0.25, 0.5, 0.9] {
            let w = cubic_weights(t, -0.75);
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{w:?}");
        }
        assert_eq!(cubic_weights(0.0, -0.5), [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn linear_align_corners_by_hand() {
        // 1-D [0, 10] to 3 values with corners aligned: 0, 5, 10.
        let x = ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![0.0, 10.0]).unwrap();
        let r = resize(
            Mode::Linear,
            Coordinates::AlignCorners,
            Target::Sizes(vec![1, 3]),
        );
        let y = r.run(&x).unwrap();
        assert_eq!(y.as_slice().unwrap(), &[0.0, 5.0, 10.0]);
    }

    #[test]
    fn cubic_half_pixel_by_hand() {
        // [0, 1, 2, 3] doubled, half-pixel: output 1 sits at 0.25, so its taps
        // are indices -1 (clamped to 0), 0, 1, 2 with Keys' weights at t = 0.25.
        let x = ArrayD::from_shape_vec(IxDyn(&[4]), vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        let r = resize(
            Mode::Cubic {
                a: -0.75,
                exclude_outside: false,
            },
            Coordinates::HalfPixel,
            Target::Scales(vec![2.0]),
        );
        let y = r.run(&x).unwrap();
        let w = cubic_weights(0.25, -0.75);
        let want = w[0] * 0.0 + w[1] * 0.0 + w[2] * 1.0 + w[3] * 2.0;
        assert_eq!(y.len(), 8);
        assert!((y[1] - want).abs() < 1e-6, "{} vs {want}", y[1]);
    }

    #[test]
    fn crop_and_resize_fills_outside_the_region() {
        let x = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0, 2.0, 3.0]).unwrap();
        let mut r = resize(
            Mode::Linear,
            Coordinates::TfCropAndResize,
            Target::Sizes(vec![3]),
        );
        r.roi = Some(vec![0.5, 1.5]);
        r.extrapolation = -7.0;
        // Sources 1.0, 2.0, 3.0 (past the last index 2).
        let y = r.run(&x).unwrap();
        assert_eq!(y.as_slice().unwrap(), &[2.0, 3.0, -7.0]);
    }
}
