//! The Ascend deploy format, in one place: the quantization operators and
//! their attributes, the packing of `deq_scale`, and how the nodes and
//! tensors that quantization adds are named. `quant::emit` writes with these
//! functions; `sim::ascend` and `report::compare` read with them. The format
//! is described in `docs/deploy-format.md`.

use crate::onnx::NodeProto;
use crate::onnx::attr::{attr_float, attr_int, attr_string, float_attr};
use crate::onnx::proto::AttributeProto;

/// Quantizes float activations to int8: `int8(clip(round(x·scale + offset)))`.
pub const ASCEND_QUANT: &str = "AscendQuant";
/// Turns the int32 accumulator of a quantized layer back into float.
pub const ASCEND_DEQUANT: &str = "AscendDequant";
/// Turns int8 values back into float: `(q − offset)·scale`.
pub const ASCEND_ANTI_QUANT: &str = "AscendAntiQuant";

/// Whether `op_type` is one of the Ascend-specific operators of deploy models.
pub fn is_ascend_op(op_type: &str) -> bool {
    op_type.starts_with("Ascend")
}

/// The attributes of an `AscendQuant` node. Note that `scale` is the
/// *reciprocal* of the activation scale `scale_d` of the record file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantAttrs {
    /// `1 / scale_d`, as float32.
    pub scale: f32,
    /// The activation offset `offset_d` (an integer in [-128, 127]) as a float.
    pub offset: f32,
}

impl QuantAttrs {
    /// The attributes for activation factors `scale_d`, `offset_d`.
    pub fn from_factors(scale_d: f32, offset_d: i32) -> QuantAttrs {
        QuantAttrs {
            scale: 1.0 / scale_d,
            offset: offset_d as f32,
        }
    }

    /// The activation scale `scale_d` these attributes encode.
    pub fn scale_d(&self) -> f32 {
        1.0 / self.scale
    }

    /// The node attributes: `scale`, `offset` (FLOAT) and `dst_type` "INT8".
    pub fn to_attributes(self) -> Vec<AttributeProto> {
        vec![
            attr_float("scale", self.scale),
            attr_float("offset", self.offset),
            attr_string("dst_type", "INT8"),
        ]
    }

    /// Reads the attributes of an `AscendQuant` node; the error says which
    /// one is missing or unusable.
    pub fn read(node: &NodeProto) -> Result<QuantAttrs, String> {
        let get = |name: &str| {
            float_attr(node, name).ok_or_else(|| format!("no FLOAT '{name}' attribute"))
        };
        let scale = get("scale")?;
        let offset = get("offset")?;
        if !scale.is_finite() || scale <= 0.0 {
            return Err(format!("'scale' is {scale}; it must be a positive number"));
        }
        if offset.fract() != 0.0 || !(-128.0..=127.0).contains(&offset) {
            return Err(format!(
                "'offset' is {offset}; it must be an integer in [-128, 127]"
            ));
        }
        Ok(QuantAttrs { scale, offset })
    }
}

/// The attributes of an `AscendAntiQuant` node, as AMCT writes them:
/// `scale` = `scale_d` (not its reciprocal), `offset` = `offset_d`, so that
/// ATC (which negates the offset when it reads the node) computes
/// `y = (q − offset_d) · scale_d`; `dst_type` "INT8" names the input type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AntiQuantAttrs {
    /// `scale_d`.
    pub scale: f32,
    /// `offset_d` as a float.
    pub offset: f32,
}

impl AntiQuantAttrs {
    /// The attributes for activation factors `scale_d`, `offset_d`.
    pub fn from_factors(scale_d: f32, offset_d: i32) -> AntiQuantAttrs {
        AntiQuantAttrs {
            scale: scale_d,
            offset: offset_d as f32,
        }
    }

    /// The node attributes.
    pub fn to_attributes(self) -> Vec<AttributeProto> {
        vec![
            attr_float("scale", self.scale),
            attr_float("offset", self.offset),
            attr_string("dst_type", "INT8"),
        ]
    }

    /// Reads the attributes of an `AscendAntiQuant` node.
    pub fn read(node: &NodeProto) -> Result<AntiQuantAttrs, String> {
        // Same checks as AscendQuant's: a positive scale and an int8 offset.
        let q = QuantAttrs::read(node)?;
        Ok(AntiQuantAttrs {
            scale: q.scale,
            offset: q.offset,
        })
    }
}

/// The attributes of an `AscendDequant` node: `dtype` 0 (float32 output).
pub fn dequant_attributes() -> Vec<AttributeProto> {
    vec![attr_int("dtype", 0)]
}

/// One element of a `deq_scale` tensor, unpacked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeqScale {
    /// The float32 dequantization factor (bits 0-31).
    pub scale: f32,
    /// The shift factor N (bits 32-39); 0 for plain int8 quantization.
    pub shift: u8,
    /// The weight offset (bits 40-47); 0 since weights are symmetric.
    pub offset_w: i8,
}

/// The dequantization factor of one channel: `float32(scale_w · scale_d)`.
pub fn deq_factor(scale_w: f32, scale_d: f32) -> f32 {
    scale_w * scale_d
}

/// Packs a dequantization factor as the device reads it: the float32 bits
/// in the low 32 bits, shift and weight offset zero, bits 48-63 zero.
pub fn pack_deq_scale(deq: f32) -> u64 {
    u64::from(deq.to_bits())
}

/// Packs a `deq_scale` element from all its fields.
pub fn pack_deq_scale_bits(scale: f32, shift: u8, offset_w: i8) -> u64 {
    u64::from(scale.to_bits()) | (u64::from(shift) << 32) | (u64::from(offset_w as u8) << 40)
}

/// Unpacks one `deq_scale` element.
pub fn unpack_deq_scale(packed: u64) -> DeqScale {
    DeqScale {
        scale: f32::from_bits((packed & 0xffff_ffff) as u32),
        shift: ((packed >> 32) & 0xff) as u8,
        offset_w: ((packed >> 40) & 0xff) as u8 as i8,
    }
}

/// The names quantization gives to what it adds for one layer. The layer's
/// float output keeps its name (now written by the dequantization); the rest
/// is derived from the layer (node) name.
pub mod names {
    /// The `AscendQuant` node of a layer's input (deploy model).
    pub fn quant_node(layer: &str) -> String {
        format!("{layer}.quant")
    }

    /// The int8 value the `AscendQuant` node writes.
    pub fn quant_output(layer: &str) -> String {
        format!("{layer}.quant.output")
    }

    /// The prefix of the fake-quant chain that quantizes a layer's input:
    /// its nodes are `<prefix>.{mul,round,add,clip,sub}` and its constants
    /// `<prefix>.{scale,offset,min_val,max_val}`.
    pub fn fake_quant_prefix(layer: &str) -> String {
        format!("{layer}.quant.fakequant")
    }

    /// The prefix of the QuantizeLinear/DequantizeLinear pair used internally
    /// to measure similarity.
    pub fn qdq_prefix(layer: &str) -> String {
        format!("{layer}.quant.qdq")
    }

    /// The `AscendDequant` node of a layer (deploy model).
    pub fn dequant_node(layer: &str) -> String {
        format!("{layer}.dequant")
    }

    /// The `deq_scale` initializer of a layer.
    pub fn dequant_param(layer: &str) -> String {
        format!("{layer}.dequant.param")
    }

    /// The prefix of the fake-quant dequantization (`<prefix>.mul`, `<prefix>.scale`).
    pub fn fake_dequant_prefix(layer: &str) -> String {
        format!("{layer}.dequant.fakequant")
    }

    /// The integer (int32 accumulator) output of a quantized layer.
    pub fn int_output(layer: &str) -> String {
        format!("{layer}_output0")
    }

    /// The quantized weight initializer of a layer.
    pub fn weight(layer: &str) -> String {
        format!("{layer}.weight_quant")
    }

    /// The quantized bias initializer of a layer.
    pub fn bias(layer: &str) -> String {
        format!("{layer}.bias_quant")
    }

    /// The layer whose input a fake-quant chain node quantizes, from the
    /// chain's last node (`<layer>.quant.fakequant.sub`).
    pub fn layer_of_fake_quant_sub(node: &str) -> Option<&str> {
        node.strip_suffix(".quant.fakequant.sub")
    }

    /// The constant of a layer's DMQ balance factors (`1/s`, one per input channel).
    pub fn balance_factor(layer: &str) -> String {
        format!("{layer}.tensor_balance_factor")
    }

    /// The `Mul` dividing a layer's input by its DMQ balance factors.
    pub fn balance_mul(layer: &str) -> String {
        format!("{layer}.mul")
    }

    /// The name a tensor quantization (input `index` of `node`) gives the
    /// nodes it adds in place of a layer name.
    pub fn tensor_base(node: &str, index: usize) -> String {
        format!("{node}.input{index}")
    }

    /// The name the quantization of a two-input MatMul's second operand
    /// uses in place of a layer name (`<layer>.input1.quant`, ...).
    pub fn second_operand(layer: &str) -> String {
        tensor_base(layer, 1)
    }

    /// The `AscendAntiQuant` node of a tensor quantization.
    pub fn anti_quant_node(base: &str) -> String {
        format!("{base}.anti_quant")
    }

    /// The float value the `AscendAntiQuant` node writes.
    pub fn anti_quant_output(base: &str) -> String {
        format!("{base}.anti_quant.output")
    }

    /// The nodes that dequantize a layer's output, in the deploy and the
    /// fake-quant model.
    pub fn dequant_nodes(layer: &str) -> [String; 2] {
        [
            dequant_node(layer),
            format!("{}.mul", fake_dequant_prefix(layer)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deq_scale_bits_worked_out_by_hand() {
        // 0.5 = 0x3F000000 in IEEE-754 single precision; the upper word stays 0.
        assert_eq!(pack_deq_scale(0.5), 0x0000_0000_3F00_0000);
        // 1.5e-3 = 0x3AC49BA6 (sign 0, exponent 117, mantissa 0x449BA6).
        assert_eq!(pack_deq_scale(1.5e-3), 0x3AC4_9BA6);
        // A word with shift 3 and offset_w -2 in bits 32-39 and 40-47.
        let u = unpack_deq_scale(0x0000_FE03_3F80_0000);
        assert_eq!(
            u,
            DeqScale {
                scale: 1.0,
                shift: 3,
                offset_w: -2
            }
        );
    }

    #[test]
    fn quant_scale_is_the_reciprocal_as_float32() {
        // scale_d = 0.1: 1/0.1 in float32 is 10.0 exactly (0x41200000).
        let a = QuantAttrs::from_factors(0.1, -3);
        assert_eq!(a.scale.to_bits(), 0x4120_0000);
        assert_eq!(a.offset, -3.0);
        // scale_d = 0.03: 1/0.03 = 33.333336 (0x42055556) after float32 rounding.
        assert_eq!(
            QuantAttrs::from_factors(0.03, 0).scale.to_bits(),
            0x4205_5556
        );
    }

    #[test]
    fn fake_quant_names_parse_back() {
        let sub = format!("{}.sub", names::fake_quant_prefix("/0/Conv"));
        assert_eq!(names::layer_of_fake_quant_sub(&sub), Some("/0/Conv"));
        assert_eq!(names::layer_of_fake_quant_sub("/0/Conv.sub"), None);
    }
}

/// AMCT's `fakequant_precision_mode: FORCE_FP16_QUANT`, for devices whose
/// quant operator computes in fp16 (`docs/deploy-format.md`, FP16 quant): the
/// metadata a deploy model carries when it was made that way, and the
/// arithmetic it implies.
pub mod fp16_quant {
    use crate::onnx::ModelProto;
    use crate::onnx::attr::{attr_float, float_attr, set};
    use crate::onnx::proto::StringStringEntryProto;

    /// The `metadata_props` key a deploy model made with FORCE_FP16_QUANT carries.
    pub const METADATA_KEY: &str = "ascend_quant.fakequant_precision_mode";
    /// Its value, AMCT's name for the mode.
    pub const FORCE_FP16_QUANT: &str = "FORCE_FP16_QUANT";

    /// `v` at fp16 precision (round to nearest even), back as float32: the
    /// value an fp16 quant operator multiplies by.
    pub fn to_fp16(v: f32) -> f32 {
        half::f16::from_f32(v).to_f32()
    }

    /// AMCT's "S19" truncation of a dequantization factor: the float32 bits
    /// with the low 13 mantissa bits cleared (10 mantissa bits kept).
    pub fn s19(v: f32) -> f32 {
        f32::from_bits(v.to_bits() & 0xFFFF_E000)
    }

    /// Whether `model` says its quant operators compute in fp16.
    pub fn requested(model: &ModelProto) -> bool {
        model
            .metadata_props
            .iter()
            .any(|p| p.key() == METADATA_KEY && p.value() == FORCE_FP16_QUANT)
    }

    /// Marks `model` as made with FORCE_FP16_QUANT (once).
    pub fn mark(model: &mut ModelProto) {
        if !requested(model) {
            model.metadata_props.push(StringStringEntryProto {
                key: Some(METADATA_KEY.into()),
                value: Some(FORCE_FP16_QUANT.into()),
            });
        }
    }

    /// For execution of a model [`requested`] marks: every `AscendQuant`'s
    /// `scale` at fp16 precision, as an fp16 device applies it. Any other
    /// model, and everything else, is left unchanged.
    pub fn for_execution(model: &mut ModelProto) {
        if !requested(model) {
            return;
        }
        let Some(g) = model.graph.as_mut() else {
            return;
        };
        for n in g
            .node
            .iter_mut()
            .filter(|n| n.op_type() == super::ASCEND_QUANT)
        {
            if let Some(scale) = float_attr(n, "scale") {
                set(n, attr_float("scale", to_fp16(scale)));
            }
        }
    }
}
