//! How a layer is fake-quantized while it trains: its settings
//! ([`LayerQuant`]: ULQ clips, per-channel weights, a second computed
//! input's fixed range, DMQ balance factors) and the fake-quantized operands
//! the training graph's kernels then take (`graph.rs`).

use super::fake_quant::{arq_retrain_forward, ulq_forward, ulq_grid};
use super::op::Op;
use crate::quant::dmq::{ChannelAxes, balance_input, balance_weight};
use crate::quant::weights::ChannelLayout;
use crate::sim::kernels::conv_grad::contiguous;
use ndarray::ArrayD;

/// How one Conv or Gemm layer is fake-quantized while training: ULQ on its
/// input (learnable clips), ARQ-retrain on its weight.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerQuant {
    /// Lower clip of the input.
    pub clip_min: f32,
    /// Upper clip of the input.
    pub clip_max: f32,
    /// clip_min stays 0 (inputs produced by ReLU-like operators).
    pub fixed_min: bool,
    /// One weight scale per output channel (Conv, ConvTranspose; the
    /// columns of a Gemm / MatMul weight).
    pub channel_wise: bool,
    /// For a MatMul of two computed values (attention's): the fixed clip
    /// range of its second input, quantized like the first (ULQ) instead of
    /// as a weight.
    pub second: Option<(f32, f32)>,
    /// DMQ balancing (`quant::dmq`): the input is divided and the weight
    /// multiplied by these factors, channel by channel, before both are
    /// fake-quantized; the trained weight stays unbalanced.
    pub balance: Option<Balance>,
}

/// A layer's DMQ balance factors and where its input channels sit.
#[derive(Clone, Debug, PartialEq)]
pub struct Balance {
    /// One factor per input channel.
    pub factors: Vec<f32>,
    /// The layer's input channels in its input and weight.
    pub axes: ChannelAxes,
}

impl Balance {
    /// `x` (or its gradient) divided by the factors, channel by channel.
    pub(in crate::train) fn divide(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>, String> {
        let v = balance_input(&contiguous(x), x.shape(), &self.factors, self.axes).ok_or_else(
            || {
                format!(
                    "{} balance factors do not fit an input of {:?}",
                    self.factors.len(),
                    x.shape()
                )
            },
        )?;
        ArrayD::from_shape_vec(x.raw_dim(), v).map_err(|e| e.to_string())
    }
}

/// The fake-quantized input (ULQ) and weight (ARQ-retrain) of a layer.
pub(in crate::train) fn fake_quantize(
    q: &LayerQuant,
    op: &Op,
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
) -> Result<(ArrayD<f32>, ArrayD<f32>), String> {
    let grid = ulq_grid(q.clip_min, q.clip_max, 8).ok_or("empty clip range")?;
    let balanced = match &q.balance {
        Some(b) => Some((b.divide(x)?, balance_weight(w, &b.factors, b.axes))),
        None => None,
    };
    let (x, w) = balanced.as_ref().map_or((x, w), |(x, w)| (x, w));
    let xs = contiguous(x);
    let mut xq = vec![0f32; xs.len()];
    ulq_forward(&xs, &grid, 8, &mut xq);
    let ws = contiguous(w);
    let mut wq = vec![0f32; ws.len()];
    if let Some((lo, hi)) = q.second {
        let grid = ulq_grid(lo, hi, 8).ok_or("empty clip range of the second input")?;
        ulq_forward(&ws, &grid, 8, &mut wq);
        return Ok((
            ArrayD::from_shape_vec(x.raw_dim(), xq).map_err(|e| e.to_string())?,
            ArrayD::from_shape_vec(w.raw_dim(), wq).map_err(|e| e.to_string())?,
        ));
    }
    match weight_channels(op, w.shape()).filter(|_| q.channel_wise) {
        Some(layout) => {
            // Gather each output channel's weights, quantize them with one scale, scatter back.
            let mut members: Vec<Vec<usize>> = vec![Vec::new(); layout.channels()];
            for flat in 0..ws.len() {
                members[layout.channel_of(flat, ws.len())].push(flat);
            }
            for idx in members {
                let src: Vec<f32> = idx.iter().map(|&k| ws[k]).collect();
                let mut dst = vec![0f32; src.len()];
                arq_retrain_forward(&src, 8, &mut dst);
                for (&k, v) in idx.iter().zip(dst) {
                    wq[k] = v;
                }
            }
        }
        None => {
            arq_retrain_forward(&ws, 8, &mut wq);
        }
    }
    Ok((
        ArrayD::from_shape_vec(x.raw_dim(), xq).map_err(|e| e.to_string())?,
        ArrayD::from_shape_vec(w.raw_dim(), wq).map_err(|e| e.to_string())?,
    ))
}

/// Where a trainable layer's output channels sit in its weight: axis 0 of a
/// Conv weight, axis 1 of a ConvTranspose weight `[Cin, Cout, kh, kw]`, the
/// columns of a Gemm / MatMul weight (its rows under `transB`).
fn weight_channels(op: &Op, shape: &[usize]) -> Option<ChannelLayout> {
    let last = *shape.last()?;
    Some(match op {
        Op::Conv { .. } => ChannelLayout::Axis0 { channels: shape[0] },
        Op::ConvTranspose { .. } if shape.len() == 4 => ChannelLayout::Transposed {
            cin: shape[0],
            cout_per_group: shape[1],
            group: 1,
        },
        Op::Gemm { trans_b: true } => ChannelLayout::Axis0 { channels: shape[0] },
        Op::Gemm { trans_b: false } | Op::MatMul => ChannelLayout::LastAxis { channels: last },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::fake_quant::arq_retrain_forward;

    /// Per output column, a Gemm / MatMul weight is quantized column by
    /// column: each column equals the column quantized alone.
    #[test]
    fn a_matmul_weight_is_fake_quantized_per_column() {
        let w = ndarray::array![[0.5f32, -1.27, 0.01], [1.0, -2.56, 0.02]].into_dyn();
        let x = ndarray::array![[0.5f32, 1.0]].into_dyn();
        let q = LayerQuant {
            clip_min: -1.0,
            clip_max: 1.0,
            fixed_min: false,
            channel_wise: true,
            ..Default::default()
        };
        for op in [Op::MatMul, Op::Gemm { trans_b: false }] {
            let (_, wq) = fake_quantize(&q, &op, &x, &w).unwrap();
            for j in 0..3 {
                let col = [w[[0, j]], w[[1, j]]];
                let mut alone = [0f32; 2];
                arq_retrain_forward(&col, 8, &mut alone);
                assert_eq!([wq[[0, j]], wq[[1, j]]], alone, "column {j}");
            }
            // The smallest column keeps its resolution: 0.01 is not flushed to 0.
            assert!(wq[[0, 2]] != 0.0);
        }
        // Under transB the weight is [N, K]: rows are the outputs.
        let (_, wq) = fake_quantize(&q, &Op::Gemm { trans_b: true }, &x, &w).unwrap();
        let mut alone = [0f32; 3];
        arq_retrain_forward(&[0.5, -1.27, 0.01], 8, &mut alone);
        assert_eq!([wq[[0, 0]], wq[[0, 1]], wq[[0, 2]]], alone);
    }
}
