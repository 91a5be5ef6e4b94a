//! Operators as the project knows them, apart from any engine: what decides
//! an operator's output shape ([`shape_value_inputs`]), why an engine
//! declines a node ([`Unsupported`]), and the layout, shape and arithmetic
//! operators on tensors of any type ([`layout`], [`arith`]), which model
//! preparation evaluates on constant inputs ([`eval_constant`]) and the
//! native engine runs on float32 values. `docs/engine.md` (Shape folding,
//! Per-node fallback) says how the engines use them.

pub mod activation;
pub mod arith;
pub mod gemm;
pub mod layout;
pub mod norm;
pub mod reduce;
pub mod resize;
pub mod window;
pub mod work;

use crate::onnx::NodeProto;
use crate::onnx::attr::{find, int_attr};
use crate::tensor::Tensor;

/// Why an engine does not run a node: the node, its operator and the reason.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Unsupported {
    /// The node's name.
    pub node: String,
    /// Its operator.
    pub op: String,
    /// What in it the engine does not run.
    pub reason: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node '{}' ({}): {}", self.node, self.op, self.reason)
    }
}

impl Unsupported {
    /// `reason` for `node`.
    pub fn of(node: &NodeProto, reason: impl Into<String>) -> Unsupported {
        Unsupported {
            node: node.name().to_string(),
            op: node.op_type().to_string(),
            reason: reason.into(),
        }
    }
}

/// For a default-domain operator whose output shapes follow from its input
/// shapes and attributes, the inputs whose *values* also decide them (a
/// Reshape's target shape, a Slice's bounds, …); `None` for operators whose
/// output shape depends on the data (NonZero, NonMaxSuppression, …),
/// control flow and anything not listed. Model preparation uses this to
/// tell which `Shape` nodes it may replace by constants.
pub fn shape_value_inputs(op: &str) -> Option<&'static [usize]> {
    const NONE: &[usize] = &[];
    Some(match op {
        "Reshape" | "Expand" | "Tile" | "Pad" | "Upsample" | "TopK" | "Split" | "Squeeze"
        | "Unsqueeze" | "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd"
        | "ReduceL2" | "ReduceL1" | "ReduceLogSumExp" | "ReduceSumSquare" | "OneHot"
        | "CenterCropPad" => &[1],
        "Slice" => &[1, 2, 3, 4],
        "Resize" => &[1, 2, 3],
        "ConstantOfShape" => &[0],
        "Range" => &[0, 1, 2],
        "Abs"
        | "Acos"
        | "Add"
        | "And"
        | "ArgMax"
        | "ArgMin"
        | "Asin"
        | "Atan"
        | "AveragePool"
        | "BatchNormalization"
        | "Cast"
        | "CastLike"
        | "Ceil"
        | "Celu"
        | "Clip"
        | "Concat"
        | "Conv"
        | "ConvTranspose"
        | "Cos"
        | "CumSum"
        | "DepthToSpace"
        | "DequantizeLinear"
        | "Div"
        | "Dropout"
        | "Einsum"
        | "Elu"
        | "Equal"
        | "Erf"
        | "Exp"
        | "Flatten"
        | "Floor"
        | "Gather"
        | "GatherElements"
        | "Gelu"
        | "Gemm"
        | "GlobalAveragePool"
        | "GlobalMaxPool"
        | "Greater"
        | "GreaterOrEqual"
        | "GroupNormalization"
        | "HardSigmoid"
        | "HardSwish"
        | "Identity"
        | "InstanceNormalization"
        | "LayerNormalization"
        | "LeakyRelu"
        | "Less"
        | "LessOrEqual"
        | "Log"
        | "LogSoftmax"
        | "LRN"
        | "MatMul"
        | "Max"
        | "MaxPool"
        | "Mean"
        | "Min"
        | "Mish"
        | "Mod"
        | "Mul"
        | "Neg"
        | "Not"
        | "Or"
        | "Pow"
        | "PRelu"
        | "QuantizeLinear"
        | "Reciprocal"
        | "Relu"
        | "Round"
        | "Selu"
        | "Shape"
        | "Sigmoid"
        | "Sign"
        | "Sin"
        | "Size"
        | "Softmax"
        | "Softplus"
        | "Softsign"
        | "SpaceToDepth"
        | "Sqrt"
        | "Sub"
        | "Sum"
        | "Tanh"
        | "ThresholdedRelu"
        | "Transpose"
        | "Trilu"
        | "Where"
        | "Xor" => NONE,
        _ => return None,
    })
}

/// Whether `op` gives a new value on every run (random generators), so its
/// output is never a constant even when its inputs are.
pub fn is_random(op: &str) -> bool {
    op.starts_with("Random") || op == "Multinomial" || op == "Bernoulli"
}

/// The tensor a Constant node holds in its `value` attribute.
pub fn constant_value(node: &NodeProto) -> Option<&crate::onnx::TensorProto> {
    (node.op_type() == "Constant")
        .then(|| find(node, "value").and_then(|a| a.t.as_ref()))
        .flatten()
}

/// The integers of an int64 or int32 tensor.
pub fn ints_of(t: &Tensor) -> Result<Vec<i64>, String> {
    match t {
        Tensor::I64(a) => Ok(a.iter().copied().collect()),
        Tensor::I32(a) => Ok(a.iter().map(|&v| i64::from(v)).collect()),
        other => Err(format!("expected integers, got {}", other.dtype())),
    }
}

/// Whether [`eval_constant`] evaluates `node` (a default-domain node of
/// the layout, shape and arithmetic operators, Pad in constant mode without
/// axes, Resize without antialiasing).
pub fn evaluates(node: &NodeProto) -> bool {
    let default_domain = node.domain().is_empty() || node.domain() == "ai.onnx";
    let pad_ok = node.op_type() != "Pad"
        || crate::onnx::attr::string_attr(node, "mode").is_none_or(|m| m == b"constant")
            && node.input.get(3).is_none_or(|a| a.is_empty());
    let resize_ok = node.op_type() != "Resize" || int_attr(node, "antialias").unwrap_or(0) == 0;
    default_domain && pad_ok && resize_ok && evaluated_op(node.op_type())
}

fn evaluated_op(op: &str) -> bool {
    matches!(
        op,
        "Identity"
            | "Cast"
            | "Shape"
            | "Size"
            | "Gather"
            | "Concat"
            | "Transpose"
            | "Reshape"
            | "Flatten"
            | "Unsqueeze"
            | "Squeeze"
            | "Slice"
            | "ConstantOfShape"
            | "Range"
            | "Expand"
            | "Where"
            | "Pad"
            | "Split"
            | "Add"
            | "Sub"
            | "Mul"
            | "Div"
            | "Max"
            | "Min"
            | "Pow"
            | "Mod"
            | "Equal"
            | "Less"
            | "Greater"
            | "LessOrEqual"
            | "GreaterOrEqual"
            | "Neg"
            | "Abs"
            | "Ceil"
            | "Floor"
            | "Round"
            | "Sqrt"
            | "Reciprocal"
            | "Not"
            | "Resize"
            | "Upsample"
            | "Trilu"
    )
}

/// Evaluates a default-domain node whose inputs are all known (`inputs[k]`
/// is `None` only for an absent optional input), for the layout, shape and
/// arithmetic operators of this module; `None` for any other operator.
pub fn eval_constant(
    node: &NodeProto,
    opset: i64,
    inputs: &[Option<&Tensor>],
) -> Option<Result<Vec<Tensor>, String>> {
    let op = node.op_type();
    let input = |k: usize| {
        inputs
            .get(k)
            .copied()
            .flatten()
            .ok_or_else(|| format!("{op}'s input {k} is missing"))
    };
    let one = |r: Result<Tensor, String>| Some(r.map(|t| vec![t]));
    if let Some(r) = match (
        inputs.first().copied().flatten(),
        inputs.get(1).copied().flatten(),
    ) {
        (Some(a), Some(b)) if inputs.len() == 2 => arith::binary(op, a, b),
        (Some(a), None) if inputs.len() == 1 => arith::unary(op, a),
        _ => None,
    } {
        return one(r);
    }
    if let Ok(Some(first)) =
        layout::Layout::parse(node, opset, 0, &|k| inputs.get(k).copied().flatten())
    {
        let x = match input(0) {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        };
        let parts = if matches!(first, layout::Layout::SplitPart { .. }) {
            node.output.len()
        } else {
            1
        };
        return Some(
            (0..parts)
                .map(|k| {
                    let op = if k == 0 {
                        first.clone()
                    } else {
                        layout::Layout::parse(node, opset, k, &|j| {
                            inputs.get(j).copied().flatten()
                        })?
                        .expect("parsed above")
                    };
                    op.run(x)
                })
                .collect(),
        );
    }
    let axis = int_attr(node, "axis");
    match op {
        "Shape" => one(input(0).map(|x| {
            layout::shape_of(
                x.shape(),
                int_attr(node, "start").unwrap_or(0),
                int_attr(node, "end"),
            )
        })),
        "Size" => one(input(0).map(|x| {
            Tensor::I64(ndarray::ArrayD::from_elem(
                ndarray::IxDyn(&[]),
                x.len() as i64,
            ))
        })),
        "Concat" => one(inputs
            .iter()
            .map(|t| t.ok_or_else(|| "Concat's input is missing".to_string()))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|parts| layout::concat(&parts, axis.ok_or("Concat has no axis")?))),
        "ConstantOfShape" => one(input(0).and_then(|s| {
            let value = find(node, "value")
                .and_then(|a| a.t.as_ref())
                .map(crate::onnx::to_tensor)
                .transpose()
                .map_err(|e| e.to_string())?;
            layout::constant_of_shape(&ints_of(s)?, value.as_ref())
        })),
        "Range" => one(input(0).and_then(|s| layout::range(s, input(1)?, input(2)?))),
        "Where" => one(input(0).and_then(|c| arith::where_(c, input(1)?, input(2)?))),
        "Trilu" => one(input(0).and_then(|x| {
            let k = match inputs.get(1).copied().flatten() {
                Some(t) => *ints_of(t)?.first().ok_or("Trilu's k is empty")?,
                None => 0,
            };
            arith::trilu(x, k, int_attr(node, "upper").unwrap_or(1) != 0)
        })),
        "Resize" | "Upsample" => one(input(0).and_then(|x| {
            let x = x
                .as_f32()
                .ok_or_else(|| format!("{op} of {} values is not evaluated here", x.dtype()))?;
            let r = resize::Resize::parse(node, opset, &|k| inputs.get(k).copied().flatten())?;
            r.run(x).map(Tensor::F32)
        })),
        _ => None,
    }
}
