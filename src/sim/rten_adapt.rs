//! What the rten engine alone needs before it runs a model: operator
//! settings it computes wrongly are refused, the default window attributes
//! it needs explicit are written out, and 3-D convolutions (which it lacks)
//! are rewritten into 2-D ones. None of this applies to other backends.

use super::error::SimError;
use crate::onnx::attr::attr_ints;
use crate::onnx::{GraphProto, ModelProto, ValueSpec};
use crate::ops::window::{AutoPad, Window};
use std::collections::HashMap;

/// Applies the rten-only rewrites to a model already prepared for execution.
pub fn adapt_for_rten(model: &mut ModelProto) -> Result<(), SimError> {
    refuse_known_wrong(model)?;
    let g = model.graph.as_mut().ok_or_else(|| SimError::Load {
        reason: "the model holds no graph".into(),
    })?;
    fill_default_window_attributes(g);
    super::conv3d::lower_conv3d(g);
    Ok(())
}

/// Operator settings the engine accepts but computes wrongly (found by the
/// conformance fixtures): refused with an error rather than run silently wrong.
fn refuse_known_wrong(model: &ModelProto) -> Result<(), SimError> {
    let Some(g) = model.graph.as_ref() else {
        return Ok(());
    };
    for (i, n) in g.node.iter().enumerate() {
        let why = match n.op_type() {
            "MaxPool" | "AveragePool" if Window::auto_pad(n) == AutoPad::SameLower => Some(
                "auto_pad SAME_LOWER is computed as SAME_UPPER by the CPU engine; give explicit pads instead",
            ),
            "Resize" if crate::ops::resize::is_cubic(n) => Some(
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
        let kernel = Some(Window::kernel_rank(n)).filter(|&r| r > 0);
        let weight = n
            .input
            .get(1)
            .and_then(|w| ranks.get(w))
            .map(|r| r.saturating_sub(2));
        let Some(spatial) = kernel.or(weight).filter(|&r| r > 0) else {
            continue;
        };
        for (name, value) in Window::absent_defaults(n, spatial) {
            n.attribute.push(attr_ints(name, &value));
        }
    }
}
