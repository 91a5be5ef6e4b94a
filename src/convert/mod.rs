//! Conversion of QDQ models (QuantizeLinear / DequantizeLinear, as written by
//! onnxruntime's `quantize_static`, PyTorch's QAT export, NNCF or ModelOpt)
//! into Ascend's deploy and fake-quant models, with the factors the QDQ model
//! carries: AMCT's `convert_qat_model`. `docs/deploy-format.md` (Converting
//! QDQ models) describes the mapping:
//!
//! * Conv / ConvTranspose / Gemm / MatMul / AveragePool whose input comes
//!   through a Q → DQ pair and whose weight is a quantized constant become
//!   Ascend int8 layers (`AscendQuant → layer → AscendDequant`) with the
//!   pair's scale and zero point (uint8 zero points become `zp − 128`, int8
//!   ones stay) and the weight's scales;
//! * Q → DQ pairs on inputs of Add and MaxPool become tensor quantization
//!   (`AscendQuant → AscendAntiQuant`);
//! * every other pair is removed and the operators it fed run in float; a
//!   `Clip` to the pair's range stays in its place, because exporters fold
//!   a Relu into the pair's range (uint8 with zero point 0);
//! * what Ascend cannot represent is refused naming the node: asymmetric
//!   weights, per-channel activation factors, types other than int8/uint8.
//!   Per-channel weights on Gemm / MatMul (Ascend quantizes those per
//!   tensor) keep the layer in float, with a note.

pub mod qdq;

use crate::onnx::graph::{name_nodes, sort_topologically};
use crate::onnx::{ModelProto, NodeProto, Storage, to_proto};
use crate::quant::amct::proto::{MapFiledEntry, ScaleOffsetRecord, SingleLayerRecord};
use crate::quant::calibrate::Calibrated;
use crate::quant::config::QuantConfig;
use crate::quant::error::QuantError;
use crate::quant::from_record::calibrated_from_record;
use crate::quant::layers::{discover, has_weight};
use crate::quant::prepare::prepare;
use crate::tensor::Tensor;
use qdq::{ConstQuant, Pair, QParams, QType, QdqGraph, analyze};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// An operator that runs in float in the converted model, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FloatOp {
    /// The node.
    pub node: String,
    /// Its operator.
    pub op_type: String,
    /// Why it is not an Ascend int8 operator.
    pub reason: String,
}

/// A converted QDQ model.
pub struct Converted {
    /// The float model with the QDQ model's (dequantized) weights and the
    /// pairs' ranges as Clip.
    pub float: ModelProto,
    /// The layers and tensors with their factors, ready for the deploy and
    /// fake-quant models.
    pub calibrated: Calibrated,
    /// Nodes fed by a Q → DQ pair that run in float.
    pub float_ops: Vec<FloatOp>,
}

/// AMCT's activation offset for a pair's zero point.
fn offset_d(p: &QParams) -> i32 {
    match p.qtype {
        QType::U8 => (p.zero_point[0] - 128) as i32,
        _ => p.zero_point[0] as i32,
    }
}

/// Checks that a pair is an int8/uint8 per-tensor quantization.
fn check_pair(pair: &Pair) -> Result<(), String> {
    let p = &pair.params;
    match p.qtype {
        QType::I8 | QType::U8 => {}
        QType::I32 => {
            return Err(format!(
                "node '{}' quantizes an activation to int32; Ascend quantizes activations to int8",
                pair.quant
            ));
        }
        QType::Other(t) => {
            return Err(format!(
                "node '{}' quantizes an activation to {t}; Ascend quantizes activations to int8 (re-export with int8 or uint8 activations)",
                pair.quant
            ));
        }
    }
    if p.scale.len() != 1 {
        return Err(format!(
            "node '{}' quantizes an activation per channel ({} scales); Ascend takes one scale per activation tensor",
            pair.quant,
            p.scale.len()
        ));
    }
    Ok(())
}

/// The weight scales of a layer's quantized weight, `Err(reason)` to keep
/// the layer in float, or a refusal (outer `Err`) for what Ascend cannot represent.
fn weight_scales(
    op: &str,
    node: &NodeProto,
    w: &ConstQuant,
) -> Result<Result<Vec<f32>, String>, String> {
    let p = &w.params;
    let symmetric_zero = match p.qtype {
        QType::I8 => 0,
        QType::U8 => 128,
        QType::I32 | QType::Other(_) => {
            let t = match p.qtype {
                QType::Other(t) => t.to_string(),
                _ => "int32".into(),
            };
            return Err(format!(
                "node '{}' holds {t} weights for '{}'; Ascend's layers take int8 weights",
                w.node,
                node.name()
            ));
        }
    };
    if p.zero_point.iter().any(|&z| z != symmetric_zero) {
        return Err(format!(
            "node '{}' gives '{}' asymmetric weights (zero point {:?}); Ascend's weights are symmetric: re-export with symmetric weights",
            w.node,
            node.name(),
            p.zero_point.iter().take(4).collect::<Vec<_>>()
        ));
    }
    if p.scale.len() == 1 {
        return Ok(Ok(p.scale.clone()));
    }
    let rank = w.float.ndim() as i64;
    let axis = if p.axis < 0 { p.axis + rank } else { p.axis };
    let group = crate::ops::window::Window::group_of(node);
    Ok(match op {
        "Conv" if axis == 0 => Ok(p.scale.clone()),
        "ConvTranspose" if axis == 1 && group == 1 => Ok(p.scale.clone()),
        "Conv" | "ConvTranspose" => Err(format!(
            "per-channel weight scales on axis {axis}, not the output channels; the layer runs in float"
        )),
        _ => Err(format!(
            "per-channel weight scales ({}); Ascend quantizes {op} weights per tensor, so the layer runs in float",
            p.scale.len()
        )),
    })
}

/// Removes every Q/DQ node: quantized constants become float initializers,
/// slots in `converted` read the pair's float input, every other reader of a
/// pair reads a `Clip` to the pair's range.
fn strip(
    model: &ModelProto,
    qdq: &QdqGraph,
    converted: &HashSet<(String, usize)>,
) -> Result<ModelProto, crate::onnx::OnnxError> {
    let mut m = model.clone();
    let g = m.graph.as_mut().expect("checked by the caller");
    let removed_inputs: HashSet<String> = qdq
        .qdq_nodes
        .iter()
        .flat_map(|&i| g.node[i].input.iter().cloned())
        .collect();
    let mut nodes: Vec<NodeProto> = std::mem::take(&mut g.node)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !qdq.qdq_nodes.contains(i))
        .map(|(_, n)| n)
        .collect();
    let outputs: HashSet<&str> = g.output.iter().map(|o| o.name()).collect();
    let mut added = Vec::new();
    for pair in &qdq.pairs {
        let mut float_readers = outputs.contains(pair.output.as_str());
        for n in nodes.iter_mut() {
            let name = n.name().to_string();
            for (k, input) in n.input.iter_mut().enumerate() {
                if *input == pair.output {
                    if converted.contains(&(name.clone(), k)) {
                        *input = pair.input.clone();
                    } else {
                        float_readers = true;
                    }
                }
            }
        }
        if float_readers {
            let p = &pair.params;
            let (lo, hi) = p.qtype.range();
            let z = p.zero_point[0];
            let base = format!("{}.range", pair.dequant);
            for (suffix, v) in [("min", lo - z), ("max", hi - z)] {
                let t = Tensor::F32(ndarray::arr0(v as f32 * p.scale[0]).into_dyn());
                g.initializer
                    .push(to_proto(&format!("{base}.{suffix}"), &t, Storage::Raw));
            }
            added.push(crate::onnx::builder::node(
                "Clip",
                &base,
                &[&pair.input, &format!("{base}.min"), &format!("{base}.max")],
                &[&pair.output],
                vec![],
            ));
        }
    }
    nodes.extend(added);
    g.node = nodes;
    // Quantized constants become float initializers under the DQ output's name.
    for (name, c) in &qdq.consts {
        g.initializer.retain(|t| t.name() != name);
        g.initializer
            .push(to_proto(name, &Tensor::F32(c.float.clone()), Storage::Raw));
    }
    let used: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    g.initializer
        .retain(|t| used.contains(t.name()) || !removed_inputs.contains(t.name()));
    let produced: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.input.iter().map(|i| i.name().to_string()))
        .collect();
    g.value_info
        .retain(|v| produced.contains(v.name()) && used.contains(v.name()));
    sort_topologically(g)?;
    Ok(m)
}

/// Converts a QDQ model; `file` names it in errors.
pub fn convert(model: &ModelProto, file: &str) -> Result<Converted, QuantError> {
    let fail = |m: String| QuantError::Input(format!("{file}: {m}"));
    let mut m = model.clone();
    let g = crate::onnx::graph_of_mut(&mut m, file)?;
    name_nodes(g);
    let qdq = analyze(g).map_err(fail)?;
    if qdq.pairs.is_empty() {
        return Err(fail(
            "the model has no QuantizeLinear → DequantizeLinear pair; it is not a QDQ model (quantize a float model with `ascend-quant calibrate`)".into(),
        ));
    }
    for p in &qdq.pairs {
        check_pair(p).map_err(fail)?;
    }
    let g = crate::onnx::graph_of(&m, file)?;
    let pair_of: HashMap<&str, &Pair> = qdq.pairs.iter().map(|p| (p.output.as_str(), p)).collect();
    // Layers as calibration finds them in the plain float model.
    let mut plain = strip(&m, &qdq, &HashSet::new())?;
    prepare(&mut plain, false, &[])?;
    let (layers, _) = discover(crate::onnx::graph_of(&plain, file)?)?;
    let mut record = ScaleOffsetRecord::default();
    let mut converted: HashSet<(String, usize)> = HashSet::new();
    let mut float_ops = Vec::new();
    for l in &layers {
        let Some(node) = g.node.iter().find(|n| n.name() == l.name) else {
            continue;
        };
        let Some(pair) = node.input.first().and_then(|i| pair_of.get(i.as_str())) else {
            continue; // not quantized in the QDQ model
        };
        let scale_w = if has_weight(&l.op_type) {
            let w = node.input.get(1).and_then(|w| qdq.consts.get(w));
            let Some(w) = w else {
                float_ops.push(FloatOp {
                    node: l.name.clone(),
                    op_type: l.op_type.clone(),
                    reason: "its weight is not quantized in the QDQ model".into(),
                });
                continue;
            };
            match weight_scales(&l.op_type, node, w).map_err(fail)? {
                Ok(s) => s,
                Err(reason) => {
                    float_ops.push(FloatOp {
                        node: l.name.clone(),
                        op_type: l.op_type.clone(),
                        reason,
                    });
                    continue;
                }
            }
        } else {
            vec![1.0]
        };
        converted.insert((l.name.clone(), 0));
        record.record.push(MapFiledEntry {
            key: Some(l.name.clone()),
            value: Some(SingleLayerRecord {
                scale_d: Some(pair.params.scale[0]),
                offset_d: Some(offset_d(&pair.params)),
                offset_w: vec![0; scale_w.len()],
                scale_w,
                ..Default::default()
            }),
        });
    }
    // Pairs feeding Add and MaxPool: tensor quantization.
    for n in &g.node {
        if !crate::quant::tensor_quant::TENSOR_QUANT_OPS.contains(&n.op_type()) {
            continue;
        }
        for (k, input) in n.input.iter().enumerate() {
            if let Some(pair) = pair_of.get(input.as_str()) {
                converted.insert((n.name().to_string(), k));
                record.record.push(MapFiledEntry {
                    key: Some(format!("{}:{k}", n.name())),
                    value: Some(SingleLayerRecord {
                        scale_d: Some(pair.params.scale[0]),
                        offset_d: Some(offset_d(&pair.params)),
                        is_tensor_quantize: Some(true),
                        ..Default::default()
                    }),
                });
            }
        }
    }
    // Every other reader of a pair runs in float.
    for n in &g.node {
        if n.op_type() == "QuantizeLinear" || n.op_type() == "DequantizeLinear" {
            continue;
        }
        let reads_pair = n.input.iter().enumerate().any(|(k, i)| {
            pair_of.contains_key(i.as_str()) && !converted.contains(&(n.name().to_string(), k))
        });
        if reads_pair && !float_ops.iter().any(|f| f.node == n.name()) {
            float_ops.push(FloatOp {
                node: n.name().to_string(),
                op_type: n.op_type().to_string(),
                reason: "Ascend has no int8 form of this operator: its Q/DQ pair is removed (a Clip keeps the pair's range)".into(),
            });
        }
    }
    let float = strip(&m, &qdq, &converted)?;
    let mut names_model = float.clone();
    prepare(&mut names_model, false, &[])?;
    let (all, _) = discover(crate::onnx::graph_of(&names_model, file)?)?;
    let names: Vec<(String, String)> = all.into_iter().map(|l| (l.name, l.op_type)).collect();
    let mut config = QuantConfig::default_for(&names);
    config.do_fusion = false;
    let calibrated = calibrated_from_record(float.clone(), &config, &record, file)?;
    Ok(Converted {
        float,
        calibrated,
        float_ops,
    })
}
