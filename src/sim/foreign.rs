//! Per-node fallback: a node the native engine does not run becomes a
//! one-node model run on the rten engine, as one step among the native
//! ones, so one unusual operator no longer sends the whole model to rten.
//! Its constant inputs go into the small model (rten prepares them once);
//! its other inputs are fed at each run. `docs/engine.md` (Per-node
//! fallback) says what it costs.

use super::error::SimError;
use super::rten_engine::RtenExecutor;
use super::{Executor, Session, SessionOptions};
use crate::onnx::proto::{TypeProto, type_proto};
use crate::onnx::{GraphProto, ModelProto, NodeProto, Storage, ValueInfoProto, to_proto};
use crate::ops::Unsupported;
use crate::tensor::Tensor;
use std::collections::HashMap;

/// A node run alone on rten.
pub(super) struct Foreign {
    session: Box<dyn Session>,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

impl Foreign {
    /// Runs the node on its runtime inputs (in the step's input order).
    pub(super) fn run(&self, args: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        let feeds: Vec<(&str, &Tensor)> = self
            .inputs
            .iter()
            .map(String::as_str)
            .zip(args.iter().copied())
            .collect();
        let fetch: Vec<&str> = self.outputs.iter().map(String::as_str).collect();
        self.session
            .run(&feeds, &fetch)
            .map_err(|e| format!("on the rten engine: {e}"))
    }
}

/// A value declared with only an element type (when known).
fn value(name: &str, elem_type: Option<i32>) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: elem_type.map(|t| TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(t),
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Foreign {
    /// `node` of `model` as a one-node model on rten (`why` is the native
    /// engine's reason, kept for errors). Fails when rten cannot load it.
    pub(super) fn new(
        model: &ModelProto,
        node: &NodeProto,
        consts: &HashMap<String, Tensor>,
        declared: &HashMap<String, i32>,
        why: &Unsupported,
    ) -> Result<Foreign, SimError> {
        let mut runtime = Vec::new();
        let mut initializer: Vec<crate::onnx::TensorProto> = Vec::new();
        for name in node.input.iter().filter(|v| !v.is_empty()) {
            match consts.get(name) {
                Some(c) if !initializer.iter().any(|t| t.name() == name) => {
                    initializer.push(to_proto(name, c, Storage::Raw));
                }
                Some(_) => {}
                None if !runtime.contains(name) => runtime.push(name.clone()),
                None => {}
            }
        }
        let outputs: Vec<String> = node
            .output
            .iter()
            .filter(|o| !o.is_empty())
            .cloned()
            .collect();
        let graph = GraphProto {
            name: Some(format!("node {}", node.name())),
            node: vec![node.clone()],
            input: runtime
                .iter()
                .map(|n| value(n, declared.get(n).copied()))
                .collect(),
            output: outputs
                .iter()
                .map(|n| value(n, declared.get(n).copied()))
                .collect(),
            initializer,
            ..Default::default()
        };
        let single = ModelProto {
            ir_version: model.ir_version,
            opset_import: model.opset_import.clone(),
            graph: Some(graph),
            ..Default::default()
        };
        let opts = SessionOptions {
            keep: Vec::new(),
            dynamic_batch: false,
            optimize: true,
        };
        let session = RtenExecutor
            .prepare(&single, &opts)
            .map_err(|e| SimError::Load {
                reason: format!("{why}, and rten cannot run it alone either: {e}"),
            })?;
        Ok(Foreign {
            session,
            inputs: runtime,
            outputs,
        })
    }

    /// The runtime inputs it reads, in order.
    pub(super) fn inputs(&self) -> &[String] {
        &self.inputs
    }

    /// The values it writes.
    pub(super) fn outputs(&self) -> &[String] {
        &self.outputs
    }
}

/// Which of a foreign node's outputs are float32: those the graph declares
/// so, and the first output of an operator that keeps its first input's
/// type when that input is float32 (`is_float`).
pub(super) fn float_outputs(
    node: &NodeProto,
    is_float: &dyn Fn(&String) -> bool,
    declared: &HashMap<String, i32>,
) -> Vec<String> {
    const TYPE_CHANGING: &[&str] = &[
        "Shape",
        "Size",
        "ArgMax",
        "ArgMin",
        "NonZero",
        "Cast",
        "CastLike",
        "Equal",
        "Less",
        "Greater",
        "LessOrEqual",
        "GreaterOrEqual",
        "Not",
        "And",
        "Or",
        "Xor",
        "IsNaN",
        "IsInf",
        "QuantizeLinear",
        "ConstantOfShape",
        "Range",
        "NonMaxSuppression",
        "Unique",
        "EyeLike",
        "OneHot",
        "Loop",
        "If",
        "Scan",
        "Multinomial",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Bernoulli",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "StringNormalizer",
    ];
    let default_domain = node.domain().is_empty() || node.domain() == "ai.onnx";
    let keeps_type = default_domain
        && !TYPE_CHANGING.contains(&node.op_type())
        && node.input.first().is_some_and(is_float);
    let dequant = default_domain && node.op_type() == "DequantizeLinear";
    node.output
        .iter()
        .enumerate()
        .filter(|(k, o)| match declared.get(*o) {
            Some(&t) => t == 1,
            None => *k == 0 && (keeps_type || dequant),
        })
        .map(|(_, o)| o.clone())
        .collect()
}
