//! FORCE_FP16_QUANT applied to emitted models (AMCT's
//! `fakequant_precision_mode`, `docs/deploy-format.md`, FP16 quant). The
//! record is unchanged; the deploy model's dequantization factors are
//! truncated to AMCT's "S19" and the model is marked, so the simulator
//! applies each `AscendQuant`'s scale at fp16 precision as the device does;
//! the fake-quant model's quant chains multiply by the fp16 scale and its
//! dequantizations by the S19 factors.

use crate::deploy_format::fp16_quant::{mark, s19, to_fp16};
use crate::deploy_format::{ASCEND_DEQUANT, pack_deq_scale_bits, unpack_deq_scale};
use crate::onnx::proto::TensorProto;
use crate::onnx::{ModelProto, Storage, to_proto, to_tensor};
use crate::tensor::Tensor;

/// The deploy model: every `AscendDequant`'s factors truncated to S19
/// (shift and weight-offset bits kept), and the FORCE_FP16_QUANT mark.
pub fn apply_to_deploy(model: &mut ModelProto) {
    mark(model);
    let Some(g) = model.graph.as_mut() else {
        return;
    };
    let params: Vec<String> = g
        .node
        .iter()
        .filter(|n| n.op_type() == ASCEND_DEQUANT)
        .filter_map(|n| n.input.get(1).cloned())
        .collect();
    for t in g
        .initializer
        .iter_mut()
        .filter(|t| params.iter().any(|p| p == t.name()))
    {
        if let Ok(Tensor::U64(packed)) = to_tensor(t) {
            let truncated = packed.mapv(|v| {
                let d = unpack_deq_scale(v);
                pack_deq_scale_bits(s19(d.scale), d.shift, d.offset_w)
            });
            *t = renamed_like(t, &Tensor::U64(truncated));
        }
    }
}

/// The fake-quant model: each quant chain's scale constant at fp16
/// precision, each dequantization's factors truncated to S19.
pub fn apply_to_fake_quant(model: &mut ModelProto) {
    map_constants(model, |output| {
        if output.ends_with(".quant.fakequant.scale.value") {
            Some(to_fp16)
        } else if output.ends_with(".dequant.fakequant.scale.value") {
            Some(s19)
        } else {
            None
        }
    });
}

/// The internal QDQ model (the report's cosines, `auto`'s built-in
/// metrics): each `QuantizeLinear` divides by `1 / fp16(1 / scale_d)`, so its
/// codes are the device's; the dequantization keeps float32 factors (an
/// approximation for a report, not an output).
pub fn apply_to_simulation(model: &mut ModelProto) {
    fn inverse_at_fp16(scale: f32) -> f32 {
        1.0 / to_fp16(1.0 / scale)
    }
    map_constants(model, |output| {
        output
            .ends_with(".quant.qdq.scale.value")
            .then_some(inverse_at_fp16 as fn(f32) -> f32)
    });
}

/// Applies the function `which` gives for a float32 `Constant`'s output
/// name to each of its values (constants it gives none for are left alone).
fn map_constants(model: &mut ModelProto, which: impl Fn(&str) -> Option<fn(f32) -> f32>) {
    let Some(g) = model.graph.as_mut() else {
        return;
    };
    for n in g.node.iter_mut().filter(|n| n.op_type() == "Constant") {
        let Some(out) = n.output.first().cloned() else {
            continue;
        };
        let Some(f) = which(&out) else { continue };
        for a in n.attribute.iter_mut().filter(|a| a.name() == "value") {
            if let Some(t) = a.t.as_mut()
                && let Ok(Tensor::F32(v)) = to_tensor(t)
            {
                *t = to_proto(&out, &Tensor::F32(v.mapv(f)), Storage::Raw);
            }
        }
    }
}

/// Reads the configuration key `fakequant_precision_mode` (JSON and retrain
/// JSON): `Ok` only for AMCT's one mode.
pub fn read_json_mode(v: &serde_json::Value) -> Result<(), String> {
    let mode = crate::deploy_format::fp16_quant::FORCE_FP16_QUANT;
    if v.as_str() == Some(mode) {
        Ok(())
    } else {
        Err(format!(
            "'fakequant_precision_mode' is {v}; the one mode is \"{mode}\" (leave the key out for float32 scales)"
        ))
    }
}

/// `value` stored under `t`'s name and doc string.
fn renamed_like(t: &TensorProto, value: &Tensor) -> TensorProto {
    let mut fresh = to_proto(t.name(), value, Storage::Typed);
    fresh.doc_string = t.doc_string.clone();
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::GraphProto;
    use crate::onnx::builder::constant_f32;

    fn value(m: &ModelProto, output: &str) -> f32 {
        let n = m
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .find(|n| n.output[0] == output)
            .unwrap();
        let Ok(Tensor::F32(v)) = to_tensor(n.attribute[0].t.as_ref().unwrap()) else {
            panic!("float constant")
        };
        v.iter().copied().next().unwrap()
    }

    #[test]
    fn each_model_gets_its_own_rounding_and_nothing_else_changes() {
        let names = [
            "L.quant.qdq.scale.value",
            "L.quant.fakequant.scale.value",
            "L.dequant.fakequant.scale.value",
            "L.other.value",
        ];
        let model = ModelProto {
            graph: Some(GraphProto {
                node: names
                    .iter()
                    .map(|n| constant_f32(n, n, &[], vec![0.303_030_3]))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // 1/0.3030303 = 3.3000002 in float32, 3.30078125 at fp16.
        let s16 = 3.300_781_3f32;
        let s19 = f32::from_bits(0.303_030_3f32.to_bits() & 0xFFFF_E000);
        let mut sim = model.clone();
        apply_to_simulation(&mut sim);
        assert_eq!(value(&sim, names[0]), 1.0 / s16);
        let mut fake = model.clone();
        apply_to_fake_quant(&mut fake);
        assert_eq!(
            value(&fake, names[1]),
            half::f16::from_f32(0.303_030_3).to_f32()
        );
        assert_eq!(value(&fake, names[2]), s19);
        for m in [&sim, &fake] {
            assert_eq!(value(m, names[3]), 0.303_030_3);
        }
        assert_eq!(value(&sim, names[1]), 0.303_030_3);
        assert_eq!(value(&fake, names[0]), 0.303_030_3);
    }
}
