//! Refuses models whose shapes would need absurd memory or time before
//! anything is allocated: a declared dimension of 2^40, a pad of a million
//! on both sides of an image, a `ConstantOfShape` of a trillion elements.
//! The check is static (declared shapes, attributes and constant inputs), so
//! it runs in microseconds and names the node or value and the size.

use super::error::OnnxError;
use super::proto::{GraphProto, ModelProto, NodeProto, TensorProto};
use super::{Dim, ValueSpec};

/// The most elements one tensor may have: 2^31 (8 GiB of float32), about
/// ten times the largest activation of common vision models at batch 64.
pub const MAX_ELEMENTS: u64 = 1 << 31;

/// The largest pad, kernel, stride or dilation accepted on one axis.
pub const MAX_WINDOW: i64 = 1 << 20;

/// The error for `what`, which would hold `elements` values.
pub fn too_large(what: String, elements: u64) -> OnnxError {
    OnnxError::TooLarge {
        what,
        size: describe(elements),
        limit: describe(MAX_ELEMENTS),
        hint: "check the model's shapes and attributes (a corrupted or mistyped value?)".into(),
    }
}

/// "3.0e12 elements (12 TiB as float32)".
fn describe(elements: u64) -> String {
    let bytes = elements.saturating_mul(4) as f64;
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{elements} elements ({v:.1} {} as float32)", units[u])
}

/// The product of `dims` (negative entries count as 1), saturating.
pub fn product(dims: impl IntoIterator<Item = i64>) -> u64 {
    dims.into_iter()
        .map(|d| d.max(1) as u64)
        .fold(1u64, u64::saturating_mul)
}

/// What checks one node's own sizes (its attributes and size-giving
/// inputs); the operators' layer gives it (`ops::work::check_node_sizes`).
pub type NodeCheck<'a> = &'a dyn Fn(&GraphProto, &NodeProto) -> Result<(), OnnxError>;

/// Checks every declared shape, initializer and constant of `model`'s graph
/// (subgraphs included), that each node has the first input it needs, and
/// each node with `node_check`. `ops::work::check_model` runs this, then
/// estimates the work of one sample.
pub fn check_sizes(model: &ModelProto, node_check: NodeCheck) -> Result<(), OnnxError> {
    match &model.graph {
        Some(g) => check_graph(g, node_check),
        None => Ok(()),
    }
}

fn check_graph(g: &GraphProto, node_check: NodeCheck) -> Result<(), OnnxError> {
    for v in g.input.iter().chain(&g.output).chain(&g.value_info) {
        let spec = ValueSpec::from_proto(v);
        let Some(dims) = &spec.shape else { continue };
        let n = dims.iter().fold(1u64, |acc, d| match d {
            Dim::Fixed(k) => acc.saturating_mul((*k as u64).max(1)),
            _ => acc,
        });
        if n > MAX_ELEMENTS {
            return Err(too_large(
                format!("value '{}' of shape {}", v.name(), spec.shape_text()),
                n,
            ));
        }
    }
    for t in &g.initializer {
        check_tensor(t, "initializer")?;
    }
    for n in &g.node {
        check_first_input(n)?;
        node_check(g, n)?;
        for a in &n.attribute {
            if let Some(t) = &a.t {
                check_tensor(t, "constant")?;
            }
            for sub in a.g.iter().chain(&a.graphs) {
                check_graph(sub, node_check)?;
            }
        }
    }
    Ok(())
}

fn check_tensor(t: &TensorProto, kind: &str) -> Result<(), OnnxError> {
    let n = product(t.dims.iter().copied());
    if n > MAX_ELEMENTS {
        return Err(too_large(
            format!("{kind} '{}' of dims {:?}", t.name(), t.dims),
            n,
        ));
    }
    Ok(())
}

/// Operators of the default domain that may be called without their first
/// input: it is optional (Loop's trip count) or they take none.
const FIRST_INPUT_OPTIONAL: [&str; 6] = [
    "Constant",
    "Loop",
    "Optional",
    "RandomNormal",
    "RandomUniform",
    "SequenceEmpty",
];

/// Refuses a node of the default domain whose first input is missing or
/// the empty name (which ONNX reserves for an omitted optional input).
fn check_first_input(n: &NodeProto) -> Result<(), OnnxError> {
    let standard = n.domain().is_empty() || n.domain() == "ai.onnx";
    if !standard || FIRST_INPUT_OPTIONAL.contains(&n.op_type()) {
        return Ok(());
    }
    let reason = match n.input.first() {
        None => "it has no inputs",
        Some(first) if first.is_empty() => "its first input is the empty name \"\"",
        Some(_) => return Ok(()),
    };
    Err(OnnxError::Invalid {
        node: n.name().to_string(),
        reason: format!(
            "{reason}, but {} needs it; re-export the model or set the input to the value the node should read",
            n.op_type()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::node;

    fn graph(nodes: Vec<NodeProto>) -> ModelProto {
        ModelProto {
            graph: Some(GraphProto {
                node: nodes,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn check(m: &ModelProto) -> Result<(), OnnxError> {
        check_sizes(m, &|_, _| Ok(()))
    }

    #[test]
    fn a_declared_dim_of_2_pow_40_is_refused() {
        use crate::onnx::proto::tensor_shape_proto::{Dimension, dimension};
        use crate::onnx::proto::{TensorShapeProto, TypeProto, ValueInfoProto, type_proto};
        let dim = |v: i64| Dimension {
            value: Some(dimension::Value::DimValue(v)),
            ..Default::default()
        };
        let mut m = graph(vec![]);
        m.graph.as_mut().unwrap().input.push(ValueInfoProto {
            name: Some("x".into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(TensorShapeProto {
                        dim: vec![dim(1), dim(1 << 40)],
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
        let e = check(&m).unwrap_err().to_string();
        assert!(
            e.contains("value 'x'") && e.contains("1099511627776 elements"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_first_input_is_refused_naming_the_node() {
        for inputs in [&[""][..], &[]] {
            let flatten = node("Flatten", "/flat", inputs, &["y"], vec![]);
            let e = check(&graph(vec![flatten])).unwrap_err().to_string();
            assert!(
                e.starts_with("node '/flat': ") && e.contains("Flatten needs it"),
                "{e}"
            );
        }
        // An omitted optional input is fine, and so is an operator taking none.
        let clip = node("Clip", "c", &["x", "", "hi"], &["y"], vec![]);
        let constant = node("Constant", "k", &[], &["v"], vec![]);
        check(&graph(vec![clip, constant])).unwrap();
    }
}
