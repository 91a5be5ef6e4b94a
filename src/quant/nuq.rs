//! NUQ applied to the layers of a model: which layers it can take (Conv with
//! group 1 and dilation 1 over a 2-D kernel, and Gemm, as AMCT), how their
//! weights meet the input channels, and the rewrite of a layer's int8
//! weight. The level search itself is [`super::weights::nuq_quantize`].

use super::dmq::{ChannelAxes, balance_weight};
use super::emit::LayerFactors;
use super::error::QuantError;
use super::layers::QuantLayer;
use super::weights::{ChannelLayout, InputMap, NuqSettings, NuqSummary, nuq_quantize};
use crate::onnx::GraphProto;
use crate::onnx::graph::initializer_f32;
use crate::ops::gemm::Gemm;
use crate::ops::window::Window;

/// How `layer`'s weight meets its input channels, or why NUQ cannot take it.
pub fn nuq_map(graph: &GraphProto, layer: &QuantLayer) -> Result<InputMap, String> {
    let node = &graph.node[layer.node];
    let dims: Vec<usize> = layer
        .weight
        .as_ref()
        .and_then(|w| graph.initializer.iter().find(|t| t.name() == w))
        .map(|t| t.dims.iter().map(|&d| d.max(0) as usize).collect())
        .unwrap_or_default();
    match layer.op_type.as_str() {
        "Conv" => {
            let group = Window::group_of(node);
            let dilated = Window::dilates(node);
            if dims.len() != 4 || group != 1 || dilated {
                return Err(format!(
                    "NUQ takes 2-D convolutions with group 1 and dilation 1; this one has a {}-D weight, group {group}{}; it stays uniform",
                    dims.len(),
                    if dilated { ", dilation > 1" } else { "" }
                ));
            }
            Ok(InputMap::Conv {
                cin: dims[1],
                taps: dims[2] * dims[3],
            })
        }
        "Gemm" if dims.len() == 2 && Gemm::parse(node).is_ok_and(|g| !g.trans_b) => {
            Ok(InputMap::KByN {
                k: dims[0],
                n: dims[1],
            })
        }
        op => Err(format!(
            "NUQ takes Conv and Gemm layers; this {op} stays uniform"
        )),
    }
}

/// Replaces the layer's uniform int8 weight by its NUQ weight and records
/// what was done; a layer NUQ cannot take keeps its weight and gets a note.
pub fn apply_nuq(
    graph: &GraphProto,
    factors: &mut LayerFactors,
    settings: NuqSettings,
    moments: Option<&[f64]>,
) -> Result<(), QuantError> {
    let map = match nuq_map(graph, &factors.layer) {
        Ok(m) => m,
        Err(note) => {
            factors.nuq = Some(NuqSummary {
                note: Some(note),
                ..Default::default()
            });
            return Ok(());
        }
    };
    let (Some(q), Some(w_name)) = (&factors.weight_q, &factors.layer.weight) else {
        return Ok(());
    };
    let Some(mut w) = initializer_f32(graph, w_name)? else {
        return Ok(()); // weighing already refused non-float weights
    };
    if let (Some(s), Some(axes)) = (&factors.balance, ChannelAxes::of(graph, &factors.layer)) {
        w = balance_weight(&w, s, axes);
    }
    let layout = if factors.scale_w.len() == 1 {
        ChannelLayout::PerTensor
    } else {
        factors.layer.channel_layout
    };
    let result = nuq_quantize(&w, q, &factors.scale_w, layout, map, moments, settings);
    factors.weight_q = Some(result.weight_q);
    factors.nuq = Some(result.summary);
    Ok(())
}
