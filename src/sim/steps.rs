//! The steps the native engine runs: what each computes ([`Op`]), its
//! inputs and outputs ([`Step`]), and the readers shared by the files that
//! build them (`native.rs` for float models, `native_deploy.rs` for the
//! quantized layers of deploy models).

use super::kernels::conv::{Conv, ConvGeometry, Dense};
use super::kernels::int_conv::{IntConv, IntDense};
use super::native_ops::{self as ops, Elementwise};
use crate::onnx::NodeProto;
use crate::ops::layout as ops_layout;
use crate::tensor::Tensor;
use ndarray::ArrayD;
use std::collections::HashMap;

/// What one step computes.
pub(super) enum Op {
    Conv(Box<Conv>),
    /// A Gemm (true: its input must be 2-D) or a MatMul by a constant weight.
    Dense(Box<Dense>, bool),
    Clamp(f32, f32),
    Sigmoid,
    Round,
    Unary(ops::Unary),
    FakeQuant(ops::FakeQuant),
    QuantDequant(ops::QuantDequant),
    Binary(Elementwise),
    GlobalAveragePool,
    MaxPool(ops::Pool),
    AveragePool(ops::Pool),
    Concat(i64),
    Identity,
    Softmax(i64),
    SoftmaxFlat(i64),
    ResizeNearest(Vec<f32>),
    /// Any other Resize or Upsample (`ops::resize`).
    Resize(Box<crate::ops::resize::Resize>),
    /// LayerNormalization with constant scale and bias (`ops::norm`).
    LayerNorm(Box<crate::ops::norm::LayerNorm>),
    /// ReduceMean/Sum/Max/Min with constant axes (`ops::reduce`).
    Reduce(Box<crate::ops::reduce::Reduce>),
    /// MatMul of two values, batched (NumPy's rules).
    MatMul,
    /// Deploy models (`native_deploy`): int8 levels from floats,
    Quantize(ops::AscendQuantize),
    /// floats from int8 levels,
    AntiQuant(ops::AscendAntiQuantize),
    /// a quantized Conv with its dequantization,
    IntConv(Box<IntConv>),
    /// a quantized Gemm (true: 2-D input only) or MatMul with its dequantization,
    IntDense(Box<IntDense>, bool),
    /// a MatMul of two quantized values (attention's) with its dequantization.
    IntMatMul(Box<ops::IntMatMul>),
    /// A layout operator, on values of any element type (`ops::layout`).
    Layout(Box<ops_layout::Layout>),
    /// A shape or integer operator evaluated on values of any type
    /// (`ops::eval_constant`), with the node's inputs in order (`None`:
    /// absent) as indices into the step's inputs.
    Evaluated(Box<NodeProto>, i64, Vec<Option<usize>>),
    /// A node the native engine does not run, run alone on rten (`foreign`).
    Foreign(Box<super::foreign::Foreign>),
}

/// One node, ready to run.
pub(super) struct Step {
    pub(super) name: String,
    pub(super) op: Op,
    pub(super) inputs: Vec<String>,
    pub(super) output: String,
    /// Further outputs (a foreign node's).
    pub(super) more_outputs: Vec<String>,
}

impl Step {
    /// A step with one output.
    pub(super) fn new(name: &str, op: Op, inputs: Vec<String>, output: String) -> Step {
        Step {
            name: name.to_string(),
            op,
            inputs,
            output,
            more_outputs: Vec::new(),
        }
    }

    /// Every value the step writes.
    pub(super) fn outputs(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.output).chain(&self.more_outputs)
    }
}

/// Why the native engine does not run a node.
pub(super) type Decline = String;

/// The constants a model holds (initializers and `Constant` outputs).
pub(super) type Consts = HashMap<String, Tensor>;

/// A float32 constant.
pub(super) fn float_const<'a>(consts: &'a Consts, name: &str) -> Option<&'a ArrayD<f32>> {
    consts.get(name).and_then(Tensor::as_f32)
}

/// A scalar int8/uint8 zero point as (zero point, lowest, highest level).
pub(super) fn zero_point(consts: &Consts, name: &str) -> Option<(f32, f32, f32)> {
    match consts.get(name)? {
        Tensor::I8(a) if a.len() == 1 => Some((f32::from(*a.iter().next()?), -128.0, 127.0)),
        Tensor::U8(a) if a.len() == 1 => Some((f32::from(*a.iter().next()?), 0.0, 255.0)),
        _ => None,
    }
}

/// A 2-D Conv's attributes for a weight of shape `[C_out, C_in/group, kh, kw]`.
pub(super) fn conv_geometry(node: &NodeProto, weight: &[usize]) -> Result<ConvGeometry, Decline> {
    let &[c_out, _, kh, kw] = weight else {
        return Err(format!(
            "a {}-D convolution (only 2-D runs natively)",
            weight.len().saturating_sub(2)
        ));
    };
    let w = crate::ops::window::Window2d::parse(node)?;
    if w.kernel.is_some_and(|k| k != (kh, kw)) {
        return Err("kernel_shape differs from the weight's".into());
    }
    if c_out % w.group != 0 {
        return Err(format!(
            "{c_out} output channels do not divide into {} groups",
            w.group
        ));
    }
    Ok(ConvGeometry {
        kernel: (kh, kw),
        stride: w.strides,
        dilation: w.dilations,
        pads: w.pads,
        group: w.group,
    })
}
