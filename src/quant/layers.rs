//! Finds the layers Ascend can run in int8 (Conv, ConvTranspose, Gemm, MatMul
//! with a constant weight, AveragePool) and everything the later passes need
//! to know about each: its activation input, weight, bias and channel layout.

use super::weights::ChannelLayout;
use crate::onnx::graph::{GraphIndex, Source, node_label};
use crate::onnx::{GraphProto, OnnxError};
use crate::ops::gemm::Gemm;
use crate::ops::window::Window;
use serde::Serialize;

/// Operators that Ascend quantizes: the one list every pass consults.
pub const QUANTIZABLE_OPS: [&str; 5] = ["Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool"];

/// Whether a quantizable operator reads a weight (input 1), which becomes int8.
pub fn has_weight(op_type: &str) -> bool {
    QUANTIZABLE_OPS.contains(&op_type) && op_type != "AveragePool"
}

/// Whether a quantizable operator's weight has output channels that can be
/// quantized one scale each (`channel_wise`). Gemm and MatMul are per tensor
/// in AMCT's classic path; ascend-quant also quantizes them per output
/// column, the dequantization then a vector over the result's last axis
/// (`docs/deploy-format.md`, per-channel Gemm / MatMul).
pub fn has_weight_channels(op_type: &str) -> bool {
    matches!(op_type, "Conv" | "ConvTranspose" | "Gemm" | "MatMul")
}

/// Whether a layer of this operator quantizes its weight per channel unless
/// told otherwise: AMCT's defaults (Conv and ConvTranspose).
pub fn channel_wise_by_default(op_type: &str) -> bool {
    matches!(op_type, "Conv" | "ConvTranspose")
}

/// A quantizable layer of a (prepared) graph.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantLayer {
    /// The node's name (record key).
    pub name: String,
    /// The operator.
    pub op_type: String,
    /// Index of the node in `graph.node`.
    pub node: usize,
    /// The activation input (input 0).
    pub act_input: String,
    /// A MatMul's second activation (attention's `QKᵀ` and `softmax·V`):
    /// quantized int8 symmetric like the first, its scale in the record's
    /// `scale_w` (`docs/deploy-format.md`, two-input MatMul). The layer then
    /// has no weight.
    pub second_input: Option<String>,
    /// The weight initializer.
    pub weight: Option<String>,
    /// The bias initializer (Conv/Gemm input 2, or MatMul's following Add).
    pub bias: Option<String>,
    /// For MatMul with a bias: the index of the Add node carrying it.
    pub bias_add: Option<usize>,
    /// The value the dequantized result must carry (the node's or the bias Add's output).
    pub output: String,
    /// How output channels sit in the weight (used when `channel_wise`).
    pub channel_layout: ChannelLayout,
    /// Rank of the layer's output (for the per-channel dequant shape).
    pub output_rank: usize,
}

impl QuantLayer {
    /// The shape of a constant of `channels` per-output-channel values that
    /// broadcasts onto the layer's output: a scalar for one, `[1, C, 1, ..]`
    /// for a convolution, `[C]` (the last axis) for Gemm / MatMul.
    pub fn channel_shape(&self, channels: usize) -> Vec<usize> {
        if channels == 1 {
            vec![]
        } else if self.channel_layout.channels_last() {
            vec![channels]
        } else {
            let mut s = vec![1; self.output_rank.max(2)];
            s[1] = channels;
            s
        }
    }
}

/// Whether and why a node can be quantized (for `inspect` and reports).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerCandidate {
    /// The node's name (or `#index (op)` when unnamed).
    pub node: String,
    /// The node's operator.
    pub op_type: String,
    /// The weight initializer, for layers that have one.
    pub weight: Option<String>,
    /// Whether the layer can be quantized.
    pub quantizable: bool,
    /// Why not, when it cannot.
    pub note: Option<String>,
}

/// Examines every node of a quantizable type; returns the usable layers and,
/// for every candidate, a verdict.
pub fn discover(graph: &GraphProto) -> Result<(Vec<QuantLayer>, Vec<LayerCandidate>), OnnxError> {
    let index = GraphIndex::new(graph)?;
    let outputs: Vec<&str> = graph.output.iter().map(|o| o.name()).collect();
    let init_dims = |name: &str| {
        index
            .initializer(name)
            .map(|i| graph.initializer[i].dims.clone())
    };
    let mut layers = Vec::new();
    let mut verdicts = Vec::new();
    for &i in index.topological_order() {
        let n = &graph.node[i];
        let op = n.op_type();
        if !QUANTIZABLE_OPS.contains(&op) || !(n.domain().is_empty() || n.domain() == "ai.onnx") {
            continue;
        }
        let label = node_label(graph, i);
        let weight = n.input.get(1).cloned().filter(|_| has_weight(op));
        let result = examine(graph, &index, &outputs, i, &init_dims);
        verdicts.push(LayerCandidate {
            node: label.clone(),
            op_type: op.to_string(),
            weight: weight.clone(),
            quantizable: result.is_ok(),
            note: result.as_ref().err().cloned(),
        });
        if let Ok((bias, bias_add, output, channel_layout, output_rank)) = result {
            let second_input = two_inputs(graph, &index, i).then(|| n.input[1].clone());
            layers.push(QuantLayer {
                name: label,
                op_type: op.to_string(),
                node: i,
                act_input: n.input[0].clone(),
                weight: weight.filter(|_| second_input.is_none()),
                second_input,
                bias,
                bias_add,
                output,
                channel_layout,
                output_rank,
            });
        }
    }
    Ok((layers, verdicts))
}

type Examined = (Option<String>, Option<usize>, String, ChannelLayout, usize);

/// Whether node `i` is a MatMul of two computed values (no constant
/// operand): attention's products, which Ascend quantizes on both inputs.
fn two_inputs(graph: &GraphProto, index: &GraphIndex, i: usize) -> bool {
    let n = &graph.node[i];
    let computed = |k: usize| {
        n.input.get(k).is_some_and(|v| {
            !v.is_empty()
                && index.initializer(v).is_none()
                && !matches!(index.producer(v), Some(Source::Node(p)) if graph.node[p].op_type() == "Constant")
        })
    };
    n.op_type() == "MatMul" && n.input.len() == 2 && computed(0) && computed(1)
}

fn examine(
    graph: &GraphProto,
    index: &GraphIndex,
    graph_outputs: &[&str],
    i: usize,
    init_dims: &dyn Fn(&str) -> Option<Vec<i64>>,
) -> Result<Examined, String> {
    let n = &graph.node[i];
    let op = n.op_type();
    let out = n.output.first().cloned().unwrap_or_default();
    if n.input.first().is_none_or(|x| x.is_empty()) || out.is_empty() {
        return Err(format!(
            "{op} without a data input or an output; the node is malformed"
        ));
    }
    if op == "AveragePool" {
        let k = Window::kernel_rank(n);
        if k != 2 {
            return Err(format!(
                "AveragePool over {k} spatial axes; only 2-D (4-D input) pooling is quantized"
            ));
        }
        return Ok((None, None, out, ChannelLayout::PerTensor, 4));
    }
    if two_inputs(graph, index, i) {
        return Ok((None, None, out, ChannelLayout::PerTensor, 2));
    }
    let w = n.input.get(1).map(String::as_str).unwrap_or("");
    let dims = init_dims(w);
    if let Some(d) = dims.as_ref().filter(|d| d.iter().any(|&x| x < 0)) {
        return Err(format!("weight '{w}' has negative dims {d:?}"));
    }
    let Some(dims) = dims else {
        let why = match index.producer(w) {
            Some(Source::Node(p)) if graph.node[p].op_type() == "Constant" => {
                "comes from a Constant node (ascend-quant moves those to initializers first)"
            }
            _ => "is not a constant",
        };
        return Err(format!(
            "weight '{w}' {why}, so it cannot be quantized ahead of time"
        ));
    };
    let bias = n.input.get(2).filter(|b| !b.is_empty()).cloned();
    if let Some(b) = &bias
        && init_dims(b).is_none()
    {
        return Err(format!("bias '{b}' is not a constant"));
    }
    match op {
        "Conv" => {
            if !(dims.len() == 4 || dims.len() == 5) {
                return Err(format!(
                    "Conv weight of rank {}; only 2-D and 3-D convolutions (4-D/5-D input) are quantized",
                    dims.len()
                ));
            }
            Ok((
                bias,
                None,
                out,
                ChannelLayout::Axis0 {
                    channels: dims[0] as usize,
                },
                dims.len(),
            ))
        }
        "ConvTranspose" => {
            if dims.len() != 4 {
                return Err("ConvTranspose with a non 4-D weight; only 2-D transposed convolutions are quantized".into());
            }
            if Window::dilates(n) {
                return Err("ConvTranspose with dilations other than 1 cannot be quantized".into());
            }
            let group = Window::group_of(n);
            let layout = ChannelLayout::Transposed {
                cin: dims[0] as usize,
                cout_per_group: dims[1] as usize,
                group,
            };
            Ok((bias, None, out, layout, 4))
        }
        "Gemm" => {
            let gemm = Gemm::parse(n)?;
            if !gemm.is_plain_product() {
                return Err(
                    "Gemm with transA=1 or alpha/beta other than 1 cannot be quantized".into(),
                );
            }
            if dims.len() != 2 {
                return Err("Gemm weight is not 2-D".into());
            }
            if let Some(b) = &bias {
                let n_out = if gemm.trans_b { dims[0] } else { dims[1] };
                let values = |d: Vec<i64>| d.iter().try_fold(1i64, |acc, &x| acc.checked_mul(x));
                if init_dims(b).is_some_and(|d| values(d) != Some(n_out)) {
                    return Err(format!(
                        "Gemm bias '{b}' is not one value per output; only 1-D biases are quantized"
                    ));
                }
            }
            let layout = if gemm.trans_b {
                ChannelLayout::Axis0 {
                    channels: dims[0] as usize,
                }
            } else {
                ChannelLayout::LastAxis {
                    channels: dims[1] as usize,
                }
            };
            Ok((bias, None, out, layout, 2))
        }
        "MatMul" => {
            if !(dims.len() == 2 || dims.len() == 3) {
                return Err(format!(
                    "MatMul weight of rank {}; only 2-D and 3-D constant weights are quantized",
                    dims.len()
                ));
            }
            let n_out = *dims.last().expect("rank >= 2");
            let consumers = index.consumers(&out);
            // The bias Add, in either order: PyTorch exports `Add(bias, matmul)`.
            let bias_of = |c: usize| -> Option<String> {
                let add = &graph.node[c];
                let (a, b) = match add.input.as_slice() {
                    [a, b] => (a, b),
                    _ => return None,
                };
                let bias = if *a == out {
                    b
                } else if *b == out {
                    a
                } else {
                    return None;
                };
                (add.op_type() == "Add"
                    && add.output.first().is_some_and(|o| !o.is_empty())
                    && init_dims(bias).is_some_and(|d| d.len() == 1 && d[0] == n_out))
                .then(|| bias.clone())
            };
            let layout = ChannelLayout::LastAxis {
                channels: n_out as usize,
            };
            let add = (consumers.len() == 1 && !graph_outputs.contains(&out.as_str()))
                .then(|| consumers[0])
                .and_then(|c| bias_of(c).map(|b| (c, b)));
            match add {
                Some((a, bias)) => Ok((
                    Some(bias),
                    Some(a),
                    graph.node[a].output[0].clone(),
                    layout,
                    2,
                )),
                None => Ok((None, None, out, layout, 2)),
            }
        }
        _ => unreachable!("only quantizable ops reach here"),
    }
}
