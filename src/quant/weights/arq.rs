//! ARQ: plain symmetric min/max weight scales with the 127/128 rule, one per
//! tensor or one per output channel; then rounding to int8 and bias to int32.

use crate::quant::params::{ParamsError, int_range, symmetric_scale};
use ndarray::ArrayD;

/// Which output channel each element of a weight tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelLayout {
    /// One scale for the whole tensor.
    PerTensor,
    /// Output channels on axis 0 (Conv: `[Cout, Cin/g, k...]`).
    Axis0 {
        /// Number of output channels.
        channels: usize,
    },
    /// ConvTranspose: `[Cin, Cout/g, k...]`; output channel `g * Cout/g + j`
    /// for input channel `i` of group `g = i / (Cin/g)` and axis-1 index `j`.
    Transposed {
        /// Input channels (axis 0).
        cin: usize,
        /// Output channels per group (axis 1).
        cout_per_group: usize,
        /// Number of groups.
        group: usize,
    },
    /// Output channels on the last axis (Gemm / MatMul `[.., K, N]`: one scale
    /// per column `N`, which the int32 result carries on its last axis).
    LastAxis {
        /// Number of output channels (the weight's last dimension).
        channels: usize,
    },
}

impl ChannelLayout {
    /// Number of scales this layout produces.
    pub fn channels(&self) -> usize {
        match *self {
            ChannelLayout::PerTensor => 1,
            ChannelLayout::Axis0 { channels } | ChannelLayout::LastAxis { channels } => channels,
            ChannelLayout::Transposed {
                cout_per_group,
                group,
                ..
            } => cout_per_group * group,
        }
    }

    /// Whether the output channels sit on the last axis of the layer's
    /// output (Gemm / MatMul) rather than on axis 1 (Conv / ConvTranspose).
    pub fn channels_last(&self) -> bool {
        matches!(self, ChannelLayout::LastAxis { .. })
    }

    /// The channel of the element at flat (row-major) index `flat` of a tensor of `len` elements.
    pub(crate) fn channel_of(&self, flat: usize, len: usize) -> usize {
        match *self {
            ChannelLayout::PerTensor => 0,
            ChannelLayout::Axis0 { channels } => flat / (len / channels),
            ChannelLayout::LastAxis { channels } => flat % channels,
            ChannelLayout::Transposed {
                cin,
                cout_per_group,
                group,
            } => {
                let inner = len / (cin * cout_per_group);
                let i = flat / (cout_per_group * inner);
                let j = (flat / inner) % cout_per_group;
                (i / (cin / group)) * cout_per_group + j
            }
        }
    }
}

/// Errors of weight quantization.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The weight holds NaN or infinity.
    #[error("layer '{layer}': weight holds non-finite values; the model is broken")]
    NotFinite {
        /// The layer.
        layer: String,
    },
    /// A scale could not be formed.
    #[error("layer '{layer}': {error}")]
    Params {
        /// The layer.
        layer: String,
        /// Why.
        error: ParamsError,
    },
    /// A quantized bias does not fit in int32.
    #[error(
        "layer '{layer}': bias {bias} / (scale_w {scale_w} * scale_d {scale_d}) overflows int32; skip this layer (quant_enable false) or use a larger activation range"
    )]
    BiasOverflow {
        /// The layer.
        layer: String,
        /// The bias value.
        bias: f32,
        /// The weight scale of its channel.
        scale_w: f32,
        /// The activation scale.
        scale_d: f32,
    },
}

/// ARQ scales of `weight`: per channel as `layout` says (symmetric, offset 0).
pub fn arq_scales(
    layer: &str,
    weight: &ArrayD<f32>,
    layout: ChannelLayout,
    bits: u32,
) -> Result<Vec<f32>, WeightError> {
    let n = layout.channels();
    let mut mins = vec![f32::INFINITY; n];
    let mut maxs = vec![f32::NEG_INFINITY; n];
    let len = weight.len();
    for (flat, &w) in weight.iter().enumerate() {
        if !w.is_finite() {
            return Err(WeightError::NotFinite {
                layer: layer.into(),
            });
        }
        let c = layout.channel_of(flat, len);
        mins[c] = mins[c].min(w);
        maxs[c] = maxs[c].max(w);
    }
    mins.iter()
        .zip(&maxs)
        .map(|(&lo, &hi)| {
            let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 0.0) };
            symmetric_scale(lo, hi, bits).map_err(|error| WeightError::Params {
                layer: layer.into(),
                error,
            })
        })
        .collect()
}

/// Rounds `w / scale_w` half to even and saturates to the signed grid.
pub fn quantize_weight(
    weight: &ArrayD<f32>,
    scales: &[f32],
    layout: ChannelLayout,
    bits: u32,
) -> ArrayD<i8> {
    let (lo, hi) = int_range(bits);
    let len = weight.len();
    let data: Vec<i8> = weight
        .iter()
        .enumerate()
        .map(|(flat, &w)| {
            let s = scales[layout.channel_of(flat, len)];
            (w / s).round_ties_even().clamp(lo as f32, hi as f32) as i8
        })
        .collect();
    ArrayD::from_shape_vec(weight.raw_dim(), data).expect("same number of elements")
}

/// The float weight an int8 weight stands for: `q * scale_w` of its channel.
pub fn dequantize_weight(q: &ArrayD<i8>, scales: &[f32], layout: ChannelLayout) -> ArrayD<f32> {
    let len = q.len();
    let data = q
        .iter()
        .enumerate()
        .map(|(flat, &v)| f32::from(v) * scales[layout.channel_of(flat, len)])
        .collect();
    ArrayD::from_shape_vec(q.raw_dim(), data).expect("same number of elements")
}

/// `round_half_even(bias / (scale_w * scale_d))` as int32; overflow is an error naming the layer.
pub fn quantize_bias(
    layer: &str,
    bias: &[f32],
    scales_w: &[f32],
    scale_d: f32,
) -> Result<Vec<i32>, WeightError> {
    bias.iter()
        .enumerate()
        .map(|(c, &b)| {
            let sw = if scales_w.len() == 1 {
                scales_w[0]
            } else {
                scales_w[c]
            };
            let deq = sw * scale_d;
            let q = (b / deq).round_ties_even();
            if !q.is_finite() || q < i32::MIN as f32 || q >= i32::MAX as f32 {
                return Err(WeightError::BiasOverflow {
                    layer: layer.into(),
                    bias: b,
                    scale_w: sw,
                    scale_d,
                });
            }
            Ok(q as i32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn per_channel_and_per_tensor_scales_by_hand() {
        // Two output channels of a Conv: [[0.5, -1.27], [2.56, -2.56... ]]
        let w = array![[0.5f32, -1.27], [1.0, -2.56]].into_dyn();
        let s = arq_scales("c", &w, ChannelLayout::Axis0 { channels: 2 }, 8).unwrap();
        assert_eq!(s, vec![1.27 / 128.0, 2.56 / 128.0]);
        let s = arq_scales("c", &w, ChannelLayout::PerTensor, 8).unwrap();
        assert_eq!(s, vec![2.56 / 128.0]);
        let w = array![[0.3f32, 1.27]].into_dyn();
        assert_eq!(
            arq_scales("c", &w, ChannelLayout::PerTensor, 8).unwrap(),
            vec![1.27 / 127.0]
        );
        // A MatMul weight [K=2, N=2]: one scale per column.
        let w = array![[0.5f32, -1.27], [1.0, -2.56]].into_dyn();
        let s = arq_scales("m", &w, ChannelLayout::LastAxis { channels: 2 }, 8).unwrap();
        assert_eq!(s, vec![1.0 / 127.0, 2.56 / 128.0]);
        // Batched [B=2, K=1, N=2]: columns gather across the batch too.
        let w = array![[[0.5f32, -0.2]], [[-0.75, 0.1]]].into_dyn();
        let s = arq_scales("m", &w, ChannelLayout::LastAxis { channels: 2 }, 8).unwrap();
        assert_eq!(s, vec![0.75 / 128.0, 0.2 / 128.0]);
    }

    #[test]
    fn weights_round_half_to_even_and_saturate() {
        let w = array![1.0f32, 2.5, 3.5, -2.5, 1000.0, -1000.0].into_dyn();
        let q = quantize_weight(&w, &[1.0], ChannelLayout::PerTensor, 8);
        assert_eq!(
            q.iter().copied().collect::<Vec<i8>>(),
            vec![1, 2, 4, -2, 127, -128]
        );
    }

    #[test]
    fn conv_transpose_channels_follow_groups() {
        // Cin = 4, Cout/g = 1, group = 2, kernel 1x1: input channels 0,1 -> out 0; 2,3 -> out 1.
        let w = array![1.0f32, 2.0, 30.0, 40.0]
            .into_shape_with_order((4, 1, 1, 1))
            .unwrap()
            .into_dyn();
        let layout = ChannelLayout::Transposed {
            cin: 4,
            cout_per_group: 1,
            group: 2,
        };
        assert_eq!(
            arq_scales("t", &w, layout, 8).unwrap(),
            vec![2.0 / 127.0, 40.0 / 127.0]
        );
        // group 1, Cout = 2: axis 1 is the output channel.
        let w = array![1.0f32, 20.0, 3.0, 40.0]
            .into_shape_with_order((2, 2, 1, 1))
            .unwrap()
            .into_dyn();
        let layout = ChannelLayout::Transposed {
            cin: 2,
            cout_per_group: 2,
            group: 1,
        };
        assert_eq!(
            arq_scales("t", &w, layout, 8).unwrap(),
            vec![3.0 / 127.0, 40.0 / 127.0]
        );
    }

    #[test]
    fn bias_by_hand_and_overflow() {
        let q = quantize_bias("l", &[1.0, -0.5], &[0.1, 0.2], 0.5).unwrap();
        assert_eq!(q, vec![20, -5]);
        let err = quantize_bias("conv7", &[1e6], &[1e-6], 1e-6)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv7") && err.contains("overflows int32"),
            "{err}"
        );
    }
}
