//! LayerNormalization (opset 17), the normalisation transformers carry
//! after every block: parsed once with its scale and bias, run over the
//! trailing axes from `axis` on, row by row in parallel.

use crate::onnx::NodeProto;
use crate::onnx::attr::{float_attr, int_attr};
use ndarray::ArrayD;
use rayon::prelude::*;

/// A LayerNormalization with constant scale and bias.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    /// The first normalised axis (negative counts from the end).
    pub axis: i64,
    /// `epsilon`, added to the variance.
    pub epsilon: f32,
    /// The scale, one value per normalised position (broadcast when shorter).
    pub scale: Vec<f32>,
    /// The bias, as the scale (none: zero).
    pub bias: Option<Vec<f32>>,
}

impl LayerNorm {
    /// The LayerNormalization `node` computes with constant `scale` and
    /// `bias`; an error when it asks for its mean or inverse deviation
    /// outputs or uses a stash type other than float32.
    pub fn parse(
        node: &NodeProto,
        scale: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<LayerNorm, String> {
        if node.output.iter().skip(1).any(|o| !o.is_empty()) {
            return Err("its Mean and InvStdDev outputs are not computed".into());
        }
        if int_attr(node, "stash_type").is_some_and(|t| t != 1) {
            return Err("a stash_type other than float32".into());
        }
        Ok(LayerNorm {
            axis: int_attr(node, "axis").unwrap_or(-1),
            epsilon: float_attr(node, "epsilon").unwrap_or(1e-5),
            scale: scale.to_vec(),
            bias: bias.map(<[f32]>::to_vec),
        })
    }

    /// Normalises `x` over its axes from `axis` on.
    pub fn run(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>, String> {
        let a = super::layout::axis_index(self.axis, x.ndim())?;
        let row: usize = x.shape()[a..].iter().product();
        let fits = |v: &[f32]| !v.is_empty() && row.is_multiple_of(v.len());
        if row == 0 || !fits(&self.scale) || self.bias.as_deref().is_some_and(|b| !fits(b)) {
            return Err(format!(
                "scale of {} and bias of {} values do not fit rows of {row}",
                self.scale.len(),
                self.bias.as_ref().map_or(0, Vec::len)
            ));
        }
        let mut out = x.as_standard_layout().into_owned();
        let data = out.as_slice_mut().expect("standard layout");
        // Scale and bias over the whole row (the usual case) or repeated.
        let whole = |v: &[f32]| -> Vec<f32> { (0..row).map(|k| v[k % v.len()]).collect() };
        let scale = whole(&self.scale);
        let bias = self.bias.as_deref().map_or_else(|| vec![0.0; row], whole);
        // Rows of a few thousand values at least per task.
        let rows_per_task = (4096 / row).max(1);
        data.par_chunks_mut(row * rows_per_task).for_each(|rows| {
            for r in rows.chunks_mut(row) {
                let n = r.len() as f32;
                let mean = lane_sum(r, |v| v) / n;
                let var = lane_sum(r, |v| (v - mean) * (v - mean)) / n;
                let inv = 1.0 / (var + self.epsilon).sqrt();
                for ((v, g), b) in r.iter_mut().zip(&scale).zip(&bias) {
                    *v = (*v - mean) * inv * g + b;
                }
            }
        });
        Ok(out)
    }
}

/// The sum of `f(v)` over `values`, in eight interleaved partial sums the
/// compiler keeps in one vector register.
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::node;
    use ndarray::IxDyn;

    #[test]
    fn normalises_each_row_by_hand() {
        let n = node("LayerNormalization", "ln", &["x", "g", "b"], &["y"], vec![]);
        let ln = LayerNorm::parse(&n, &[1.0, 2.0], Some(&[0.0, 1.0])).unwrap();
        // Row [1, 3]: mean 2, variance 1, so (−1, 1)/√(1 + 1e−5), then ·(1, 2) + (0, 1).
        let x = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0, 3.0, 5.0, 5.0]).unwrap();
        let y = ln.run(&x).unwrap();
        let s = 1.0 / (1.0f32 + 1e-5).sqrt();
        let want = [-s, 2.0 * s + 1.0, 0.0, 1.0];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        let mean_out = node(
            "LayerNormalization",
            "ln",
            &["x", "g"],
            &["y", "mean"],
            vec![],
        );
        assert!(LayerNorm::parse(&mean_out, &[1.0], None).is_err());
        assert!(ln.run(&ArrayD::zeros(IxDyn(&[2, 3]))).is_err());
    }
}
