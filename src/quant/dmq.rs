//! DMQ balancing (`dmq_balancer_param`): Ascend quantizes activations per
//! tensor but weights per output channel, so an input channel with a wide
//! range costs every other channel resolution. Each input channel `j` is
//! divided by `s_j = max|x_j|^α / max|w_j|^(1−α)` before the quantization
//! (a `Mul` in front of the AscendQuant) and the weights that read it are
//! multiplied by `s_j`, which leaves the float layer unchanged. For a
//! depthwise convolution each output channel reads one input channel, so the
//! weight's per-channel scale takes the factor exactly and the int8 weights
//! do not change at all: only the activation gains. `docs/algorithms.md` (DMQ).

use super::layers::QuantLayer;
use super::params::FLT_EPSILON;
use crate::onnx::GraphProto;
use crate::ops::window::Window;
use ndarray::ArrayD;

/// Where a layer's input channels sit in its input and in its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelAxes {
    /// Conv `[N, C, ...]` input; weight `[Cout, Cin/group, k...]`.
    Conv {
        /// Input channels.
        cin: usize,
        /// Groups.
        group: usize,
        /// Output channels.
        cout: usize,
        /// Elements per (output, input) pair: the kernel.
        kernel: usize,
    },
    /// ConvTranspose `[N, C, ...]` input; weight `[Cin, Cout/group, k...]`.
    ConvTranspose {
        /// Input channels.
        cin: usize,
    },
    /// Gemm / MatMul: the input's last axis; weight `[K, N]` (row = input channel).
    LastAxis {
        /// Input features.
        k: usize,
    },
}

impl ChannelAxes {
    /// The input channels of `layer`, or `None` when the layer is not one DMQ takes.
    pub fn of(graph: &GraphProto, layer: &QuantLayer) -> Option<ChannelAxes> {
        let dims: Vec<usize> = graph
            .initializer
            .iter()
            .find(|t| Some(t.name()) == layer.weight.as_deref())?
            .dims
            .iter()
            .map(|&d| d.max(0) as usize)
            .collect();
        let node = &graph.node[layer.node];
        match layer.op_type.as_str() {
            "Conv" if dims.len() >= 3 => {
                let group = Window::group_of(node);
                Some(ChannelAxes::Conv {
                    cin: dims[1] * group,
                    group,
                    cout: dims[0],
                    kernel: dims[2..].iter().product(),
                })
            }
            "ConvTranspose" if dims.len() >= 3 => Some(ChannelAxes::ConvTranspose { cin: dims[0] }),
            "Gemm" | "MatMul" if dims.len() == 2 => Some(ChannelAxes::LastAxis { k: dims[0] }),
            _ => None,
        }
    }

    /// Number of input channels.
    pub fn channels(&self) -> usize {
        match *self {
            ChannelAxes::Conv { cin, .. } | ChannelAxes::ConvTranspose { cin } => cin,
            ChannelAxes::LastAxis { k } => k,
        }
    }

    /// The input channel that weight element `flat` multiplies.
    fn weight_channel(&self, flat: usize, len: usize) -> usize {
        match *self {
            ChannelAxes::Conv {
                cin,
                group,
                cout,
                kernel,
            } => {
                let per_group_in = cin / group;
                let co = flat / (per_group_in * kernel);
                let ci = (flat / kernel) % per_group_in;
                (co / (cout / group).max(1)) * per_group_in + ci
            }
            ChannelAxes::ConvTranspose { cin } => flat / (len / cin.max(1)).max(1),
            ChannelAxes::LastAxis { k } => flat / (len / k.max(1)).max(1),
        }
    }

    /// For an input of `shape`: (channel count along the axis, elements
    /// after the axis), or `None` when the shape does not fit.
    fn input_layout(&self, shape: &[usize]) -> Option<(usize, usize)> {
        let c = self.channels();
        match self {
            ChannelAxes::LastAxis { .. } => (shape.last() == Some(&c)).then_some((c, 1)),
            _ => (shape.len() >= 2 && shape[1] == c).then(|| (c, shape[2..].iter().product())),
        }
    }

    /// The shape of the balancing constant for an input of rank `rank`.
    pub fn factor_shape(&self, rank: usize) -> Vec<usize> {
        match self {
            ChannelAxes::LastAxis { k } => vec![*k],
            _ => {
                let mut s = vec![1; rank.max(2)];
                s[1] = self.channels();
                s
            }
        }
    }
}

/// Running `max |x_j|` per input channel.
#[derive(Clone, Debug)]
pub struct ChannelMax {
    axes: ChannelAxes,
    /// The maxima so far.
    pub max: Vec<f32>,
    /// Rank of the input seen.
    pub rank: usize,
}

impl ChannelMax {
    /// Empty maxima for a layer's input.
    pub fn new(axes: ChannelAxes) -> ChannelMax {
        ChannelMax {
            axes,
            max: vec![0.0; axes.channels()],
            rank: 0,
        }
    }

    /// Adds a batch of the layer's input.
    pub fn observe(&mut self, x: &[f32], shape: &[usize]) {
        let Some((c, inner)) = self.axes.input_layout(shape) else {
            return;
        };
        self.rank = shape.len();
        for (i, chunk) in x.chunks(inner.max(1)).enumerate() {
            let j = i % c;
            let m = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if m.is_finite() {
                self.max[j] = self.max[j].max(m);
            }
        }
    }
}

/// Balancing factors `s_j = xmax_j^α / wmax_j^(1−α)`, with AMCT's guards:
/// a channel whose weights or inputs are all zero keeps 1, and factors stay
/// within (FLT_EPSILON, 1/FLT_EPSILON).
pub fn balance_factors(x_max: &[f32], w: &ArrayD<f32>, axes: ChannelAxes, alpha: f32) -> Vec<f32> {
    let mut w_max = vec![0.0f32; axes.channels()];
    let len = w.len();
    for (flat, v) in w.iter().enumerate() {
        let j = axes.weight_channel(flat, len);
        if let Some(m) = w_max.get_mut(j) {
            *m = m.max(v.abs());
        }
    }
    x_max
        .iter()
        .zip(&w_max)
        .map(|(&x, &wm)| {
            if x <= 0.0 || wm <= 0.0 {
                return 1.0;
            }
            let s = x.powf(alpha) / wm.powf(1.0 - alpha);
            if s.is_finite() {
                s.clamp(FLT_EPSILON * 2.0, 1.0 / (FLT_EPSILON * 2.0))
            } else {
                1.0
            }
        })
        .collect()
}

/// The weight with every element multiplied by its input channel's factor.
pub fn balance_weight(w: &ArrayD<f32>, s: &[f32], axes: ChannelAxes) -> ArrayD<f32> {
    let len = w.len();
    let data = w
        .iter()
        .enumerate()
        .map(|(flat, &v)| {
            v * s
                .get(axes.weight_channel(flat, len))
                .copied()
                .unwrap_or(1.0)
        })
        .collect();
    ArrayD::from_shape_vec(w.raw_dim(), data).expect("same number of elements")
}

/// The input with every channel divided by its factor (for the observers).
pub fn balance_input(x: &[f32], shape: &[usize], s: &[f32], axes: ChannelAxes) -> Option<Vec<f32>> {
    let (c, inner) = axes.input_layout(shape)?;
    Some(
        x.chunks(inner.max(1))
            .enumerate()
            .flat_map(|(i, chunk)| {
                let f = s[i % c];
                chunk.iter().map(move |v| v / f)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_by_hand() {
        // Gemm weight [K=2, N=2]: rows are input channels.
        let w = ndarray::array![[0.5f32, -2.0], [0.25, 0.1]].into_dyn();
        let axes = ChannelAxes::LastAxis { k: 2 };
        let s = balance_factors(&[4.0, 9.0], &w, axes, 0.5);
        // s0 = sqrt(4)/sqrt(2) = 1.41421, s1 = sqrt(9)/sqrt(0.25) = 6.
        assert!(
            (s[0] - 2f32.sqrt()).abs() < 1e-6 && (s[1] - 6.0).abs() < 1e-5,
            "{s:?}"
        );
        let wb = balance_weight(&w, &s, axes);
        assert!((wb[[1, 0]] - 1.5).abs() < 1e-6 && (wb[[0, 1]] + 2.0 * 2f32.sqrt()).abs() < 1e-5);
        // Zero channels keep 1.
        assert_eq!(balance_factors(&[0.0, 1.0], &w, axes, 0.5)[0], 1.0);
    }

    #[test]
    fn a_depthwise_weight_maps_each_output_to_its_own_input() {
        // Depthwise: Cout = Cin = group = 3, weight [3, 1, 2].
        let axes = ChannelAxes::Conv {
            cin: 3,
            group: 3,
            cout: 3,
            kernel: 2,
        };
        let chans: Vec<usize> = (0..6).map(|f| axes.weight_channel(f, 6)).collect();
        assert_eq!(chans, vec![0, 0, 1, 1, 2, 2]);
        // Grouped: Cin 4, group 2, Cout 4 -> weight [4, 2, 1].
        let axes = ChannelAxes::Conv {
            cin: 4,
            group: 2,
            cout: 4,
            kernel: 1,
        };
        let chans: Vec<usize> = (0..8).map(|f| axes.weight_channel(f, 8)).collect();
        assert_eq!(chans, vec![0, 1, 0, 1, 2, 3, 2, 3]);
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let b = balance_input(&x, &[1, 4, 2], &[1.0, 2.0, 4.0, 8.0], axes).unwrap();
        assert_eq!(b, vec![1.0, 2.0, 1.5, 2.0, 1.25, 1.5, 0.875, 1.0]);
    }
}
