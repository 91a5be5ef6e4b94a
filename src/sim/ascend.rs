//! Ascend's quantization operators, lowered to standard ONNX operators with
//! the same integer semantics, so the simulator runs deploy models:
//!
//! * `AscendQuant(x; scale, offset)` → `Cast<int8>(Clip(Round(x·scale + offset), -128, 127))`
//!   (round half to even, then saturation, as the device does);
//! * a Gemm / MatMul reading int8 → `MatMulInteger` with the activation
//!   offset as zero point, i.e. `Σ w·(q − offset)` accumulated in int32 (the
//!   offset correction ATC folds into the bias), plus the int32 bias;
//! * Conv and ConvTranspose reading int8 → float convolutions on `q − offset`
//!   with integer-valued weights, split over input channels so that no float
//!   sum holds more than 512 products (each below 2^15, so every partial sum
//!   is an exact integer below 2^24), then cast to int32 and summed with the
//!   int32 bias in int32: the device's accumulation, bit for bit
//!   (`sim::exact_conv`);
//! * AveragePool reading int8 → the float operator on `q − offset`. (The engine's `ConvInteger` returns
//!   wrong sums for batches larger than one in rten 0.27, and pads with raw
//!   zeros instead of the zero point, so it is not used.)
//! * `AscendAntiQuant(q; scale, offset)` → `(Cast<float>(q) − offset) · scale`
//!   (tensor quantization of a MaxPool / Add input);
//! * `AscendDequant(acc, deq_scale)` → `Cast<float>(acc) · deq` with the float
//!   held in the low 32 bits of each `deq_scale` element (a non-zero shift or
//!   weight offset is refused: plain int8 quantization never writes one).
//!
//! The operators' attributes and the `deq_scale` layout are read through
//! [`crate::deploy_format`] (see `docs/deploy-format.md`).

use super::error::SimError;
use crate::deploy_format::{
    ASCEND_ANTI_QUANT, ASCEND_DEQUANT, ASCEND_QUANT, AntiQuantAttrs, QuantAttrs, is_ascend_op,
    unpack_deq_scale,
};
use crate::onnx::attr::attr_int;
use crate::onnx::builder::{constant_f32, node};
use crate::onnx::graph::initializer;
use crate::onnx::proto::TensorProto;
use crate::onnx::{GraphProto, ModelProto, NodeProto, Storage, to_proto, to_tensor};
use crate::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};
use std::collections::HashMap;

/// Whether the model uses any Ascend operator.
pub fn has_ascend_ops(model: &ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| is_ascend_op(n.op_type())))
}

const ONNX_FLOAT: i64 = 1;
const ONNX_INT8: i64 = 3;

fn err(node: &NodeProto, reason: String) -> SimError {
    SimError::Load {
        reason: format!("node '{}' ({}): {reason}", node.name(), node.op_type()),
    }
}

/// Adds `Cast<float>(q) − offset` for the int8 value `q` under the names of
/// node `name`; returns the float value's name.
fn without_offset(out: &mut Vec<NodeProto>, name: &str, q: &str, offset: f32) -> String {
    let p = |s: &str| format!("{name}.lowered.{s}");
    out.push(constant_f32(
        &p("offset"),
        &p("offset.v"),
        &[],
        vec![offset],
    ));
    out.push(node(
        "Cast",
        &p("cast"),
        &[q],
        &[&p("cast.o")],
        vec![attr_int("to", ONNX_FLOAT)],
    ));
    out.push(node(
        "Sub",
        &p("sub"),
        &[&p("cast.o"), &p("offset.v")],
        &[&p("x")],
        vec![],
    ));
    p("x")
}

/// Returns the model with every Ascend operator replaced as described above.
pub fn lower(model: &ModelProto) -> Result<ModelProto, SimError> {
    let mut m = model.clone();
    crate::deploy_format::fp16_quant::for_execution(&mut m);
    let g = m.graph.as_mut().ok_or_else(|| SimError::Load {
        reason: "the model holds no graph".into(),
    })?;
    let mut quants: HashMap<String, QuantAttrs> = HashMap::new();
    for n in &g.node {
        if n.op_type() == ASCEND_QUANT {
            let attrs = QuantAttrs::read(n).map_err(|why| err(n, why))?;
            let out = n.output.first().ok_or_else(|| err(n, "no output".into()))?;
            quants.insert(out.clone(), attrs);
        }
    }
    let offsets: HashMap<String, f32> = quants.iter().map(|(k, a)| (k.clone(), a.offset)).collect();
    let mut out: Vec<NodeProto> = Vec::with_capacity(g.node.len());
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let nodes = std::mem::take(&mut g.node);
    for n in nodes {
        let name = n.name().to_string();
        match n.op_type() {
            ASCEND_QUANT => {
                let QuantAttrs { scale, offset } = quants[&n.output[0]];
                let p = |s: &str| format!("{name}.lowered.{s}");
                out.push(constant_f32(&p("scale"), &p("scale.v"), &[], vec![scale]));
                out.push(constant_f32(
                    &p("offset"),
                    &p("offset.v"),
                    &[],
                    vec![offset],
                ));
                out.push(constant_f32(&p("lo"), &p("lo.v"), &[], vec![-128.0]));
                out.push(constant_f32(&p("hi"), &p("hi.v"), &[], vec![127.0]));
                out.push(node(
                    "Mul",
                    &p("mul"),
                    &[&n.input[0], &p("scale.v")],
                    &[&p("mul.o")],
                    vec![],
                ));
                out.push(node(
                    "Add",
                    &p("add"),
                    &[&p("mul.o"), &p("offset.v")],
                    &[&p("add.o")],
                    vec![],
                ));
                out.push(node(
                    "Round",
                    &p("round"),
                    &[&p("add.o")],
                    &[&p("round.o")],
                    vec![],
                ));
                out.push(node(
                    "Clip",
                    &p("clip"),
                    &[&p("round.o"), &p("lo.v"), &p("hi.v")],
                    &[&p("clip.o")],
                    vec![],
                ));
                out.push(node(
                    "Cast",
                    &p("cast"),
                    &[&p("clip.o")],
                    &[&n.output[0]],
                    vec![attr_int("to", ONNX_INT8)],
                ));
            }
            ASCEND_DEQUANT => {
                if n.input.len() < 2 || n.output.is_empty() {
                    return Err(err(&n, "needs inputs (x, deq_scale) and one output".into()));
                }
                let param = initializer(g, &n.input[1]).ok_or_else(|| {
                    err(
                        &n,
                        format!("deq_scale '{}' is not an initializer", n.input[1]),
                    )
                })?;
                let Tensor::U64(packed) = to_tensor(param).map_err(|e| err(&n, e.to_string()))?
                else {
                    return Err(err(&n, "deq_scale is not uint64".into()));
                };
                let deq = packed
                    .iter()
                    .map(|&v| {
                        let u = unpack_deq_scale(v);
                        if u.shift != 0 || u.offset_w != 0 {
                            return Err(err(
                                &n,
                                format!(
                                    "deq_scale holds shift {} and weight offset {}; only plain int8 layers (both 0) can be simulated",
                                    u.shift, u.offset_w
                                ),
                            ));
                        }
                        Ok(u.scale)
                    })
                    .collect::<Result<Vec<f32>, SimError>>()?;
                let shape = channel_shape(g, &out, &new_inits, &n.input[0], deq.len());
                let p = |s: &str| format!("{name}.lowered.{s}");
                out.push(node(
                    "Cast",
                    &p("cast"),
                    &[&n.input[0]],
                    &[&p("cast.o")],
                    vec![attr_int("to", ONNX_FLOAT)],
                ));
                out.push(constant_f32(&p("deq"), &p("deq.v"), &shape, deq));
                out.push(node(
                    "Mul",
                    &p("mul"),
                    &[&p("cast.o"), &p("deq.v")],
                    &[&n.output[0]],
                    vec![],
                ));
            }
            ASCEND_ANTI_QUANT => {
                let AntiQuantAttrs { scale, offset } =
                    AntiQuantAttrs::read(&n).map_err(|why| err(&n, why))?;
                if n.input.is_empty() || n.output.is_empty() {
                    return Err(err(&n, "needs one input and one output".into()));
                }
                let x = without_offset(&mut out, &name, &n.input[0], offset);
                let p = |s: &str| format!("{name}.lowered.{s}");
                out.push(constant_f32(&p("scale"), &p("scale.v"), &[], vec![scale]));
                out.push(node(
                    "Mul",
                    &p("mul"),
                    &[&x, &p("scale.v")],
                    &[&n.output[0]],
                    vec![],
                ));
            }
            op if n.input.first().is_some_and(|i| offsets.contains_key(i)) && !is_ascend_op(op) => {
                let offset = offsets[&n.input[0]];
                lower_consumer(g, n, offset, &mut out, &mut new_inits)?;
            }
            _ => out.push(n),
        }
    }
    g.node = out;
    g.initializer.extend(new_inits);
    // The packed deq_scale tensors are folded into constants now (and uint64 is not an engine type).
    let used: std::collections::HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let keep: Vec<bool> = g
        .initializer
        .iter()
        .map(|t| t.data_type() != 13 || used.contains(t.name()))
        .collect();
    let mut keep = keep.into_iter();
    g.initializer.retain(|_| keep.next().unwrap_or(true));
    // Values whose type changed (int8 / int32 now) must not keep a float value_info.
    g.value_info.clear();
    Ok(m)
}

/// The shape of `channels` dequantization factors for the int32 `value`: a
/// scalar for one; else per output channel of the layer behind `value`
/// (through a bias Add): the last axis of a Gemm / MatMul result, axis 1 of
/// a convolution's (whose weight gives the rank).
fn channel_shape(
    g: &GraphProto,
    lowered: &[NodeProto],
    new_inits: &[TensorProto],
    value: &str,
    channels: usize,
) -> Vec<usize> {
    if channels == 1 {
        return vec![];
    }
    let mut s = vec![1; channel_rank(g, lowered, new_inits, value)];
    if s.is_empty() {
        return vec![channels];
    }
    s[1] = channels;
    s
}

/// Rank of the tensor a per-channel dequantization applies to: that of the
/// convolution weight behind `value` (through a bias Add); 0 for a Gemm /
/// MatMul, whose channels are the result's last axis.
fn channel_rank(
    g: &GraphProto,
    lowered: &[NodeProto],
    new_inits: &[TensorProto],
    value: &str,
) -> usize {
    let mut v = value.to_string();
    // Through the bias Add, and the casts and sums of an exactly lowered convolution.
    for _ in 0..1024 {
        let Some(p) = lowered.iter().find(|n| n.output.contains(&v)) else {
            break;
        };
        let weight_rank = p
            .input
            .get(1)
            .and_then(|w| initializer(g, w).or_else(|| new_inits.iter().find(|t| t.name() == w)))
            .map(|t| t.dims.len());
        if matches!(p.op_type(), "MatMulInteger" | "MatMul" | "Gemm") {
            return 0;
        }
        if let Some(rank) = weight_rank
            && p.op_type() != "Add"
        {
            return rank.max(2);
        }
        v = p.input[0].clone();
    }
    4
}

fn zero_point(name: &str, offset: f32) -> TensorProto {
    to_proto(
        name,
        &Tensor::I8(ArrayD::from_elem(IxDyn(&[]), offset as i8)),
        Storage::Raw,
    )
}

fn lower_consumer(
    g: &GraphProto,
    n: NodeProto,
    offset: f32,
    out: &mut Vec<NodeProto>,
    inits: &mut Vec<TensorProto>,
) -> Result<(), SimError> {
    let name = n.name().to_string();
    let p = |s: &str| format!("{name}.lowered.{s}");
    let bias = n
        .input
        .get(2)
        .filter(|b| !b.is_empty())
        .map(|b| {
            initializer(g, b).ok_or_else(|| err(&n, format!("bias '{b}' is not an initializer")))
        })
        .transpose()?;
    match n.op_type() {
        "Gemm" | "MatMul" => {
            let zp = p("x_zero_point");
            inits.push(zero_point(&zp, offset));
            let acc = if bias.is_some() {
                p("acc")
            } else {
                n.output[0].clone()
            };
            if n.attribute
                .iter()
                .any(|a| (a.name() == "transB" || a.name() == "transA") && a.i() != 0)
            {
                return Err(err(
                    &n,
                    "a quantized Gemm must have transA = transB = 0".into(),
                ));
            }
            out.push(node(
                "MatMulInteger",
                &name,
                &[&n.input[0], &n.input[1], &zp],
                &[&acc],
                vec![],
            ));
            if let Some(b) = bias {
                let Tensor::I32(bv) = to_tensor(b).map_err(|e| err(&n, e.to_string()))? else {
                    return Err(err(&n, "bias is not int32".into()));
                };
                inits.push(to_proto(&p("bias"), &Tensor::I32(bv), Storage::Raw));
                out.push(node(
                    "Add",
                    &p("bias_add"),
                    &[&acc, &p("bias")],
                    &[&n.output[0]],
                    vec![],
                ));
            }
        }
        "Conv" | "ConvTranspose" => {
            let x = without_offset(out, &name, &n.input[0], offset);
            let w = n
                .input
                .get(1)
                .and_then(|s| initializer(g, s))
                .ok_or_else(|| err(&n, "its weight is not an initializer".into()))?;
            let Tensor::I8(w) = to_tensor(w).map_err(|e| err(&n, e.to_string()))? else {
                return Err(err(&n, "a layer reading int8 needs an int8 weight".into()));
            };
            let bias = match bias {
                Some(b) => match to_tensor(b).map_err(|e| err(&n, e.to_string()))? {
                    Tensor::I32(a) => Some(a),
                    _ => return Err(err(&n, "bias is not int32".into())),
                },
                None => None,
            };
            super::exact_conv::lower(&n, &x, &w, bias.as_ref(), out, inits);
        }
        "AveragePool" => {
            let x = without_offset(out, &name, &n.input[0], offset);
            let mut f = n.clone();
            f.input[0] = x;
            for (k, suffix) in [(1usize, "w"), (2, "b")] {
                if let Some(t) = f
                    .input
                    .get(k)
                    .filter(|s| !s.is_empty())
                    .and_then(|s| initializer(g, s))
                {
                    let widened = match to_tensor(t).map_err(|e| err(&n, e.to_string()))? {
                        Tensor::I8(a) => Tensor::F32(a.mapv(f32::from)),
                        Tensor::I32(a) => Tensor::F32(a.mapv(|v| v as f32)),
                        other => other,
                    };
                    inits.push(to_proto(&p(suffix), &widened, Storage::Raw));
                    f.input[k] = p(suffix);
                }
            }
            out.push(f);
        }
        other => {
            return Err(err(
                &n,
                format!("{other} reading an AscendQuant output is not supported by the simulator"),
            ));
        }
    }
    Ok(())
}
