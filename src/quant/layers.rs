//! Finds the layers Ascend can run in int8: Conv, ConvTranspose, Gemm and
//! MatMul with a constant weight, and AveragePool.

use crate::onnx::graph::{GraphIndex, Source};
use crate::onnx::{GraphProto, OnnxError};
use serde::Serialize;

/// Whether and why a node can be quantized.
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

/// Operators that Ascend quantizes.
pub const QUANTIZABLE_OPS: [&str; 5] = ["Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool"];

/// Lists every node of a quantizable operator type with its verdict, in graph order.
pub fn find_candidates(graph: &GraphProto) -> Result<Vec<LayerCandidate>, OnnxError> {
    let index = GraphIndex::new(graph)?;
    let constant = |value: &str| match index.producer(value) {
        Some(Source::Initializer(_)) => true,
        Some(Source::Node(i)) => graph.node[i].op_type() == "Constant",
        _ => false,
    };
    let mut out = Vec::new();
    for &i in index.topological_order() {
        let n = &graph.node[i];
        let op = n.op_type();
        if !QUANTIZABLE_OPS.contains(&op) || !n.domain().is_empty() && n.domain() != "ai.onnx" {
            continue;
        }
        let label = crate::onnx::graph::node_label(graph, i);
        let (weight, note) = if op == "AveragePool" {
            (None, None)
        } else {
            let w = n.input.get(1).cloned().unwrap_or_default();
            if constant(&w) {
                (Some(w), None)
            } else {
                (
                    None,
                    Some(format!(
                        "weight '{w}' is not a constant, so it cannot be quantized ahead of time"
                    )),
                )
            }
        };
        out.push(LayerCandidate {
            node: label,
            op_type: op.to_string(),
            quantizable: note.is_none(),
            weight,
            note,
        });
    }
    Ok(out)
}
