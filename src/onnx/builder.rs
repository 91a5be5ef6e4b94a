//! Small constructors for the nodes, attributes and constants that model
//! rewrites insert.

use super::proto::attribute_proto::AttributeType;
use super::proto::{AttributeProto, GraphProto, NodeProto};
use super::tensor_proto::{Storage, to_proto};
use crate::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};

/// A node of the default domain.
pub fn node(
    op_type: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attributes: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: Some(op_type.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attributes,
        ..Default::default()
    }
}

/// A `Constant` node producing a float32 tensor of `shape` (empty = scalar).
pub fn constant_f32(name: &str, output: &str, shape: &[usize], values: Vec<f32>) -> NodeProto {
    let value =
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), values).expect("shape matches values"));
    constant(name, output, &value)
}

/// A `Constant` node producing `value`.
pub fn constant(name: &str, output: &str, value: &Tensor) -> NodeProto {
    let t = to_proto(output, value, Storage::Raw);
    let a = AttributeProto {
        name: Some("value".into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    };
    node("Constant", name, &[], &[output], vec![a])
}

/// Gives input `input` of node `node` the constant `value`: the initializer it
/// names is replaced in place (keeping its name and doc string) when nothing
/// else reads it, else a new initializer `new_name` is added for this node.
pub fn set_initializer_input(
    graph: &mut GraphProto,
    node: usize,
    input: usize,
    new_name: &str,
    value: &Tensor,
    storage: Storage,
) {
    let old = graph.node[node].input[input].clone();
    let shared = graph
        .node
        .iter()
        .enumerate()
        .any(|(j, n)| j != node && n.input.contains(&old))
        || graph
            .input
            .iter()
            .chain(&graph.output)
            .any(|v| v.name() == old);
    match graph
        .initializer
        .iter_mut()
        .find(|t| t.name() == old)
        .filter(|_| !shared)
    {
        Some(t) => {
            let mut fresh = to_proto(&old, value, storage);
            fresh.doc_string = t.doc_string.take();
            *t = fresh;
        }
        None => {
            graph.initializer.push(to_proto(new_name, value, storage));
            graph.node[node].input[input] = new_name.to_string();
        }
    }
}
