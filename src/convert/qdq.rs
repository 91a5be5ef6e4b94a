//! Reads the QuantizeLinear / DequantizeLinear structure of a QDQ model:
//! constant quantized tensors (weights, biases) behind a DequantizeLinear,
//! and activation pairs `x → QuantizeLinear → DequantizeLinear → x'`.

use crate::onnx::attr::int_attr;
use crate::onnx::graph::{constant_tensor as constant, is_constant};
use crate::onnx::{GraphProto, NodeProto};
use crate::tensor::{DType, Tensor};
use ndarray::ArrayD;
use std::collections::{HashMap, HashSet};

/// Element types a Q/DQ node can produce or read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    /// int8.
    I8,
    /// uint8.
    U8,
    /// int32 (biases).
    I32,
    /// Any other type (int16, uint16, int64...), named for errors.
    Other(DType),
}

impl QType {
    fn of(t: &Tensor) -> QType {
        match t {
            Tensor::I8(_) => QType::I8,
            Tensor::U8(_) => QType::U8,
            Tensor::I32(_) => QType::I32,
            other => QType::Other(other.dtype()),
        }
    }

    /// The integer range of the type.
    pub fn range(&self) -> (i64, i64) {
        match self {
            QType::I8 => (-128, 127),
            QType::U8 => (0, 255),
            QType::I32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
            QType::Other(_) => (0, 0),
        }
    }
}

/// The factors of a QuantizeLinear or DequantizeLinear node.
#[derive(Clone, Debug, PartialEq)]
pub struct QParams {
    /// One scale, or one per slice along `axis`.
    pub scale: Vec<f32>,
    /// Zero points, as many as the scales.
    pub zero_point: Vec<i64>,
    /// The axis of per-channel factors.
    pub axis: i64,
    /// The integer type.
    pub qtype: QType,
}

/// A constant quantized tensor behind a DequantizeLinear (or a constant float
/// tensor behind a QuantizeLinear → DequantizeLinear pair).
#[derive(Clone, Debug)]
pub struct ConstQuant {
    /// The DequantizeLinear node.
    pub node: String,
    /// Its factors.
    pub params: QParams,
    /// The float value the model computes: `(q − zero_point) · scale`.
    pub float: ArrayD<f32>,
}

/// An activation quantized and dequantized on the way to its consumers.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The QuantizeLinear node.
    pub quant: String,
    /// The DequantizeLinear node.
    pub dequant: String,
    /// The float value quantized.
    pub input: String,
    /// The dequantized value the consumers read.
    pub output: String,
    /// The factors (the same on both nodes).
    pub params: QParams,
}

/// The Q/DQ structure of a graph.
#[derive(Debug, Default)]
pub struct QdqGraph {
    /// Constant quantized tensors by the DequantizeLinear's output name.
    pub consts: HashMap<String, ConstQuant>,
    /// Activation pairs.
    pub pairs: Vec<Pair>,
    /// Indices of every QuantizeLinear / DequantizeLinear node.
    pub qdq_nodes: HashSet<usize>,
}

fn ints(t: &Tensor) -> Option<Vec<i64>> {
    Some(match t {
        Tensor::I8(a) => a.iter().map(|&v| i64::from(v)).collect(),
        Tensor::U8(a) => a.iter().map(|&v| i64::from(v)).collect(),
        Tensor::I32(a) => a.iter().map(|&v| i64::from(v)).collect(),
        Tensor::I64(a) => a.iter().copied().collect(),
        _ => return None,
    })
}

/// The factors of a Q/DQ node; `data_type` is the quantized input's type
/// for a DequantizeLinear of a constant (when there is no zero point).
fn params(graph: &GraphProto, n: &NodeProto, data_type: Option<QType>) -> Result<QParams, String> {
    let label = format!("node '{}' ({})", n.name(), n.op_type());
    let scale = n
        .input
        .get(1)
        .and_then(|s| constant(graph, s))
        .ok_or_else(|| format!("{label}: its scale is not a constant"))?;
    let Tensor::F32(scale) = scale else {
        return Err(format!(
            "{label}: its scale is {}, only float32 scales are converted",
            scale.dtype()
        ));
    };
    let scale: Vec<f32> = scale.iter().copied().collect();
    if scale.is_empty() || scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(format!(
            "{label}: its scale holds {scale:?}; scales must be positive and finite"
        ));
    }
    let (zero_point, qtype) = match n.input.get(2).filter(|z| !z.is_empty()) {
        Some(z) => {
            let t = constant(graph, z)
                .ok_or_else(|| format!("{label}: its zero point is not a constant"))?;
            let qtype = QType::of(&t);
            let values = ints(&t).ok_or_else(|| {
                format!("{label}: its zero point is {}, not an integer", t.dtype())
            })?;
            (values, qtype)
        }
        None => (vec![0; scale.len()], data_type.unwrap_or(QType::U8)),
    };
    if zero_point.len() != scale.len() {
        return Err(format!(
            "{label}: {} scales but {} zero points",
            scale.len(),
            zero_point.len()
        ));
    }
    Ok(QParams {
        scale,
        zero_point,
        axis: int_attr(n, "axis").unwrap_or(1),
        qtype,
    })
}

/// `(q − zp) · s` of a constant along `p.axis`.
fn dequantize(q: &[i64], shape: &[usize], p: &QParams, label: &str) -> Result<ArrayD<f32>, String> {
    let per = per_slice(shape, p, label)?;
    let data = q
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = per(i);
            (v - p.zero_point[c]) as f32 * p.scale[c]
        })
        .collect();
    Ok(ArrayD::from_shape_vec(ndarray::IxDyn(shape), data).expect("sizes agree"))
}

/// Maps a flat index to its factor index.
fn per_slice(
    shape: &[usize],
    p: &QParams,
    label: &str,
) -> Result<Box<dyn Fn(usize) -> usize>, String> {
    if p.scale.len() == 1 {
        return Ok(Box::new(|_| 0));
    }
    let rank = shape.len() as i64;
    let axis = if p.axis < 0 { p.axis + rank } else { p.axis };
    if !(0..rank).contains(&axis) || shape[axis as usize] != p.scale.len() {
        return Err(format!(
            "{label}: {} per-channel factors on axis {} of a tensor of shape {shape:?}",
            p.scale.len(),
            p.axis
        ));
    }
    let inner: usize = shape[axis as usize + 1..].iter().product();
    let dim = shape[axis as usize];
    Ok(Box::new(move |i| (i / inner) % dim))
}

/// Finds every constant quantized tensor and activation pair of `graph`.
pub fn analyze(graph: &GraphProto) -> Result<QdqGraph, String> {
    let mut out = QdqGraph::default();
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut paired_quants = HashSet::new();
    for (i, n) in graph.node.iter().enumerate() {
        match n.op_type() {
            "QuantizeLinear" => {
                out.qdq_nodes.insert(i);
            }
            "DequantizeLinear" => {
                out.qdq_nodes.insert(i);
                let label = format!("node '{}' (DequantizeLinear)", n.name());
                let (Some(x), Some(y)) = (n.input.first(), n.output.first()) else {
                    return Err(format!("{label} has no input or no output"));
                };
                if let Some(q) = constant(graph, x) {
                    // A quantized constant.
                    let p = params(graph, n, Some(QType::of(&q)))?;
                    let values = ints(&q).ok_or_else(|| {
                        format!("{label}: its input is {}, not an integer tensor", q.dtype())
                    })?;
                    let float = dequantize(&values, q.shape(), &p, &label)?;
                    out.consts.insert(
                        y.clone(),
                        ConstQuant {
                            node: n.name().to_string(),
                            params: p,
                            float,
                        },
                    );
                    continue;
                }
                let q_node = producer
                    .get(x.as_str())
                    .map(|&k| &graph.node[k])
                    .filter(|q| q.op_type() == "QuantizeLinear")
                    .ok_or_else(|| {
                        format!(
                            "{label} reads '{x}', which is neither a constant nor the output of a QuantizeLinear; only Q → DQ pairs and quantized constants are converted"
                        )
                    })?;
                let qp = params(graph, q_node, None)?;
                let dp = params(graph, n, Some(qp.qtype))?;
                if qp.scale != dp.scale || qp.zero_point != dp.zero_point || qp.qtype != dp.qtype {
                    return Err(format!(
                        "{label} dequantizes with other factors than '{}' quantized with (scale {:?} / zero point {:?} vs {:?} / {:?}); a pair must share its factors",
                        q_node.name(),
                        dp.scale,
                        dp.zero_point,
                        qp.scale,
                        qp.zero_point
                    ));
                }
                paired_quants.insert(q_node.name().to_string());
                let x_float = q_node.input.first().cloned().unwrap_or_default();
                if let Some(w) = constant(graph, &x_float) {
                    // A float constant quantized in the graph: quantize it here.
                    let Tensor::F32(w) = w else {
                        return Err(format!("{label}: the constant it reads is not float32"));
                    };
                    let per = per_slice(w.shape(), &qp, &label)?;
                    let (lo, hi) = qp.qtype.range();
                    let q: Vec<i64> = w
                        .iter()
                        .enumerate()
                        .map(|(k, &v)| {
                            let c = per(k);
                            ((v / qp.scale[c]).round_ties_even() as i64 + qp.zero_point[c])
                                .clamp(lo, hi)
                        })
                        .collect();
                    let float = dequantize(&q, w.shape(), &qp, &label)?;
                    out.consts.insert(
                        y.clone(),
                        ConstQuant {
                            node: n.name().to_string(),
                            params: qp,
                            float,
                        },
                    );
                    continue;
                }
                if is_constant(graph, &x_float) {
                    return Err(format!("{label}: the constant it reads cannot be decoded"));
                }
                out.pairs.push(Pair {
                    quant: q_node.name().to_string(),
                    dequant: n.name().to_string(),
                    input: x_float,
                    output: y.clone(),
                    params: qp,
                });
            }
            _ => {}
        }
    }
    for &i in &out.qdq_nodes {
        let n = &graph.node[i];
        if n.op_type() == "QuantizeLinear" && !paired_quants.contains(n.name()) {
            return Err(format!(
                "node '{}' (QuantizeLinear) is not followed by a DequantizeLinear; a model that hands int8 tensors to other operators or to its outputs cannot be converted",
                n.name()
            ));
        }
    }
    Ok(out)
}
