//! Engine-independent preparation of a model for execution, and checks of
//! fed tensors against the model's declared inputs.

use super::SessionOptions;
use super::error::SimError;
use crate::onnx::proto::tensor_shape_proto::{Dimension, dimension};
use crate::onnx::proto::type_proto;
use crate::onnx::proto::{AttributeProto, attribute_proto};
use crate::onnx::{Dim, GraphProto, ModelProto, ValueInfoProto, ValueSpec};
use crate::tensor::{Tensor, onnx_type_name};
use std::collections::{HashMap, HashSet};

/// Operator settings the engine accepts but computes wrongly (found by the
/// conformance fixtures): refused with an error rather than run silently wrong.
pub fn refuse_known_wrong(model: &ModelProto) -> Result<(), SimError> {
    let g = model
        .graph
        .as_ref()
        .expect("loaded models always have a graph");
    for (i, n) in g.node.iter().enumerate() {
        let attr_s = |name: &str| {
            n.attribute
                .iter()
                .find(|a| a.name() == name)
                .map(|a| a.s().to_vec())
        };
        let why = match n.op_type() {
            "MaxPool" | "AveragePool" if attr_s("auto_pad").as_deref() == Some(b"SAME_LOWER") => {
                Some(
                    "auto_pad SAME_LOWER is computed as SAME_UPPER by the CPU engine; give explicit pads instead",
                )
            }
            "Resize" if attr_s("mode").as_deref() == Some(b"cubic") => Some(
                "cubic Resize is computed wrongly by the CPU engine in most coordinate modes; use linear, or run the model elsewhere",
            ),
            _ => None,
        };
        if let Some(why) = why {
            let label = crate::onnx::graph::node_label(g, i);
            return Err(SimError::Load {
                reason: format!("node '{label}' ({}): {why}", n.op_type()),
            });
        }
    }
    Ok(())
}

/// Returns a copy of `model` rewritten for execution: every node named (so
/// engine errors can name it), kept values added as graph outputs, and axis 0
/// made symbolic when a dynamic batch is asked for.
pub fn rewrite_for_execution(model: &ModelProto, opts: &SessionOptions) -> ModelProto {
    let mut m = model.clone();
    let g = m.graph.as_mut().expect("loaded models always have a graph");
    crate::onnx::graph::name_nodes(g);
    fill_default_window_attributes(g);
    super::conv3d::lower_conv3d(g);
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name().to_string()).collect();
    let inputs: HashSet<String> = g.input.iter().map(|o| o.name().to_string()).collect();
    for k in &opts.keep {
        if !outputs.contains(k) && !inputs.contains(k) {
            g.output.push(ValueInfoProto {
                name: Some(k.clone()),
                ..Default::default()
            });
        }
    }
    if opts.dynamic_batch {
        for v in g.input.iter_mut().chain(g.output.iter_mut()) {
            free_batch_axis(v);
        }
        g.value_info.clear();
    }
    m
}

/// Writes out the defaults ONNX gives to `strides`, `dilations` and `pads`
/// of convolutions and pools when they are absent. The engine needs them
/// explicit, and the meaning of the model is unchanged.
fn fill_default_window_attributes(g: &mut GraphProto) {
    let mut ranks: HashMap<String, usize> = g
        .initializer
        .iter()
        .map(|t| (t.name().to_string(), t.dims.len()))
        .collect();
    for v in g.input.iter().chain(&g.value_info) {
        if let Some(dims) = ValueSpec::from_proto(v).shape {
            ranks.insert(v.name().to_string(), dims.len());
        }
    }
    for n in &mut g.node {
        let op = n.op_type();
        if !n.domain().is_empty()
            || ![
                "Conv",
                "ConvInteger",
                "ConvTranspose",
                "MaxPool",
                "AveragePool",
            ]
            .contains(&op)
        {
            continue;
        }
        let kernel = n
            .attribute
            .iter()
            .find(|a| a.name() == "kernel_shape")
            .map(|a| a.ints.len());
        let weight = n
            .input
            .get(1)
            .and_then(|w| ranks.get(w))
            .map(|r| r.saturating_sub(2));
        let Some(spatial) = kernel.or(weight).filter(|&r| r > 0) else {
            continue;
        };
        let auto_pad = n
            .attribute
            .iter()
            .find(|a| a.name() == "auto_pad")
            .map(|a| a.s().to_vec());
        let explicit_pads = auto_pad.is_none_or(|p| p == b"NOTSET");
        let mut defaults = vec![("strides", vec![1; spatial])];
        if op != "AveragePool" && op != "MaxPool" {
            defaults.push(("dilations", vec![1; spatial]));
        }
        if explicit_pads {
            defaults.push(("pads", vec![0; 2 * spatial]));
        }
        for (name, value) in defaults {
            if !n.attribute.iter().any(|a| a.name() == name) {
                n.attribute.push(AttributeProto {
                    name: Some(name.into()),
                    r#type: Some(attribute_proto::AttributeType::Ints as i32),
                    ints: value,
                    ..Default::default()
                });
            }
        }
    }
}

fn free_batch_axis(v: &mut ValueInfoProto) {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        return;
    };
    if let Some(first) = t.shape.as_mut().and_then(|s| s.dim.first_mut()) {
        *first = Dimension {
            value: Some(dimension::Value::DimParam("batch".into())),
            denotation: first.denotation.take(),
        };
    }
}

/// The graph inputs that must be fed: declared inputs that no initializer backs.
pub fn feedable_inputs(model: &ModelProto) -> Vec<ValueSpec> {
    let g = model
        .graph
        .as_ref()
        .expect("loaded models always have a graph");
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    g.input
        .iter()
        .filter(|v| !inits.contains(v.name()))
        .map(ValueSpec::from_proto)
        .collect()
}

/// Checks a fed tensor against its declared element type and shape.
pub fn check_feed(spec: &ValueSpec, value: &Tensor, dynamic_batch: bool) -> Result<(), SimError> {
    let mismatch = |reason: String| SimError::InputMismatch {
        name: spec.name.clone(),
        reason,
    };
    if let Some(code) = spec.elem_type
        && code != value.dtype().onnx_code()
    {
        return Err(mismatch(format!(
            "got {} data but the model expects {}; convert the data",
            value.dtype(),
            onnx_type_name(code)
        )));
    }
    let Some(dims) = &spec.shape else {
        return Ok(());
    };
    let shape = value.shape();
    if dims.len() != shape.len() {
        return Err(mismatch(format!(
            "got rank {} {} but the model expects rank {} {}",
            shape.len(),
            crate::tensor::format_shape(shape),
            dims.len(),
            spec.shape_text()
        )));
    }
    for (axis, (d, &n)) in dims.iter().zip(shape).enumerate() {
        if let Dim::Fixed(want) = d
            && *want != n
            && !(dynamic_batch && axis == 0)
        {
            return Err(mismatch(format!(
                "axis {axis} has size {n} but the model expects {want} (shape {}); got {}",
                spec.shape_text(),
                crate::tensor::format_shape(shape)
            )));
        }
    }
    Ok(())
}
