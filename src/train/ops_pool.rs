//! Pooling and nearest-Resize index maps of the training graph.

use super::op::Op;
use crate::sim::kernels::conv_grad::contiguous;
use ndarray::{ArrayD, IxDyn};

/// Max (with the flat index of each maximum) or average pooling, 4-D input.
pub(in crate::train) fn pool(
    x: &ArrayD<f32>,
    kernel: (usize, usize),
    strides: (usize, usize),
    pads: (usize, usize, usize, usize),
    max: bool,
) -> (ArrayD<f32>, Vec<usize>) {
    let sh = x.shape();
    let (n, c, h, w) = (sh[0], sh[1], sh[2], sh[3]);
    let oh = (h + pads.0 + pads.2).saturating_sub(kernel.0) / strides.0.max(1) + 1;
    let ow = (w + pads.1 + pads.3).saturating_sub(kernel.1) / strides.1.max(1) + 1;
    let xs = contiguous(x);
    let mut out = Vec::with_capacity(n * c * oh * ow);
    let mut arg = Vec::with_capacity(n * c * oh * ow);
    for nc in 0..n * c {
        for r in 0..oh {
            for col in 0..ow {
                let (mut best, mut at, mut sum, mut count) = (f32::NEG_INFINITY, 0, 0f32, 0);
                for i in 0..kernel.0 {
                    for j in 0..kernel.1 {
                        let (Some(ih), Some(iw)) = (
                            (r * strides.0 + i).checked_sub(pads.0),
                            (col * strides.1 + j).checked_sub(pads.1),
                        ) else {
                            continue;
                        };
                        if ih >= h || iw >= w {
                            continue;
                        }
                        let k = (nc * h + ih) * w + iw;
                        if xs[k] > best {
                            best = xs[k];
                            at = k;
                        }
                        sum += xs[k];
                        count += 1;
                    }
                }
                out.push(if max {
                    best
                } else {
                    sum / (kernel.0 * kernel.1) as f32
                });
                arg.push(at);
                let _ = count;
            }
        }
    }
    (
        ArrayD::from_shape_vec(IxDyn(&[n, c, oh, ow]), out).unwrap_or_default(),
        arg,
    )
}

pub(in crate::train) fn avg_pool_backward(
    x: &ArrayD<f32>,
    kernel: (usize, usize),
    strides: (usize, usize),
    gy: &ArrayD<f32>,
) -> ArrayD<f32> {
    let sh = x.shape();
    let (h, w) = (sh[2], sh[3]);
    let (oh, ow) = (gy.shape()[2], gy.shape()[3]);
    let mut gx = vec![0f32; x.len()];
    let area = (kernel.0 * kernel.1) as f32;
    for (k, &g) in gy.iter().enumerate() {
        let (nc, r, col) = (k / (oh * ow), (k / ow) % oh, k % ow);
        for i in 0..kernel.0 {
            for j in 0..kernel.1 {
                let (ih, iw) = (r * strides.0 + i, col * strides.1 + j);
                if ih < h && iw < w {
                    gx[(nc * h + ih) * w + iw] += g / area;
                }
            }
        }
    }
    ArrayD::from_shape_vec(x.raw_dim(), gx).unwrap_or_default()
}

/// Output height and width and, per output row and column, the input row
/// and column nearest Resize reads (ONNX's coordinate transformation and
/// nearest-rounding rules).
pub(in crate::train) fn resize_maps(
    op: &Op,
    shape: &[usize],
) -> Result<(usize, usize, Vec<usize>, Vec<usize>), String> {
    let Op::Resize {
        sizes,
        scales,
        coordinates,
        nearest,
    } = op
    else {
        return Err("not a Resize".into());
    };
    if shape.len() != 4 {
        return Err(format!("input {shape:?}: only 4-D Resize trains"));
    }
    let (h, w) = (shape[2], shape[3]);
    let (oh, ow) = match sizes {
        Some(s) => *s,
        None => (
            (h as f32 * scales.0).floor() as usize,
            (w as f32 * scales.1).floor() as usize,
        ),
    };
    if oh == 0 || ow == 0 || oh as u64 * ow as u64 > crate::onnx::limits::MAX_ELEMENTS {
        return Err(format!("output {oh}x{ow} is empty or too large"));
    }
    let map = |out: usize, input: usize| -> Vec<usize> {
        let scale = out as f64 / input as f64;
        (0..out)
            .map(|o| {
                let o = o as f64;
                let x = match coordinates.as_str() {
                    "asymmetric" => o / scale,
                    "align_corners" if out > 1 => o * (input as f64 - 1.0) / (out as f64 - 1.0),
                    "align_corners" => 0.0,
                    "pytorch_half_pixel" if out == 1 => 0.0,
                    _ => (o + 0.5) / scale - 0.5,
                };
                let i = match nearest.as_str() {
                    "floor" => x.floor(),
                    "ceil" => x.ceil(),
                    "round_prefer_ceil" => (x + 0.5).floor(),
                    _ => {
                        // round half down
                        if x.fract() == 0.5 {
                            x.floor()
                        } else {
                            x.round()
                        }
                    }
                };
                i.clamp(0.0, input as f64 - 1.0) as usize
            })
            .collect()
    };
    Ok((oh, ow, map(oh, h), map(ow, w)))
}
