//! Engine-independent preparation of a model for execution (any backend,
//! the NPU's included), and checks of fed tensors against the model's
//! declared inputs. What one engine alone needs lives in that engine's file.

use super::SessionOptions;
use super::error::SimError;
use crate::onnx::proto::tensor_shape_proto::{Dimension, dimension};
use crate::onnx::proto::type_proto;
use crate::onnx::{Dim, ModelProto, ValueInfoProto, ValueSpec};
use crate::tensor::{Tensor, onnx_type_name};
use std::collections::HashSet;

/// Returns a copy of `model` rewritten for execution: every node named (so
/// engine errors can name it), kept values added as graph outputs, and axis 0
/// made symbolic when a dynamic batch is asked for. The meaning of the model
/// is unchanged.
pub fn rewrite_for_execution(
    model: &ModelProto,
    opts: &SessionOptions,
) -> Result<ModelProto, SimError> {
    crate::ops::work::check_model(model).map_err(|e| SimError::Load {
        reason: e.to_string(),
    })?;
    let mut m = model.clone();
    crate::deploy_format::fp16_quant::for_execution(&mut m);
    let g = m.graph.as_mut().ok_or_else(|| SimError::Load {
        reason: "the model holds no graph".into(),
    })?;
    crate::onnx::graph::name_nodes(g);
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
    Ok(m)
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
    let Some(g) = model.graph.as_ref() else {
        return Vec::new();
    };
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
