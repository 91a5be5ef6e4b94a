//! Rewrites of the float model before calibration, all meaning-preserving:
//! names for unnamed nodes (record keys need them), constant weights moved to
//! initializers, BatchNormalization folded into the preceding Conv, and
//! Gemm's `transB=1` weights transposed offline.

use crate::onnx::attr::{self, attr_int, find, float_attr, int_attr};
use crate::onnx::builder::set_initializer_input;
use crate::onnx::graph::{GraphIndex, initializer_f32, name_nodes, node_label};
use crate::onnx::{GraphProto, ModelProto, OnnxError, Storage, to_proto};
use crate::tensor::Tensor;
use ndarray::{Axis, IxDyn};
use std::collections::HashSet;

/// What preparation did, for the report.
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    /// Conv layers that absorbed a BatchNormalization.
    pub fused: Vec<String>,
    /// Gemm layers whose weight was transposed.
    pub transposed: Vec<String>,
}

/// Applies every preparation pass. `do_fusion` and `skip_fusion` follow the config.
pub fn prepare(
    model: &mut ModelProto,
    do_fusion: bool,
    skip_fusion: &[String],
) -> Result<Prepared, OnnxError> {
    crate::ops::work::check_model(model)?;
    let graph = model.graph.as_mut().ok_or_else(|| OnnxError::NoGraph {
        path: "the model".into(),
    })?;
    name_nodes(graph);
    constants_to_initializers(graph);
    let mut done = Prepared::default();
    if do_fusion {
        done.fused = fold_batch_norms(graph, skip_fusion)?;
    }
    done.transposed = untranspose_gemm_weights(graph)?;
    Ok(done)
}

/// Moves `Constant` nodes (with a `value` tensor) that feed input 1 or 2 of a
/// quantizable op into initializers.
fn constants_to_initializers(graph: &mut GraphProto) {
    let wanted: HashSet<String> = graph
        .node
        .iter()
        .filter(|n| super::layers::has_weight(n.op_type()))
        .flat_map(|n| n.input.iter().skip(1).cloned())
        .collect();
    let mut keep = Vec::with_capacity(graph.node.len());
    for n in std::mem::take(&mut graph.node) {
        let tensor =
            (n.op_type() == "Constant" && n.output.len() == 1 && wanted.contains(&n.output[0]))
                .then(|| find(&n, "value").and_then(|a| a.t.clone()))
                .flatten();
        match tensor {
            Some(mut t) => {
                t.name = Some(n.output[0].clone());
                graph.initializer.push(t);
            }
            None => keep.push(n),
        }
    }
    graph.node = keep;
}

/// Folds `Conv -> BatchNormalization` pairs: w' = w·γ/√(σ²+ε) per output
/// channel, b' = (b − μ)·γ/√(σ²+ε) + β; the Conv then writes the BN's output.
fn fold_batch_norms(graph: &mut GraphProto, skip: &[String]) -> Result<Vec<String>, OnnxError> {
    let mut fused = Vec::new();
    // Convs whose pair cannot be folded (non-constant parameters): not tried again.
    let mut unfoldable: HashSet<String> = HashSet::new();
    loop {
        let index = GraphIndex::new(graph)?;
        let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name()).collect();
        let found = graph.node.iter().enumerate().find_map(|(c, n)| {
            // A Conv without an output is malformed; folding leaves it to the checks after.
            let out = n.output.first()?;
            if n.op_type() != "Conv"
                || skip.iter().any(|s| s == n.name())
                || unfoldable.contains(n.name())
                || outputs.contains(out.as_str())
            {
                return None;
            }
            let consumers = index.consumers(out);
            let &[b] = consumers else { return None };
            let bn = &graph.node[b];
            let inference = bn.output.len() == 1 && int_attr(bn, "training_mode").unwrap_or(0) == 0;
            (bn.op_type() == "BatchNormalization"
                && bn.input.len() == 5
                && bn.input[0] == *out
                && inference)
                .then_some((c, b))
        });
        let Some((c, b)) = found else { break };
        let bn = graph.node[b].clone();
        let params: Vec<Option<ndarray::ArrayD<f32>>> = bn.input[1..5]
            .iter()
            .map(|p| initializer_f32(graph, p))
            .collect::<Result<_, _>>()?;
        let w_name = graph.node[c].input[1].clone();
        let (Some(w), [Some(gamma), Some(beta), Some(mean), Some(var)]) =
            (initializer_f32(graph, &w_name)?, params.as_slice())
        else {
            // Not constant: leave this pair alone and look for others.
            unfoldable.insert(graph.node[c].name().to_string());
            continue;
        };
        let eps = float_attr(&bn, "epsilon").unwrap_or(1e-5);
        let bias_name = graph.node[c]
            .input
            .get(2)
            .filter(|s| !s.is_empty())
            .cloned();
        let old_b = match &bias_name {
            Some(b) => match initializer_f32(graph, b)? {
                Some(values) => Some(values),
                None => {
                    // A bias that is computed, or not float32: folding would
                    // have to drop it, so this pair stays as it is.
                    unfoldable.insert(graph.node[c].name().to_string());
                    continue;
                }
            },
            None => None,
        };
        let cout = w.shape().first().copied().unwrap_or(0);
        let label = node_label(graph, b);
        for (what, len) in [
            ("scale", gamma.len()),
            ("B", beta.len()),
            ("input_mean", mean.len()),
            ("input_var", var.len()),
        ]
        .into_iter()
        .chain(old_b.as_ref().map(|v| ("the Conv bias", v.len())))
        {
            if len != cout {
                return Err(OnnxError::Invalid {
                    node: label,
                    reason: format!(
                        "{what} has {len} values but the Conv before it has {cout} output channels; fix the model"
                    ),
                });
            }
        }
        if let Some(k) =
            (0..cout).find(|&k| (var[k] + eps <= 0.0 || var[k].is_nan()) || !gamma[k].is_finite())
        {
            return Err(OnnxError::Invalid {
                node: label,
                reason: format!(
                    "channel {k} has variance {} + epsilon {eps} and scale {}; the variance must be positive and the scale finite",
                    var[k], gamma[k]
                ),
            });
        }
        let factor: Vec<f32> = (0..cout)
            .map(|k| gamma[k] / (var[k] + eps).sqrt())
            .collect();
        let mut w2 = w.clone();
        for (k, mut slice) in w2.axis_iter_mut(Axis(0)).enumerate() {
            slice.mapv_inplace(|v| v * factor[k]);
        }
        let old_b = old_b.unwrap_or_else(|| ndarray::ArrayD::zeros(IxDyn(&[cout])));
        let b2: Vec<f32> = (0..cout)
            .map(|k| (old_b[k] - mean[k]) * factor[k] + beta[k])
            .collect();
        let conv_name = graph.node[c].name().to_string();
        set_initializer_input(
            graph,
            c,
            1,
            &format!("{conv_name}.weight_fused"),
            &Tensor::F32(w2),
            Storage::Raw,
        );
        let b2 =
            Tensor::F32(ndarray::ArrayD::from_shape_vec(IxDyn(&[cout]), b2).expect("cout values"));
        if graph.node[c].input.get(2).is_some_and(|s| !s.is_empty()) {
            set_initializer_input(
                graph,
                c,
                2,
                &format!("{conv_name}.bias_fused"),
                &b2,
                Storage::Raw,
            );
        } else {
            let name = format!("{conv_name}.bias_fused");
            graph.initializer.push(to_proto(&name, &b2, Storage::Raw));
            graph.node[c].input.resize(2, String::new());
            graph.node[c].input.push(name);
        }
        graph.node[c].output[0] = bn.output[0].clone();
        graph.node.remove(b);
        graph.value_info.retain(|v| v.name() != bn.input[0]);
        fused.push(conv_name);
    }
    Ok(fused)
}

/// Transposes the constant B of every `Gemm` with `transB=1` and sets `transB=0`.
fn untranspose_gemm_weights(graph: &mut GraphProto) -> Result<Vec<String>, OnnxError> {
    let mut done = Vec::new();
    for i in 0..graph.node.len() {
        let n = &graph.node[i];
        let trans_b = int_attr(n, "transB") == Some(1);
        if n.op_type() != "Gemm" || !trans_b || n.input.len() < 2 {
            continue;
        }
        let Some(w) = initializer_f32(graph, &n.input[1])? else {
            continue;
        };
        if w.ndim() != 2 {
            continue;
        }
        let t = Tensor::F32(w.t().as_standard_layout().to_owned());
        let label = node_label(graph, i);
        set_initializer_input(graph, i, 1, &format!("{label}.weight_t"), &t, Storage::Raw);
        attr::set(&mut graph.node[i], attr_int("transB", 0));
        done.push(label);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::node;
    use crate::onnx::proto::GraphProto;

    /// Found by fuzzing: a Conv node with no output made BN folding index
    /// an empty list.
    #[test]
    fn a_conv_without_an_output_is_not_a_panic() {
        let mut m = ModelProto {
            graph: Some(GraphProto {
                node: vec![
                    node("Conv", "c", &["x", "w"], &[], vec![]),
                    node("Relu", "r", &["x"], &["y"], vec![]),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let _ = prepare(&mut m, true, &[]);
    }
}
