//! Tensor quantization (AMCT's `tensor_quantize`): one input of a MaxPool or
//! Add quantized to int8 and straight back (`AscendQuant → AscendAntiQuant`),
//! so the operator moves int8 data on the device. This module finds the
//! inputs a configuration names and says why one cannot be quantized.

use super::config::TensorQuantConfig;
use super::params::ActParams;
use crate::onnx::GraphProto;
use crate::onnx::graph::is_constant;

/// Operators whose inputs can be tensor-quantized.
pub const TENSOR_QUANT_OPS: [&str; 2] = ["MaxPool", "Add"];

/// One tensor quantization resolved in the prepared graph, with its factors.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorFactors {
    /// The record key, `NODE:INPUT_INDEX`.
    pub key: String,
    /// The consuming node's name.
    pub node: String,
    /// Its operator.
    pub op_type: String,
    /// Which input.
    pub input_index: usize,
    /// The value quantized.
    pub input: String,
    /// Activation factors.
    pub act: ActParams,
}

/// The tensor quantizations of a configuration resolved in `graph`, each
/// as (node name, op type, input value), or an error naming the entry, the
/// node and the fix.
pub fn resolve(
    graph: &GraphProto,
    targets: &[TensorQuantConfig],
) -> Result<Vec<(String, String, String)>, String> {
    let mut seen = std::collections::HashSet::new();
    targets
        .iter()
        .map(|t| {
            let key = t.key();
            if !seen.insert(key.clone()) {
                return Err(format!("tensor_quantize names '{key}' twice"));
            }
            let node = graph
                .node
                .iter()
                .find(|n| n.name() == t.layer_name)
                .ok_or_else(|| {
                    let names: Vec<&str> = graph
                        .node
                        .iter()
                        .filter(|n| TENSOR_QUANT_OPS.contains(&n.op_type()))
                        .map(|n| n.name())
                        .collect();
                    format!(
                        "tensor_quantize: the model has no node '{}'; its MaxPool and Add nodes are: {}",
                        t.layer_name,
                        if names.is_empty() { "none".to_string() } else { names.join(", ") }
                    )
                })?;
            if !TENSOR_QUANT_OPS.contains(&node.op_type()) {
                return Err(format!(
                    "tensor_quantize: '{}' is {}; only the inputs of MaxPool and Add can be tensor-quantized",
                    t.layer_name,
                    node.op_type()
                ));
            }
            let input = node
                .input
                .get(t.input_index)
                .filter(|i| !i.is_empty())
                .ok_or_else(|| {
                    format!(
                        "tensor_quantize: '{}' has {} input(s); input_index {} does not exist",
                        t.layer_name,
                        node.input.len(),
                        t.input_index
                    )
                })?;
            if is_constant(graph, input) {
                return Err(format!(
                    "tensor_quantize: input {} of '{}' ('{input}') is a constant; only computed tensors are quantized",
                    t.input_index, t.layer_name
                ));
            }
            Ok((t.layer_name.clone(), node.op_type().to_string(), input.clone()))
        })
        .collect()
}
