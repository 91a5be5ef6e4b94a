//! Quantization from a record the user supplies (AMCT's `convert_model`):
//! the factors come from the file instead of calibration. Every entry is
//! checked against the prepared model before anything is built.

use super::amct::proto::{MapFiledEntry, ScaleOffsetRecord, SingleLayerRecord};
use super::calibrate::{Calibrated, WeightScales, prepare_layers, weigh};
use super::config::{QuantConfig, TensorQuantConfig};
use super::error::QuantError;
use super::layers::{QuantLayer, has_weight};
use super::params::{ActParams, int_range};
use super::tensor_quant::{TensorFactors, resolve};
use crate::onnx::GraphProto;
use crate::onnx::ModelProto;
use std::collections::HashSet;

/// The prepared model and the factors `record` (read from `file`) gives its
/// layers; layers the record does not name stay float.
pub fn calibrated_from_record(
    model: ModelProto,
    config: &QuantConfig,
    record: &ScaleOffsetRecord,
    file: &str,
) -> Result<Calibrated, QuantError> {
    let (prepared, preparation, layers, mut candidates) = prepare_layers(model, config)?;
    let fail = |message: String| QuantError::Input(format!("{file}: {message}"));
    let mut seen = HashSet::new();
    let mut tensor_entries = Vec::new();
    for entry in &record.record {
        let key = entry.key();
        if entry.value.as_ref().is_some_and(|v| v.is_tensor_quantize()) {
            if !seen.insert(key) {
                return Err(fail(format!(
                    "'{key}' appears twice; keep one entry per tensor"
                )));
            }
            tensor_entries.push(entry);
            continue;
        }
        if !seen.insert(key) {
            return Err(fail(format!(
                "layer '{key}' appears twice; keep one entry per layer"
            )));
        }
        if !layers.iter().any(|l| l.name == key) {
            let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
            return Err(fail(format!(
                "the record names layer '{key}', which the model does not have or cannot quantize; the model's quantizable layers are: {} (a record made after BatchNormalization folding needs the same do_fusion setting)",
                names.join(", ")
            )));
        }
    }
    let graph = crate::onnx::graph_of(&prepared, "the prepared model")?;
    let tensors = tensor_factors(graph, &tensor_entries).map_err(fail)?;
    let mut factors = Vec::new();
    for layer in layers {
        let Some(value) = record
            .record
            .iter()
            .find(|e| e.key() == layer.name)
            .map(|e| e.value.clone().unwrap_or_default())
        else {
            continue;
        };
        let (act, scales) = layer_factors(&layer, &value).map_err(fail)?;
        let balance = &value.tensor_balance_factor;
        if let Some(bad) = balance.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(fail(format!(
                "layer '{}': tensor_balance_factor holds {bad}; factors must be positive and finite",
                layer.name
            )));
        }
        let balance = (!balance.is_empty()).then(|| balance.clone());
        factors.push(weigh(graph, layer, act, scales, balance).map_err(|e| fail(e.to_string()))?);
    }
    for c in &mut candidates {
        if c.quantizable && !factors.iter().any(|f| f.layer.name == c.node) {
            c.quantizable = false;
            c.note = Some(format!("not in the record {file}"));
        }
    }
    Ok(Calibrated {
        prepared,
        preparation,
        candidates,
        factors,
        tensors,
        adaround: Vec::new(),
        batches_used: 0,
        seconds: 0.0,
        fp16_quant: config.fp16_quant,
    })
}

/// The activation factors and weight scales of one record entry, checked
/// the way AMCT checks them (positive finite scales, an int8 offset, zero
/// weight offsets, one scale or one per output channel).
fn layer_factors(
    layer: &QuantLayer,
    value: &SingleLayerRecord,
) -> Result<(ActParams, WeightScales), String> {
    let name = &layer.name;
    let act = act_factors(name, value)?;
    let scale_w = &value.scale_w;
    if let Some(bad) = scale_w
        .iter()
        .find(|s| !(s.is_finite() && **s > 0.0 && (1.0 / **s).is_finite()))
    {
        return Err(format!(
            "layer '{name}': scale_w holds {bad}; every weight scale must be a positive finite number"
        ));
    }
    if value.offset_w.iter().any(|&o| o != 0) {
        return Err(format!(
            "layer '{name}': offset_w must be 0 (Ascend's weights are symmetric)"
        ));
    }
    if !value.offset_w.is_empty() && value.offset_w.len() != scale_w.len() {
        return Err(format!(
            "layer '{name}': {} offset_w values for {} scale_w values; give one per scale",
            value.offset_w.len(),
            scale_w.len()
        ));
    }
    if layer.second_input.is_some() {
        // docs/deploy-format.md, two-input MatMul: both operands symmetric.
        if act.offset != 0 || scale_w.len() != 1 {
            return Err(format!(
                "layer '{name}' is a MatMul of two computed values: Ascend quantizes both symmetrically, so it needs offset_d 0 and one scale_w (the second input's scale), not offset_d {} and {} scale_w values",
                act.offset,
                scale_w.len()
            ));
        }
        return Ok((act, WeightScales::Given(scale_w.clone())));
    }
    if !has_weight(&layer.op_type) {
        if !(scale_w.is_empty() || scale_w == &[1.0]) {
            return Err(format!(
                "layer '{name}' is {} and has no weight; its scale_w must be absent or 1",
                layer.op_type
            ));
        }
        return Ok((act, WeightScales::Given(vec![1.0])));
    }
    let channels = layer.channel_layout.channels();
    let allowed = if channels > 1 {
        format!("1 or {channels} (one per output channel)")
    } else {
        "1 (this layer has no per-channel weight scales)".to_string()
    };
    if !(scale_w.len() == 1 || scale_w.len() == channels) {
        return Err(format!(
            "layer '{name}' ({}) has {} scale_w values; allowed: {allowed}",
            layer.op_type,
            scale_w.len()
        ));
    }
    Ok((act, WeightScales::Given(scale_w.clone())))
}

/// The activation factors of a record entry: a positive finite `scale_d`
/// and an int8 `offset_d`.
fn act_factors(name: &str, value: &SingleLayerRecord) -> Result<ActParams, String> {
    let scale = value.scale_d.ok_or_else(|| {
        format!("cannot find scale_d of layer '{name}'; every entry needs scale_d")
    })?;
    if !(scale.is_finite() && scale > 0.0 && (1.0 / scale).is_finite()) {
        return Err(format!(
            "layer '{name}': scale_d = {scale}; it must be a positive finite number"
        ));
    }
    let offset = value.offset_d();
    let (lo, hi) = int_range(8);
    if !(lo..=hi).contains(&offset) {
        return Err(format!(
            "layer '{name}': offset_d = {offset} is outside the int8 range [{lo}, {hi}]"
        ));
    }
    Ok(ActParams { scale, offset })
}

/// The tensor quantizations of `is_tensor_quantize` entries, keyed
/// `NODE:INPUT_INDEX`, resolved in the prepared graph.
fn tensor_factors(
    graph: &GraphProto,
    entries: &[&MapFiledEntry],
) -> Result<Vec<TensorFactors>, String> {
    let mut configs = Vec::new();
    let mut acts = Vec::new();
    for e in entries {
        let key = e.key();
        let (node, index) = key
            .rsplit_once(':')
            .and_then(|(n, i)| Some((n, i.parse::<usize>().ok()?)))
            .ok_or_else(|| {
                format!("'{key}' has is_tensor_quantize set; its key must be NODE:INPUT_INDEX")
            })?;
        let value = e.value.clone().unwrap_or_default();
        if !value.scale_w.is_empty() {
            return Err(format!(
                "'{key}' is a tensor quantization and has no weight; remove its scale_w"
            ));
        }
        acts.push(act_factors(key, &value)?);
        configs.push(TensorQuantConfig {
            layer_name: node.to_string(),
            input_index: index,
            act_algo: Default::default(),
            asymmetric: None,
        });
    }
    let resolved = resolve(graph, &configs)?;
    Ok(resolved
        .into_iter()
        .zip(configs.iter().zip(acts))
        .map(|((node, op_type, input), (c, act))| TensorFactors {
            key: c.key(),
            node,
            op_type,
            input_index: c.input_index,
            input,
            act,
        })
        .collect())
}
