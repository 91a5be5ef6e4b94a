//! Deploy models on the native engine: each quantized Conv / Gemm / MatMul
//! together with the `AscendQuant` before it and the `AscendDequant` after
//! it becomes one exact integer step (`kernels::int_conv`) reading the
//! float input; an `AscendQuant` read by an `AscendAntiQuant` becomes a
//! step writing int8 levels (held as floats), and `AscendAntiQuant` a float
//! step. The int8 and int32 values in between never leave these steps, so a
//! model whose caller asks to see one of them (or with a quantized layer
//! the engine does not run) is declined and the rten lowering
//! (`sim::ascend`) runs it instead.

use super::kernels::int_conv::{IntConv, IntDense, Quantizer, Requant};
use super::native_ops::{AscendAntiQuantize, AscendQuantize, IntMatMul};
use super::steps::{Decline, Op, Step, conv_geometry};
use crate::deploy_format::{
    ASCEND_ANTI_QUANT, ASCEND_DEQUANT, ASCEND_QUANT, AntiQuantAttrs, QuantAttrs, unpack_deq_scale,
};
use crate::onnx::graph::initializer;
use crate::onnx::{GraphIndex, GraphProto, NodeProto, to_tensor};
use crate::tensor::Tensor;
use std::collections::HashSet;

/// The step for node `i` when it belongs to the quantized part of a deploy
/// model (`None` for any other node); the `AscendDequant` a layer absorbs
/// is added to `absorbed`.
pub(super) fn step(
    graph: &GraphProto,
    index: &GraphIndex,
    i: usize,
    exposed: &HashSet<&str>,
    absorbed: &mut HashSet<usize>,
) -> Result<Option<Step>, Decline> {
    let node = &graph.node[i];
    let single_output = || match node.output.as_slice() {
        [o] if !o.is_empty() => Ok(o.clone()),
        _ => Err(unfit()),
    };
    let reads_levels = node
        .input
        .first()
        .and_then(|x| index.producer_node(x))
        .is_some_and(|p| graph.node[p].op_type() == ASCEND_QUANT);
    let op = match node.op_type() {
        ASCEND_QUANT => {
            let out = single_output()?;
            // Its levels reach only the steps below, never the caller.
            let readers_ok = index.consumers(&out).iter().all(|&c| {
                matches!(
                    graph.node[c].op_type(),
                    "Conv" | "Gemm" | "MatMul" | ASCEND_ANTI_QUANT
                )
            });
            if exposed.contains(out.as_str()) || !readers_ok {
                return Err(unfit());
            }
            let QuantAttrs { scale, offset } = QuantAttrs::read(node).map_err(|_| unfit())?;
            Op::Quantize(AscendQuantize(Quantizer { scale, offset }))
        }
        ASCEND_ANTI_QUANT if reads_levels => {
            let AntiQuantAttrs { scale, offset } =
                AntiQuantAttrs::read(node).map_err(|_| unfit())?;
            Op::AntiQuant(AscendAntiQuantize { scale, offset })
        }
        ASCEND_ANTI_QUANT | ASCEND_DEQUANT => return Err(unfit()),
        "MatMul" if reads_levels && second_reads_levels(graph, index, node) => {
            // Two quantized operands (attention's MatMuls): no weight, no bias.
            let (a, xa) = quantization_before(graph, index, node, 0)?;
            let (b, xb) = quantization_before(graph, index, node, 1)?;
            let (dequant, requant) = dequant_after(graph, index, node, exposed, absorbed)?;
            let (&[deq], true) = (requant.deq.as_slice(), requant.bias.is_empty()) else {
                return Err(unfit());
            };
            return Ok(Some(Step::new(
                node.name(),
                Op::IntMatMul(Box::new(IntMatMul { a, b, deq })),
                vec![xa, xb],
                graph.node[dequant].output[0].clone(),
            )));
        }
        _ if reads_levels => {
            let (quantizer, x) = quantization_before(graph, index, node, 0)?;
            let (dequant, requant) = dequant_after(graph, index, node, exposed, absorbed)?;
            let layer = layer(graph, node, quantizer, requant)?;
            return Ok(Some(Step::new(
                node.name(),
                layer,
                vec![x],
                graph.node[dequant].output[0].clone(),
            )));
        }
        _ => return Ok(None),
    };
    Ok(Some(Step::new(
        node.name(),
        op,
        vec![node.input.first().ok_or_else(unfit)?.clone()],
        single_output()?,
    )))
}

/// Whether `node`'s second input is written by an `AscendQuant`.
fn second_reads_levels(graph: &GraphProto, index: &GraphIndex, node: &NodeProto) -> bool {
    node.input
        .get(1)
        .and_then(|x| index.producer_node(x))
        .is_some_and(|p| graph.node[p].op_type() == ASCEND_QUANT)
}

/// The `AscendQuant` that writes `node`'s input `k`: its arithmetic and
/// the float value it reads (which the layer's step reads instead; the
/// quantization step itself then only runs if something else needs it).
fn quantization_before(
    graph: &GraphProto,
    index: &GraphIndex,
    node: &NodeProto,
    k: usize,
) -> Result<(Quantizer, String), Decline> {
    let input = node.input.get(k).ok_or_else(unfit)?;
    let quant = &graph.node[index.producer_node(input).ok_or_else(unfit)?];
    if quant.op_type() != ASCEND_QUANT {
        return Err(unfit());
    }
    let QuantAttrs { scale, offset } = QuantAttrs::read(quant).map_err(|_| unfit())?;
    let x = quant
        .input
        .first()
        .filter(|s| !s.is_empty())
        .ok_or_else(unfit)?;
    Ok((Quantizer { scale, offset }, x.clone()))
}

/// The `AscendDequant` that alone reads `node`'s int32 output (which the
/// caller must not see), directly or through a MatMul's int32 bias `Add`,
/// and the bias and scales it completes; both are added to `absorbed`.
fn dequant_after(
    graph: &GraphProto,
    index: &GraphIndex,
    node: &NodeProto,
    exposed: &HashSet<&str>,
    absorbed: &mut HashSet<usize>,
) -> Result<(usize, Requant), Decline> {
    let sole_reader = |value: &String| -> Result<usize, Decline> {
        match index.consumers(value) {
            &[c] if !exposed.contains(value.as_str()) => Ok(c),
            _ => Err(unfit()),
        }
    };
    let [acc] = node.output.as_slice() else {
        return Err(unfit());
    };
    let mut value = acc;
    let mut d = sole_reader(value)?;
    let mut bias_input = node.input.get(2).filter(|s| !s.is_empty());
    if graph.node[d].op_type() == "Add" && node.op_type() == "MatMul" {
        let add = &graph.node[d];
        let other = match add.input.as_slice() {
            [a, b] if a == acc => b,
            [b, a] if a == acc => b,
            _ => return Err(unfit()),
        };
        let [sum] = add.output.as_slice() else {
            return Err(unfit());
        };
        absorbed.insert(d);
        bias_input = Some(other);
        value = sum;
        d = sole_reader(value)?;
    }
    let dq = &graph.node[d];
    if dq.op_type() != ASCEND_DEQUANT || dq.input.first() != Some(value) || dq.output.len() != 1 {
        return Err(unfit());
    }
    let Tensor::U64(packed) = constant(graph, dq.input.get(1))? else {
        return Err(unfit());
    };
    let deq = packed
        .iter()
        .map(|&v| {
            let u = unpack_deq_scale(v);
            // A shift or weight offset is left to the lowering, which explains the refusal.
            (u.shift == 0 && u.offset_w == 0)
                .then_some(u.scale)
                .ok_or_else(unfit)
        })
        .collect::<Result<Vec<f32>, Decline>>()?;
    let bias = match bias_input {
        None => Vec::new(),
        Some(b) => match constant(graph, Some(b))? {
            Tensor::I32(a) if a.ndim() <= 1 => a.iter().copied().collect(),
            _ => return Err(unfit()),
        },
    };
    absorbed.insert(d);
    Ok((d, Requant { bias, deq }))
}

/// Why a deploy model's node does not run natively (the whole model then
/// runs on the rten lowering, which names any real defect).
fn unfit() -> Decline {
    "a quantized layer or value in a form the native engine does not run".into()
}

/// An initializer, decoded.
fn constant(graph: &GraphProto, name: Option<&String>) -> Result<Tensor, Decline> {
    let t = initializer(graph, name.ok_or_else(unfit)?).ok_or_else(unfit)?;
    to_tensor(t).map_err(|_| unfit())
}

/// The integer step for a quantized Conv, Gemm or MatMul.
fn layer(
    graph: &GraphProto,
    node: &NodeProto,
    quantizer: Quantizer,
    requant: Requant,
) -> Result<Op, Decline> {
    let Tensor::I8(w) = constant(graph, node.input.get(1))? else {
        return Err(unfit());
    };
    let weight: Vec<i8> = w.iter().copied().collect();
    match node.op_type() {
        "Conv" => {
            let geometry = conv_geometry(node, w.shape())?;
            let (c_out, cg) = (w.shape()[0], w.shape()[1]);
            if !requant.fits(c_out) {
                return Err(unfit());
            }
            let c_in = cg * geometry.group;
            Ok(Op::IntConv(Box::new(IntConv::new(
                geometry, c_in, c_out, quantizer, &weight, requant,
            ))))
        }
        "Gemm" | "MatMul" => {
            let gemm = node.op_type() == "Gemm";
            let plain = !gemm
                || crate::ops::gemm::Gemm::parse(node)
                    .is_ok_and(|g| g.is_plain_product() && !g.trans_b);
            let &[k, n] = w.shape() else {
                return Err(unfit());
            };
            if !plain || !requant.fits(n) || !gemm && node.input.len() > 2 {
                return Err(unfit());
            }
            Ok(Op::IntDense(
                Box::new(IntDense::new(&weight, k, n, quantizer, requant)),
                gemm,
            ))
        }
        _ => Err(unfit()),
    }
}
