//! LayerNormalization of the training graph: the forward pass is the
//! engine's (`ops::norm`); the backward pass gives the input, scale and
//! bias gradients.

use crate::ops::layout::axis_index;
use crate::ops::norm::LayerNorm;
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

/// LayerNormalization's attributes, as the training graph keeps them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(in crate::train) struct NormAttrs {
    /// The first normalised axis.
    pub axis: i64,
    /// Added to the variance.
    pub epsilon: f32,
}

fn slice<'a>(a: &'a ArrayD<f32>, what: &str) -> Result<std::borrow::Cow<'a, [f32]>, String> {
    match a.as_slice() {
        Some(s) => Ok(std::borrow::Cow::Borrowed(s)),
        None if !a.is_empty() => Ok(std::borrow::Cow::Owned(a.iter().copied().collect())),
        None => Err(format!("the {what} is empty")),
    }
}

/// y = (x − mean) / √(var + ε) · scale + bias over the axes from `axis` on.
pub(in crate::train) fn layer_norm(
    attrs: NormAttrs,
    x: &ArrayD<f32>,
    scale: &ArrayD<f32>,
    bias: Option<&ArrayD<f32>>,
) -> Result<ArrayD<f32>, String> {
    let bias = bias.map(|b| slice(b, "bias")).transpose()?;
    LayerNorm {
        axis: attrs.axis,
        epsilon: attrs.epsilon,
        scale: slice(scale, "scale")?.into_owned(),
        bias: bias.map(|b| b.into_owned()),
    }
    .run(x)
}

/// The gradients of a LayerNormalization: input, scale, bias.
pub(in crate::train) struct NormGradients {
    /// ∂L/∂x.
    pub x: ArrayD<f32>,
    /// ∂L/∂scale, shaped as the scale.
    pub scale: ArrayD<f32>,
    /// ∂L/∂bias, one value per scale value.
    pub bias: ArrayD<f32>,
}

/// The gradients of [`layer_norm`] given ∂L/∂y.
pub(in crate::train) fn layer_norm_backward(
    attrs: NormAttrs,
    x: &ArrayD<f32>,
    scale: &ArrayD<f32>,
    gy: &ArrayD<f32>,
) -> Result<NormGradients, String> {
    let a = axis_index(attrs.axis, x.ndim())?;
    let row: usize = x.shape()[a..].iter().product();
    let gamma = slice(scale, "scale")?;
    if row == 0 || !row.is_multiple_of(gamma.len()) {
        return Err(format!("scale of {} values for rows of {row}", gamma.len()));
    }
    let xs = x.as_standard_layout();
    let gs = gy.as_standard_layout();
    let (xs, gs) = (
        xs.as_slice().expect("standard"),
        gs.as_slice().expect("standard"),
    );
    let mut gx = vec![0f32; xs.len()];
    // Per row: the input gradient, and the row's share of the scale and bias gradients.
    let shares: Vec<(Vec<f32>, Vec<f32>)> = gx
        .par_chunks_mut(row)
        .zip(xs.par_chunks(row).zip(gs.par_chunks(row)))
        .map(|(gx, (x, g))| {
            let n = row as f32;
            let mean = x.iter().sum::<f32>() / n;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + attrs.epsilon).sqrt();
            let (mut g_scale, mut g_bias) = (vec![0f32; gamma.len()], vec![0f32; gamma.len()]);
            let (mut sum_d, mut sum_dx) = (0f32, 0f32);
            for (k, (&v, &gk)) in x.iter().zip(g).enumerate() {
                let xhat = (v - mean) * inv;
                let j = k % gamma.len();
                g_scale[j] += gk * xhat;
                g_bias[j] += gk;
                let d = gk * gamma[j];
                sum_d += d;
                sum_dx += d * xhat;
            }
            for (k, (out, (&v, &gk))) in gx.iter_mut().zip(x.iter().zip(g)).enumerate() {
                let xhat = (v - mean) * inv;
                let d = gk * gamma[k % gamma.len()];
                *out = inv * (d - sum_d / n - xhat * sum_dx / n);
            }
            (g_scale, g_bias)
        })
        .collect();
    let mut g_scale = vec![0f32; gamma.len()];
    let mut g_bias = vec![0f32; gamma.len()];
    for (s, b) in shares {
        g_scale.iter_mut().zip(s).for_each(|(a, v)| *a += v);
        g_bias.iter_mut().zip(b).for_each(|(a, v)| *a += v);
    }
    let shaped =
        |v: Vec<f32>| ArrayD::from_shape_vec(scale.raw_dim(), v).map_err(|e| e.to_string());
    Ok(NormGradients {
        x: ArrayD::from_shape_vec(IxDyn(x.shape()), gx).map_err(|e| e.to_string())?,
        scale: shaped(g_scale)?,
        bias: shaped(g_bias)?,
    })
}
