//! A differentiable execution of an ONNX graph on the CPU: the graph's nodes
//! become operators with a forward and a backward pass over `ndarray`
//! values, in topological order. Initializers are values like any other;
//! the gradient of every value is available after a backward pass, so a
//! trainer updates the ones it trains (weights, biases, clips).
//!
//! Supported today: Conv (dense, and depthwise through
//! `sim::kernels::depthwise::grad`), ConvTranspose (group 1), Gemm, MatMul
//! (by a 2-D weight, or of two values with broadcast batch axes), Relu,
//! Clip, Sigmoid, the float functions of `ops::activation::Unary` (Erf,
//! Gelu, Tanh, Sqrt, HardSwish, …), MaxPool, AveragePool (no padding),
//! GlobalAveragePool, Flatten, Reshape, Transpose, Concat, Softmax, Add,
//! Sub, Mul, Div, Pow, LayerNormalization, ReduceMean / ReduceSum, Gather
//! of a float table by integer ids, Where, nearest Resize; and every node
//! `ops::eval_constant` evaluates (shape arithmetic, masks, Slice, Expand,
//! Unsqueeze, Cast, … on values of any type), which gradients pass only
//! where the node merely moves its first input's values.
//! Any other operator is an error naming the node and the operator.
//!
//! Values are float32 (`ArrayD<f32>`) or, for integer and boolean values
//! (token ids, masks, shapes), `Tensor`s; only float values carry gradients,
//! and only those that depend on a trained constant (all float constants
//! unless [`TrainGraph::train_only`] names them), a fed float input or a
//! quantized layer.

use super::fake_quant::{ulq_backward, ulq_grid};
use super::layer_quant::fake_quantize;
pub use super::layer_quant::{Balance, LayerQuant};
pub(in crate::train) use super::op::Op;
use super::ops_layout::{perm_of, reduce_backward, reduce_to, softmax};
use super::ops_matmul::{matmul, matmul_backward};
use super::ops_norm::{NormAttrs, layer_norm, layer_norm_backward};
use super::ops_pool::{avg_pool_backward, pool, resize_maps};
use super::ops_select::{
    gather, gather_backward, index_map_backward, moves_values, where_, where_backward,
};
use crate::onnx::attr::{int_attr, ints_attr};
use crate::onnx::graph::GraphIndex;
use crate::onnx::{GraphProto, ModelProto, NodeProto, to_tensor};
use crate::ops::activation::{Softmax, Unary};
use crate::ops::gemm::Gemm;
use crate::ops::layout::{Layout, axis_index};
use crate::ops::reduce::Reduce;
use crate::ops::window::Window;
use crate::quant::dmq::balance_weight;
use crate::sim::kernels::conv_grad::{
    ConvGeom, TransposedWindow, contiguous, conv_backward, conv_forward, conv_geometry,
    conv_input_grad, from_nchw, im2col, transposed_geometry,
};
use crate::tensor::Tensor;
use ndarray::{ArrayD, Axis, Ix2, IxDyn};
use std::collections::{HashMap, HashSet};

/// Why a graph cannot be trained or run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An operator or attribute the training engine does not support.
    #[error("node '{node}' ({op}): {reason}")]
    Unsupported {
        /// The node.
        node: String,
        /// Its operator.
        op: String,
        /// What is not supported.
        reason: String,
    },
    /// The model or the fed values are inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// Training diverged (the loss is not finite); says at which step.
    #[error("{0}")]
    Diverged(String),
    /// Training was stopped (Ctrl-C) after this many steps, checkpoint written.
    #[error(
        "interrupted after step {0}; the checkpoint of that step was written: continue with --resume"
    )]
    Interrupted(usize),
}

#[derive(Clone, Debug)]
struct Step {
    node: String,
    op: Op,
    /// The values the operator's kernel reads, in order (absent optional
    /// inputs and the constants read at build time left out).
    inputs: Vec<usize>,
    /// Every input of the node by position (`None`: absent), for
    /// [`Op::Evaluate`].
    args: Vec<Option<usize>>,
    /// The node itself, when the engine's `ops::eval_constant` evaluates
    /// it: run that way when its inputs are not all float (shape
    /// arithmetic on integers, say).
    generic: Option<Box<NodeProto>>,
    /// Which output of the node the step computes (a Split's part).
    part: usize,
    output: usize,
}

/// One input of a step: a float value or a typed one.
#[derive(Clone, Copy)]
enum Val<'a> {
    F(&'a ArrayD<f32>),
    T(&'a Tensor),
}

impl<'a> Val<'a> {
    fn shape(&self) -> &[usize] {
        match self {
            Val::F(a) => a.shape(),
            Val::T(t) => t.shape(),
        }
    }

    /// As the engine's evaluator takes it (a float value copied).
    fn tensor(self) -> std::borrow::Cow<'a, Tensor> {
        match self {
            Val::F(f) => std::borrow::Cow::Owned(Tensor::F32(f.clone())),
            Val::T(t) => std::borrow::Cow::Borrowed(t),
        }
    }
}

/// Placeholder in a step's float inputs where the input is typed.
static NOT_FLOAT: std::sync::LazyLock<ArrayD<f32>> =
    std::sync::LazyLock::new(|| ArrayD::zeros(IxDyn(&[0])));

/// A graph ready for forward and backward passes.
#[derive(Clone, Debug)]
pub struct TrainGraph {
    names: Vec<String>,
    index: HashMap<String, usize>,
    /// Initializer values (float32), by value id.
    constants: HashMap<usize, ArrayD<f32>>,
    /// Constants of other types (int64 shapes and positions, bool masks), by value id.
    typed_constants: HashMap<usize, Tensor>,
    /// The model's default-domain opset.
    opset: i64,
    /// The float constants that carry gradients; `None`: all of them.
    trainable: Option<HashSet<usize>>,
    /// Whether fed float inputs carry gradients.
    inputs_need_grad: bool,
    /// The shape constant of each Reshape step, by step index.
    reshape_targets: HashMap<usize, Vec<i64>>,
    steps: Vec<Step>,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    /// Fake quantization of layers, by step index.
    quant: HashMap<usize, LayerQuant>,
}

/// The values of one forward pass, kept for the backward pass.
pub struct Activations {
    values: Vec<Option<ArrayD<f32>>>,
    /// Values of other types (ids, masks, shapes).
    typed: Vec<Option<Tensor>>,
    /// Whether each value carries a gradient.
    needs: Vec<bool>,
    /// Fake-quantized (input, weight) of quantized steps.
    quantized: HashMap<usize, (ArrayD<f32>, ArrayD<f32>)>,
}

impl Activations {
    /// The value called `name`, if the pass computed or was fed it.
    pub fn get<'a>(&'a self, graph: &'a TrainGraph, name: &str) -> Option<&'a ArrayD<f32>> {
        graph
            .index
            .get(name)
            .and_then(|&i| self.values[i].as_ref().or_else(|| graph.constants.get(&i)))
    }

    /// The integer or boolean value called `name`, if the pass computed it.
    pub fn get_typed<'a>(&'a self, graph: &'a TrainGraph, name: &str) -> Option<&'a Tensor> {
        graph.index.get(name).and_then(|&i| {
            self.typed[i]
                .as_ref()
                .or_else(|| graph.typed_constants.get(&i))
        })
    }
}

/// The gradients of one backward pass, by value.
pub struct Gradients {
    grads: Vec<Option<ArrayD<f32>>>,
    clips: HashMap<String, (f64, f64)>,
}

impl Gradients {
    /// Moves ∂L/∂`name` out (for an optimizer step), if the loss depends on it.
    pub fn take(&mut self, graph: &TrainGraph, name: &str) -> Option<ArrayD<f32>> {
        graph.index.get(name).and_then(|&i| self.grads[i].take())
    }

    /// (∂L/∂clip_min, ∂L/∂clip_max) of the quantized layer `node`.
    pub fn clips(&self, node: &str) -> Option<(f64, f64)> {
        self.clips.get(node).copied()
    }

    /// ∂L/∂`name`, if the loss depends on it.
    pub fn get<'a>(&'a self, graph: &TrainGraph, name: &str) -> Option<&'a ArrayD<f32>> {
        graph.index.get(name).and_then(|&i| self.grads[i].as_ref())
    }
}

fn unsupported(n: &NodeProto, reason: impl Into<String>) -> TrainError {
    TrainError::Unsupported {
        node: n.name().to_string(),
        op: n.op_type().to_string(),
        reason: reason.into(),
    }
}

fn pair(v: &[i64], n: &NodeProto, what: &str) -> Result<(usize, usize), TrainError> {
    match v {
        [a, b] if *a >= 0 && *b >= 0 => Ok((*a as usize, *b as usize)),
        _ => Err(unsupported(
            n,
            format!("{what} {v:?}: only 2-D windows train"),
        )),
    }
}

/// Height and width of a 2-D window attribute.
type Hw = (usize, usize);

/// The node's 2-D window (`ops::window`), its refusal as this graph's.
fn window2d(n: &NodeProto) -> Result<crate::ops::window::Window2d, TrainError> {
    crate::ops::window::Window2d::parse(n).map_err(|why| unsupported(n, why))
}

/// A pool's kernel, which ONNX requires.
fn pool_kernel(n: &NodeProto, w: &crate::ops::window::Window2d) -> Result<Hw, TrainError> {
    w.kernel
        .ok_or_else(|| unsupported(n, "kernel_shape is missing: only 2-D windows train"))
}

/// Pads as the kernels take them.
fn quad(p: [usize; 4]) -> (usize, usize, usize, usize) {
    (p[0], p[1], p[2], p[3])
}

impl TrainGraph {
    /// Builds the training graph of `model` (BatchNormalization should be
    /// folded first: it is not a trainable operator here).
    pub fn new(model: &ModelProto) -> Result<TrainGraph, TrainError> {
        let g: &GraphProto = model
            .graph
            .as_ref()
            .ok_or_else(|| TrainError::Invalid("the model holds no graph".into()))?;
        let baked_batch = crate::sim::baked_batch(model);
        let order = GraphIndex::new(g)
            .map_err(|e| TrainError::Invalid(e.to_string()))?
            .topological_order()
            .to_vec();
        let mut t = TrainGraph {
            names: Vec::new(),
            index: HashMap::new(),
            constants: HashMap::new(),
            typed_constants: HashMap::new(),
            opset: crate::onnx::default_opset(model).unwrap_or(13),
            trainable: None,
            inputs_need_grad: true,
            reshape_targets: HashMap::new(),
            steps: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            quant: HashMap::new(),
        };
        for init in &g.initializer {
            let id = t.id(init.name());
            match to_tensor(init).map_err(|e| TrainError::Invalid(e.to_string()))? {
                Tensor::F32(a) => {
                    t.constants.insert(id, a);
                }
                other => {
                    t.typed_constants.insert(id, other);
                }
            }
        }
        for v in &g.input {
            if !t.index.contains_key(v.name()) || !t.constants.contains_key(&t.index[v.name()]) {
                let id = t.id(v.name());
                t.inputs.push(id);
            }
        }
        for &i in &order {
            let n = &g.node[i];
            if n.op_type() == "Constant" {
                // A constant value: known before any pass, like an initializer.
                let value = crate::onnx::attr::find(n, "value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| unsupported(n, "only 'value' tensors are supported"))?;
                let out = n
                    .output
                    .first()
                    .ok_or_else(|| unsupported(n, "no output"))?;
                let id = t.id(out);
                match to_tensor(value).map_err(|e| TrainError::Invalid(e.to_string()))? {
                    Tensor::F32(a) => {
                        t.constants.insert(id, a);
                    }
                    other => {
                        t.typed_constants.insert(id, other);
                    }
                }
                continue;
            }
            let opset = t.opset;
            let op = match n.op_type() {
                _ if Unary::of(n).is_some() => Op::Unary(Unary::of(n).expect("checked")),
                "Conv" => {
                    let w = window2d(n)?;
                    Op::Conv {
                        group: w.group,
                        strides: w.strides,
                        dilations: w.dilations,
                        pads: quad(w.pads),
                    }
                }
                "ConvTranspose" => {
                    if Window::group_of(n) != 1
                        || crate::onnx::attr::find(n, "output_shape").is_some()
                    {
                        return Err(unsupported(
                            n,
                            "groups or output_shape: only group 1 with explicit pads trains",
                        ));
                    }
                    let w = window2d(n)?;
                    Op::ConvTranspose {
                        strides: w.strides,
                        dilations: w.dilations,
                        pads: quad(w.pads),
                        output_padding: pair(
                            &ints_attr(n, "output_padding").unwrap_or(vec![0, 0]),
                            n,
                            "output_padding",
                        )?,
                    }
                }
                "Gemm" => {
                    let gemm = Gemm::parse(n).map_err(|e| unsupported(n, &e))?;
                    if !gemm.is_plain_product() {
                        return Err(unsupported(
                            n,
                            "transA, alpha or beta other than the defaults",
                        ));
                    }
                    Op::Gemm {
                        trans_b: gemm.trans_b,
                    }
                }
                "Relu" => Op::Relu,
                "Clip" => {
                    let bound = |k: usize, default: f32| -> Result<f32, TrainError> {
                        match n.input.get(k).filter(|s| !s.is_empty()) {
                            None => Ok(default),
                            Some(name) => t
                                .index
                                .get(name)
                                .and_then(|id| t.constants.get(id))
                                .and_then(|a| a.iter().next().copied())
                                .ok_or_else(|| unsupported(n, "bounds must be constants")),
                        }
                    };
                    Op::Clip {
                        lo: bound(1, f32::NEG_INFINITY)?,
                        hi: bound(2, f32::INFINITY)?,
                    }
                }
                "MaxPool" => {
                    if Window::dilates(n)
                        || int_attr(n, "ceil_mode").unwrap_or(0) != 0
                        || n.output.len() > 1
                    {
                        return Err(unsupported(n, "dilations, ceil_mode or indices output"));
                    }
                    let w = window2d(n)?;
                    Op::MaxPool {
                        kernel: pool_kernel(n, &w)?,
                        strides: w.strides,
                        pads: quad(w.pads),
                    }
                }
                "AveragePool" => {
                    let w = window2d(n)?;
                    if w.pads != [0; 4] || int_attr(n, "ceil_mode").unwrap_or(0) != 0 {
                        return Err(unsupported(n, "padding or ceil_mode"));
                    }
                    Op::AveragePool {
                        kernel: pool_kernel(n, &w)?,
                        strides: w.strides,
                    }
                }
                "GlobalAveragePool" => Op::GlobalAveragePool,
                "Flatten" => {
                    let axis = match Layout::parse(
                        n,
                        crate::onnx::default_opset(model).unwrap_or(13),
                        0,
                        &|_| None,
                    ) {
                        Ok(Some(Layout::Flatten(axis))) => axis,
                        _ => return Err(unsupported(n, "a malformed Flatten")),
                    };
                    if axis < 0 {
                        return Err(unsupported(n, "negative axis"));
                    }
                    Op::Flatten {
                        axis: axis as usize,
                    }
                }
                "Reshape" => Op::Reshape,
                "Add" => Op::Add,
                "Sub" => Op::Sub,
                "Mul" => Op::Mul,
                "Div" => Op::Div,
                "Pow" => Op::Pow,
                "Sigmoid" => Op::Sigmoid,
                "LayerNormalization" => {
                    let parsed = crate::ops::norm::LayerNorm::parse(n, &[1.0], None)
                        .map_err(|e| unsupported(n, e))?;
                    Op::LayerNorm(NormAttrs {
                        axis: parsed.axis,
                        epsilon: parsed.epsilon,
                    })
                }
                "ReduceMean" | "ReduceSum" => {
                    let operand = |k: usize| {
                        n.input
                            .get(k)
                            .and_then(|name| t.index.get(name))
                            .and_then(|id| t.typed_constants.get(id))
                    };
                    match Reduce::parse(n, opset, &operand) {
                        Ok(Some(r)) => Op::Reduce(r),
                        Ok(None) => return Err(unsupported(n, "not a reduction")),
                        Err(e) => return Err(unsupported(n, e)),
                    }
                }
                "Gather" => Op::Gather {
                    axis: int_attr(n, "axis").unwrap_or(0),
                },
                "Where" => Op::Where,
                "Concat" => Op::Concat {
                    axis: int_attr(n, "axis").unwrap_or(0),
                },
                "Softmax" => {
                    let opset = crate::onnx::default_opset(model).unwrap_or(13);
                    let Softmax { axis, flattened } = Softmax::parse(n, opset);
                    if flattened && axis != -1 {
                        return Err(unsupported(
                            n,
                            "Softmax before opset 13 flattens; re-export with opset >= 13",
                        ));
                    }
                    Op::Softmax { axis }
                }
                "Transpose" => match Layout::parse(
                    n,
                    crate::onnx::default_opset(model).unwrap_or(13),
                    0,
                    &|_| None,
                ) {
                    Ok(Some(Layout::Transpose(perm))) => Op::Transpose {
                        perm: (!perm.is_empty())
                            .then(|| perm.iter().map(|&v| v.max(0) as usize).collect()),
                    },
                    _ => return Err(unsupported(n, "a malformed perm")),
                },
                "MatMul" => Op::MatMul,
                "Resize"
                    if crate::onnx::attr::string_attr(n, "mode")
                        .is_some_and(|m| m != b"nearest")
                        && crate::ops::evaluates(n) =>
                {
                    // Linear and cubic Resize (a ViT's position embeddings
                    // adapted to the image size): run, gradients not traced.
                    Op::Evaluate
                }
                "Resize" => {
                    let mode = crate::onnx::attr::string_attr(n, "mode").unwrap_or(b"nearest");
                    if mode != b"nearest" {
                        return Err(unsupported(n, "only nearest Resize trains"));
                    }
                    let text = |k: &str, d: &str| {
                        crate::onnx::attr::string_attr(n, k)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_else(|| d.to_string())
                    };
                    let lookup = |k: usize| {
                        n.input
                            .get(k)
                            .filter(|s| !s.is_empty())
                            .and_then(|s| t.index.get(s))
                            .copied()
                    };
                    let scales = lookup(2)
                        .and_then(|id| t.constants.get(&id))
                        .map(|a| a.iter().copied().collect::<Vec<f32>>());
                    let sizes = lookup(3).and_then(|id| t.int_constant(id));
                    let (sizes, scales) = match (sizes, scales) {
                        (Some(s), _) if s.len() == 4 && s.iter().all(|&v| v > 0) => {
                            (Some((s[2] as usize, s[3] as usize)), (0.0, 0.0))
                        }
                        (_, Some(sc))
                            if sc.len() == 4
                                && sc[0] == 1.0
                                && sc[1] == 1.0
                                && sc[2] > 0.0
                                && sc[3] > 0.0 =>
                        {
                            (None, (sc[2], sc[3]))
                        }
                        _ => {
                            return Err(unsupported(
                                n,
                                "scales or sizes must be constants over a 4-D input, N and C unscaled",
                            ));
                        }
                    };
                    let coordinates = text("coordinate_transformation_mode", "half_pixel");
                    let nearest = text("nearest_mode", "round_prefer_floor");
                    if ![
                        "asymmetric",
                        "half_pixel",
                        "pytorch_half_pixel",
                        "align_corners",
                    ]
                    .contains(&coordinates.as_str())
                        || !["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
                            .contains(&nearest.as_str())
                    {
                        return Err(unsupported(
                            n,
                            format!(
                                "coordinate_transformation_mode {coordinates} / nearest_mode {nearest}"
                            ),
                        ));
                    }
                    Op::Resize {
                        sizes,
                        scales,
                        coordinates,
                        nearest,
                    }
                }
                _ if crate::ops::evaluates(n) => Op::Evaluate,
                other => {
                    return Err(unsupported(
                        n,
                        format!(
                            "{other} cannot be trained yet; keep it out of the model, or run post-training quantization"
                        ),
                    ));
                }
            };
            let several = n.output.iter().skip(1).any(|o| !o.is_empty());
            if n.output.is_empty() || several && !matches!(op, Op::Evaluate) {
                return Err(unsupported(n, "needs exactly one output"));
            }
            if n.input.is_empty() && !matches!(op, Op::Evaluate) {
                return Err(unsupported(n, "needs at least one input"));
            }
            // Resize's scales/sizes and a reduction's axes are constants read
            // at build time, not values.
            let data_inputs = if matches!(op, Op::Resize { .. } | Op::Reduce(_)) {
                1
            } else {
                n.input.len()
            };
            let args = n
                .input
                .iter()
                .map(|s| (!s.is_empty()).then(|| t.id(s)))
                .collect::<Vec<_>>();
            let generic = crate::ops::evaluates(n).then(|| Box::new(n.clone()));
            let inputs: Vec<usize> = n
                .input
                .iter()
                .take(data_inputs)
                .filter(|s| !s.is_empty())
                .map(|s| t.id(s))
                .collect();
            if let Op::Reshape = op {
                let shape = n.input.get(1).map(|s| t.id(s));
                // A constant shape is read once; a computed one at every pass.
                if let Some(mut target) = shape.and_then(|id| t.int_constant(id)) {
                    // A model exported for batch b reshapes to [b, ...]: training
                    // batches keep their own batch axis instead (0 copies it).
                    if baked_batch.is_some_and(|b| target.first() == Some(&b)) {
                        target[0] = 0;
                    }
                    t.reshape_targets.insert(t.steps.len(), target);
                }
            }
            // One step per output (a Split's parts), each evaluating the node.
            for (part, name) in n.output.iter().enumerate() {
                if name.is_empty() {
                    continue;
                }
                let output = t.id(name);
                t.steps.push(Step {
                    node: n.name().to_string(),
                    op: op.clone(),
                    inputs: Vec::clone(&inputs),
                    args: Vec::clone(&args),
                    generic: generic.clone(),
                    part,
                    output,
                });
            }
        }
        for o in &g.output {
            let id = t.id(o.name());
            t.outputs.push(id);
        }
        Ok(t)
    }

    /// The integers of a typed constant.
    fn int_constant(&self, id: usize) -> Option<Vec<i64>> {
        self.typed_constants
            .get(&id)
            .and_then(|t| crate::ops::ints_of(t).ok())
    }

    /// Only the float constants `names` carry gradients from now on (the
    /// trained weights; other constants, the fed inputs and whatever depends
    /// on them alone skip their backward pass).
    pub fn train_only(&mut self, names: &[String]) {
        self.trainable = Some(
            names
                .iter()
                .filter_map(|n| self.index.get(n).copied())
                .collect(),
        );
        self.inputs_need_grad = false;
    }

    fn id(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), self.names.len() - 1);
        self.names.len() - 1
    }

    /// Fake-quantizes the Conv or Gemm node `node` from now on.
    pub fn set_quant(&mut self, node: &str, q: LayerQuant) -> Result<(), TrainError> {
        let (k, s) = self
            .steps
            .iter()
            .enumerate()
            .find(|(_, s)| s.node == node)
            .ok_or_else(|| TrainError::Invalid(format!("no node '{node}' to quantize")))?;
        if !matches!(
            s.op,
            Op::Conv { .. } | Op::ConvTranspose { .. } | Op::Gemm { .. } | Op::MatMul
        ) {
            return Err(TrainError::Invalid(format!(
                "node '{node}' is not a Conv, ConvTranspose, Gemm or MatMul; only those are quantized"
            )));
        }
        if ulq_grid(q.clip_min, q.clip_max, 8).is_none() {
            return Err(TrainError::Invalid(format!(
                "node '{node}': clip range [{}, {}] is empty",
                q.clip_min, q.clip_max
            )));
        }
        self.quant.insert(k, q);
        Ok(())
    }

    /// The fake quantization of `node`, to read or update (clips).
    pub fn quant_mut(&mut self, node: &str) -> Option<&mut LayerQuant> {
        let k = self.steps.iter().position(|s| s.node == node)?;
        self.quant.get_mut(&k)
    }

    /// The float32 initializers `names` (in that order), all mutable at once
    /// for an optimizer step; `None` where there is no such initializer.
    pub fn constants_mut(&mut self, names: &[String]) -> Vec<Option<&mut ArrayD<f32>>> {
        let slot: HashMap<usize, usize> = names
            .iter()
            .enumerate()
            .filter_map(|(k, n)| self.index.get(n).map(|&id| (id, k)))
            .collect();
        let mut out: Vec<Option<&mut ArrayD<f32>>> = names.iter().map(|_| None).collect();
        for (id, a) in self.constants.iter_mut() {
            if let Some(&k) = slot.get(id) {
                out[k] = Some(a);
            }
        }
        out
    }

    /// The float32 initializer `name`, for a trainer to update.
    pub fn constant_mut(&mut self, name: &str) -> Option<&mut ArrayD<f32>> {
        let id = *self.index.get(name)?;
        self.constants.get_mut(&id)
    }

    /// The names of the graph outputs.
    pub fn output_names(&self) -> Vec<&str> {
        self.outputs
            .iter()
            .map(|&i| self.names[i].as_str())
            .collect()
    }

    /// Runs the graph on `feeds` (float graph inputs by name).
    pub fn forward(&self, feeds: &[(&str, &ArrayD<f32>)]) -> Result<Activations, TrainError> {
        let mut pass = self.new_pass();
        for (name, a) in feeds {
            let id = self.input_id(name)?;
            pass.values[id] = Some((*a).clone());
            pass.needs[id] = self.inputs_need_grad;
        }
        self.run_pass(pass)
    }

    /// Runs the graph on `feeds` of any type (token ids, masks, images).
    pub fn forward_tensors(&self, feeds: &[(&str, &Tensor)]) -> Result<Activations, TrainError> {
        let mut pass = self.new_pass();
        for (name, t) in feeds {
            let id = self.input_id(name)?;
            match t {
                Tensor::F32(a) => {
                    pass.values[id] = Some(a.clone());
                    pass.needs[id] = self.inputs_need_grad;
                }
                other => pass.typed[id] = Some((*other).clone()),
            }
        }
        self.run_pass(pass)
    }

    fn input_id(&self, name: &str) -> Result<usize, TrainError> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| TrainError::Invalid(format!("'{name}' is not an input of the model")))
    }

    fn new_pass(&self) -> Activations {
        let n = self.names.len();
        Activations {
            values: vec![None; n],
            typed: vec![None; n],
            needs: (0..n)
                .map(|i| match &self.trainable {
                    None => self.constants.contains_key(&i),
                    Some(set) => set.contains(&i),
                })
                .collect(),
            quantized: HashMap::new(),
        }
    }

    /// Value `i` of a pass: computed or fed, else a constant of the graph.
    fn value_of<'a>(&'a self, pass: &'a Activations, i: usize) -> Option<Val<'a>> {
        pass.values[i]
            .as_ref()
            .or_else(|| self.constants.get(&i))
            .map(Val::F)
            .or_else(|| {
                pass.typed[i]
                    .as_ref()
                    .or_else(|| self.typed_constants.get(&i))
                    .map(Val::T)
            })
    }

    fn run_pass(&self, mut pass: Activations) -> Result<Activations, TrainError> {
        // Constants are read from the graph, not copied into every pass.
        for (k, s) in self.steps.iter().enumerate() {
            let lookup = |i: usize| self.value_of(&pass, i);
            let missing = |i: usize| {
                TrainError::Invalid(format!(
                    "node '{}': input '{}' has no value (not fed?)",
                    s.node, self.names[i]
                ))
            };
            let started = profiling().then(std::time::Instant::now);
            let x: Vec<Val<'_>> = s
                .inputs
                .iter()
                .map(|&i| lookup(i).ok_or_else(|| missing(i)))
                .collect::<Result<_, _>>()?;
            let y = if matches!(s.op, Op::Evaluate) || !self.kernel_takes(s, &x) {
                let args: Vec<Option<Val<'_>>> = s
                    .args
                    .iter()
                    .map(|a| a.map(|i| lookup(i).ok_or_else(|| missing(i))).transpose())
                    .collect::<Result<_, _>>()?;
                self.evaluate(s, &args)?
            } else {
                let (xf, xt) = split(&x);
                match self.quant.get(&k) {
                    Some(q) => {
                        let (xq, wq) =
                            fake_quantize(q, &s.op, xf[0], xf[1]).map_err(|e| self.bad(s, e))?;
                        let mut qx = vec![&xq, &wq];
                        qx.extend(xf.iter().skip(2).copied());
                        let y = self.run_step(k, s, &qx, &xt)?;
                        pass.quantized.insert(k, (xq, wq));
                        Tensor::F32(y)
                    }
                    None => Tensor::F32(self.run_step(k, s, &xf, &xt)?),
                }
            };
            if let Some(t) = started {
                eprintln!(
                    "{:>9.3} ms forward {} {:?}",
                    t.elapsed().as_secs_f64() * 1e3,
                    s.node,
                    op_name(&s.op)
                );
            }
            match y {
                Tensor::F32(a) => {
                    pass.needs[s.output] = self.quant.contains_key(&k)
                        || s.args.iter().flatten().any(|&i| pass.needs[i]);
                    pass.values[s.output] = Some(a);
                }
                other => pass.typed[s.output] = Some(other),
            }
        }
        Ok(pass)
    }

    /// Whether the step's own kernel takes these inputs: float values
    /// where it reads values, integers or booleans where it reads indices,
    /// a condition or a computed shape.
    fn kernel_takes(&self, s: &Step, x: &[Val<'_>]) -> bool {
        let float = |k: usize| matches!(x.get(k), Some(Val::F(_)));
        let typed = |k: usize| matches!(x.get(k), Some(Val::T(_)));
        match s.op {
            Op::Gather { .. } => float(0) && typed(1),
            Op::Where => typed(0) && float(1) && float(2),
            Op::Reshape => float(0),
            _ => (0..x.len()).all(float),
        }
    }

    /// A node run by the engine's evaluator on inputs of any type.
    fn evaluate(&self, s: &Step, args: &[Option<Val<'_>>]) -> Result<Tensor, TrainError> {
        let node = s.generic.as_deref().ok_or_else(|| {
            self.bad(
                s,
                "its inputs are not float values, which is all it trains on".into(),
            )
        })?;
        if node.op_type() == "Shape" {
            // Only the shape is read: a float input is not copied.
            let x = args
                .first()
                .copied()
                .flatten()
                .ok_or_else(|| self.bad(s, "no input".into()))?;
            return Ok(crate::ops::layout::shape_of(
                x.shape(),
                int_attr(node, "start").unwrap_or(0),
                int_attr(node, "end"),
            ));
        }
        let owned: Vec<Option<std::borrow::Cow<'_, Tensor>>> =
            args.iter().map(|a| a.map(Val::tensor)).collect();
        let refs: Vec<Option<&Tensor>> = owned.iter().map(|o| o.as_deref()).collect();
        match crate::ops::eval_constant(node, self.opset, &refs) {
            Some(Ok(mut out)) if s.part < out.len() => Ok(out.swap_remove(s.part)),
            Some(Ok(_)) => Err(self.bad(s, format!("no output {}", s.part))),
            Some(Err(e)) => Err(self.bad(s, e)),
            None => Err(self.bad(s, "the engine does not evaluate it".into())),
        }
    }

    fn bad(&self, s: &Step, why: String) -> TrainError {
        TrainError::Invalid(format!("node '{}': {why}", s.node))
    }

    fn run_step(
        &self,
        k: usize,
        s: &Step,
        x: &[&ArrayD<f32>],
        xt: &[Option<&Tensor>],
    ) -> Result<ArrayD<f32>, TrainError> {
        let typed = |k: usize| {
            xt.get(k)
                .copied()
                .flatten()
                .ok_or_else(|| self.bad(s, format!("input {k} is not an integer or boolean value")))
        };
        Ok(match &s.op {
            Op::Conv {
                group,
                strides,
                dilations,
                pads,
            } => {
                let geom = conv_geometry(x[0], x[1], *group, *strides, *dilations, *pads)
                    .map_err(|e| self.bad(s, e))?;
                let bias = x.get(2).map(|b| b.as_slice().unwrap_or(&[]).to_vec());
                conv_forward(&geom, x[0], x[1], bias.as_deref())
            }
            Op::Gemm { trans_b } => {
                let a = x[0]
                    .view()
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let b = x[1]
                    .view()
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let y = if *trans_b { a.dot(&b.t()) } else { a.dot(&b) }.into_dyn();
                match x.get(2) {
                    Some(c) => &y + &c.view(),
                    None => y,
                }
            }
            Op::Relu => ndarray::Zip::from(x[0]).par_map_collect(|&v| v.max(0.0)),
            Op::Clip { lo, hi } => ndarray::Zip::from(x[0]).par_map_collect(|&v| v.clamp(*lo, *hi)),
            Op::MaxPool {
                kernel,
                strides,
                pads,
            } => pool(x[0], *kernel, *strides, *pads, true).0,
            Op::AveragePool { kernel, strides } => {
                pool(x[0], *kernel, *strides, (0, 0, 0, 0), false).0
            }
            Op::GlobalAveragePool => {
                let sh = x[0].shape();
                let (n, c) = (sh[0], sh[1]);
                let mean = x[0]
                    .to_shape((n, c, sh[2..].iter().product::<usize>()))
                    .map_err(|e| self.bad(s, e.to_string()))?
                    .mean_axis(Axis(2))
                    .ok_or_else(|| self.bad(s, "empty plane".into()))?;
                let mut out_shape = vec![n, c];
                out_shape.extend(std::iter::repeat_n(1, sh.len() - 2));
                mean.into_shape_with_order(IxDyn(&out_shape))
                    .map_err(|e| self.bad(s, e.to_string()))?
            }
            Op::Flatten { axis } => {
                let sh = x[0].shape();
                let rows: usize = sh[..*axis].iter().product();
                x[0].to_shape((rows, x[0].len() / rows.max(1)))
                    .map_err(|e| self.bad(s, e.to_string()))?
                    .to_owned()
                    .into_dyn()
            }
            Op::Reshape => {
                let computed;
                let target = match self.reshape_targets.get(&k) {
                    Some(t) => t,
                    None => {
                        computed = crate::ops::ints_of(typed(1)?).map_err(|e| self.bad(s, e))?;
                        &computed
                    }
                };
                let shape = crate::ops::layout::reshape_dims(x[0].shape(), target, false)
                    .map_err(|e| self.bad(s, e))?;
                x[0].to_shape(IxDyn(&shape))
                    .map_err(|e| self.bad(s, e.to_string()))?
                    .to_owned()
            }
            Op::Add => {
                if x[0].shape() == x[1].shape() {
                    x[0] + x[1]
                } else {
                    (&x[0].view() + &x[1].view()).to_owned()
                }
            }
            Op::Mul => (&x[0].view() * &x[1].view()).to_owned(),
            Op::Sub => (&x[0].view() - &x[1].view()).to_owned(),
            Op::Div => (&x[0].view() / &x[1].view()).to_owned(),
            Op::Pow => broadcast2(x[0], x[1], f32::powf).map_err(|e| self.bad(s, e))?,
            Op::Sigmoid => x[0].mapv(|v| 1.0 / (1.0 + (-v).exp())),
            Op::Unary(u) => ndarray::Zip::from(x[0]).par_map_collect(|&v| u.apply(v)),
            Op::LayerNorm(attrs) => {
                layer_norm(*attrs, x[0], x[1], x.get(2).copied()).map_err(|e| self.bad(s, e))?
            }
            Op::Reduce(r) => r.run(x[0]).map_err(|e| self.bad(s, e))?,
            Op::Gather { axis } => gather(x[0], typed(1)?, *axis).map_err(|e| self.bad(s, e))?,
            Op::Where => where_(typed(0)?, x[1], x[2]).map_err(|e| self.bad(s, e))?,
            Op::Evaluate => return Err(self.bad(s, "evaluated, not run".into())),
            Op::Concat { axis } => {
                let ax = axis_index(*axis, x[0].ndim()).map_err(|e| self.bad(s, e))?;
                if x.iter().any(|a| a.ndim() != x[0].ndim()) {
                    return Err(self.bad(s, "Concat's inputs differ in rank".into()));
                }
                let views: Vec<_> = x.iter().map(|a| a.view()).collect();
                ndarray::concatenate(Axis(ax), &views).map_err(|e| self.bad(s, e.to_string()))?
            }
            Op::Softmax { axis } => {
                let ax = axis_index(*axis, x[0].ndim()).map_err(|e| self.bad(s, e))?;
                softmax(x[0], ax)
            }
            Op::Transpose { perm } => {
                let p = perm_of(perm, x[0].ndim()).map_err(|e| self.bad(s, e))?;
                x[0].view()
                    .permuted_axes(IxDyn(&p))
                    .as_standard_layout()
                    .to_owned()
            }
            Op::ConvTranspose { .. } => {
                let g = transposed(&s.op, x[0], x[1]).map_err(|e| self.bad(s, e))?;
                let mut y = conv_input_grad(&g, x[1], x[0]);
                if let Some(b) = x.get(2) {
                    let plane = g.h * g.w;
                    if let Some(ys) = y.as_slice_mut() {
                        for (k, chunk) in ys.chunks_mut(plane).enumerate() {
                            let add = b.iter().nth(k % g.c).copied().unwrap_or(0.0);
                            chunk.iter_mut().for_each(|v| *v += add);
                        }
                    }
                }
                y
            }
            Op::Resize { .. } => {
                let (oh, ow, rows, cols) =
                    resize_maps(&s.op, x[0].shape()).map_err(|e| self.bad(s, e))?;
                let sh = x[0].shape();
                let (n, c, h, w) = (sh[0], sh[1], sh[2], sh[3]);
                let xs: Vec<f32> = x[0].iter().copied().collect();
                let mut out = Vec::with_capacity(n * c * oh * ow);
                for nc in 0..n * c {
                    for &r in &rows {
                        for &col in &cols {
                            out.push(xs[(nc * h + r) * w + col]);
                        }
                    }
                }
                ArrayD::from_shape_vec(IxDyn(&[n, c, oh, ow]), out)
                    .map_err(|e| self.bad(s, e.to_string()))?
            }
            Op::MatMul => matmul(x[0], x[1]).map_err(|e| self.bad(s, e))?,
        })
    }

    /// Back-propagates `seeds` (∂L/∂output for graph outputs, by name)
    /// through the pass that produced `acts`.
    pub fn backward(
        &self,
        acts: &Activations,
        seeds: &[(&str, ArrayD<f32>)],
    ) -> Result<Gradients, TrainError> {
        let mut grads: Vec<Option<ArrayD<f32>>> = vec![None; self.names.len()];
        let mut clips = HashMap::new();
        for (name, g) in seeds {
            let id = *self.index.get(*name).ok_or_else(|| {
                TrainError::Invalid(format!("'{name}' is not a value of the model"))
            })?;
            grads[id] = Some(g.clone());
        }
        let value = |i: usize| -> Result<Val<'_>, TrainError> {
            self.value_of(acts, i)
                .ok_or_else(|| TrainError::Invalid(format!("'{}' was not computed", self.names[i])))
        };
        let wants = |i: usize, v: &Val<'_>| matches!(v, Val::F(_)) && acts.needs[i];
        for (step, s) in self.steps.iter().enumerate().rev() {
            if !acts.needs[s.output] {
                continue;
            }
            let Some(gy) = grads[s.output].take() else {
                continue;
            };
            let x: Vec<Val<'_>> = s
                .inputs
                .iter()
                .map(|&i| value(i))
                .collect::<Result<_, _>>()?;
            let Val::F(y) = value(s.output)? else {
                continue;
            };
            let started = profiling().then(std::time::Instant::now);
            let (targets, gx): (Vec<Option<usize>>, Vec<Option<ArrayD<f32>>>) =
                if matches!(s.op, Op::Evaluate) || !self.kernel_takes(s, &x) {
                    let args: Vec<Option<Val<'_>>> = s
                        .args
                        .iter()
                        .map(|a| a.map(value).transpose())
                        .collect::<Result<_, _>>()?;
                    // A constant operand of an evaluated node (a Pad's
                    // value) is not trained; its first input may be.
                    let wanted: Vec<bool> = s
                        .args
                        .iter()
                        .zip(&args)
                        .enumerate()
                        .map(|(k, (a, v))| match (a, v) {
                            (Some(i), Some(v)) => {
                                wants(*i, v) && (k == 0 || !self.constants.contains_key(i))
                            }
                            _ => false,
                        })
                        .collect();
                    let g = self.evaluate_backward(s, &args, &wanted, &gy)?;
                    (s.args.clone(), g)
                } else {
                    let (xf, xt) = split(&x);
                    let mut wanted: Vec<bool> =
                        s.inputs.iter().zip(&x).map(|(&i, v)| wants(i, v)).collect();
                    let g = match (self.quant.get(&step), acts.quantized.get(&step)) {
                        (Some(q), Some((xq, wq))) => {
                            let mut qx = vec![xq, wq];
                            qx.extend(xf.iter().skip(2).copied());
                            // The clips learn from the input's gradient.
                            wanted[0] = true;
                            let mut g = self.step_backward(s, &qx, &xt, y, &gy, &wanted)?;
                            self.through_fake_quant(s, q, &xf, &mut g, &mut clips)?;
                            g
                        }
                        _ => self.step_backward(s, &xf, &xt, y, &gy, &wanted)?,
                    };
                    (s.inputs.iter().map(|&i| Some(i)).collect(), g)
                };
            if let Some(t) = started {
                eprintln!(
                    "{:>9.3} ms backward {} {:?}",
                    t.elapsed().as_secs_f64() * 1e3,
                    s.node,
                    op_name(&s.op)
                );
            }
            grads[s.output] = Some(gy);
            for (target, g) in targets.into_iter().zip(gx) {
                let (Some(id), Some(g)) = (target, g) else {
                    continue;
                };
                if !acts.needs[id] {
                    continue;
                }
                grads[id] = Some(match grads[id].take() {
                    Some(mut prev) if prev.shape() == g.shape() => {
                        ndarray::Zip::from(&mut prev)
                            .and(&g)
                            .par_for_each(|a, &b| *a += b);
                        prev
                    }
                    Some(prev) => prev + &g,
                    None => g,
                });
            }
        }
        Ok(Gradients { grads, clips })
    }

    /// A quantized step's input gradients through its fake quantization:
    /// ULQ on input 0 (its clips' gradients recorded); the weight's passes
    /// straight through.
    fn through_fake_quant(
        &self,
        s: &Step,
        q: &LayerQuant,
        x: &[&ArrayD<f32>],
        g: &mut [Option<ArrayD<f32>>],
        clips: &mut HashMap<String, (f64, f64)>,
    ) -> Result<(), TrainError> {
        if let Some(Some(gxq)) = g.first() {
            let grid = ulq_grid(q.clip_min, q.clip_max, 8)
                .ok_or_else(|| self.bad(s, "empty clip range".into()))?;
            let balanced = q
                .balance
                .as_ref()
                .map(|b| b.divide(x[0]))
                .transpose()
                .map_err(|e| self.bad(s, e))?;
            let seen = balanced.as_ref().unwrap_or(x[0]);
            let u = ulq_backward(&contiguous(seen), &contiguous(gxq), &grid, 8);
            clips.insert(s.node.clone(), (u.clip_min, u.clip_max));
            let gx = ArrayD::from_shape_vec(x[0].raw_dim(), u.input)
                .map_err(|e| self.bad(s, e.to_string()))?;
            // x' = x / s: ∂L/∂x = ∂L/∂x' / s; w' = w·s: ∂L/∂w = ∂L/∂w' · s.
            g[0] = Some(match &q.balance {
                Some(b) => b.divide(&gx).map_err(|e| self.bad(s, e))?,
                None => gx,
            });
            if let (Some(b), Some(Some(gw))) = (&q.balance, g.get(1)) {
                g[1] = Some(balance_weight(gw, &b.factors, b.axes));
            }
        }
        // A second computed input: straight through inside its fixed range.
        if let (Some((lo, hi)), Some(Some(gxq))) = (q.second, g.get(1)) {
            let grid = ulq_grid(lo, hi, 8).ok_or_else(|| self.bad(s, "empty clip range".into()))?;
            let u = ulq_backward(&contiguous(x[1]), &contiguous(gxq), &grid, 8);
            g[1] = Some(
                ArrayD::from_shape_vec(x[1].raw_dim(), u.input)
                    .map_err(|e| self.bad(s, e.to_string()))?,
            );
        }
        Ok(())
    }

    /// The input gradients of a node run by the engine's evaluator: only
    /// through the first input of a value-moving operator, or of a float
    /// Cast or Identity; a gradient wanted anywhere else is an error.
    fn evaluate_backward(
        &self,
        s: &Step,
        args: &[Option<Val<'_>>],
        wanted: &[bool],
        gy: &ArrayD<f32>,
    ) -> Result<Vec<Option<ArrayD<f32>>>, TrainError> {
        let node = s
            .generic
            .as_deref()
            .ok_or_else(|| self.bad(s, "no backward pass".into()))?;
        let op = node.op_type();
        let mut out = vec![None; args.len()];
        for (k, &want) in wanted.iter().enumerate() {
            if !want {
                continue;
            }
            let x_shape = args[k].map(|v| v.shape().to_vec()).unwrap_or_default();
            out[k] = Some(if k == 0 && matches!(op, "Identity" | "Cast") {
                gy.clone()
            } else if k == 0 && moves_values(op) {
                let owned: Vec<Option<std::borrow::Cow<'_, Tensor>>> = args
                    .iter()
                    .enumerate()
                    .map(|(j, a)| a.filter(|_| j > 0).map(Val::tensor))
                    .collect();
                let refs: Vec<Option<&Tensor>> = owned.iter().map(|o| o.as_deref()).collect();
                index_map_backward(node, self.opset, &refs, s.part, &x_shape, gy)
                    .map_err(|e| self.bad(s, e))?
            } else {
                return Err(TrainError::Unsupported {
                    node: s.node.clone(),
                    op: op.to_string(),
                    reason: format!(
                        "gradients do not pass through its input {k} ('{}'); keep trained weights out of its inputs",
                        node.input.get(k).map_or("", String::as_str)
                    ),
                });
            });
        }
        Ok(out)
    }

    fn step_backward(
        &self,
        s: &Step,
        x: &[&ArrayD<f32>],
        xt: &[Option<&Tensor>],
        y: &ArrayD<f32>,
        gy: &ArrayD<f32>,
        wanted: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>, TrainError> {
        let typed = |k: usize| {
            xt.get(k)
                .copied()
                .flatten()
                .ok_or_else(|| self.bad(s, format!("input {k} is not an integer or boolean value")))
        };
        let want = |k: usize| wanted.get(k).copied().unwrap_or(false);
        Ok(match &s.op {
            Op::Conv {
                group,
                strides,
                dilations,
                pads,
            } => {
                let geom = conv_geometry(x[0], x[1], *group, *strides, *dilations, *pads)
                    .map_err(|e| self.bad(s, e))?;
                let (gx, gw, gb) = conv_backward(&geom, x[0], x[1], gy);
                let mut out = vec![Some(gx), Some(gw)];
                if x.len() > 2 {
                    out.push(Some(gb));
                }
                out
            }
            Op::Gemm { trans_b } => {
                let a = x[0]
                    .view()
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let b = x[1]
                    .view()
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let g = gy
                    .view()
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let ga = if *trans_b { g.dot(&b) } else { g.dot(&b.t()) };
                let gb = if *trans_b {
                    g.t().dot(&a)
                } else {
                    a.t().dot(&g)
                };
                let mut out = vec![Some(ga.into_dyn()), Some(gb.into_dyn())];
                if let Some(c) = x.get(2) {
                    out.push(Some(reduce_to(&g.to_owned().into_dyn(), c.shape())));
                }
                out
            }
            Op::Relu => vec![Some(
                ndarray::Zip::from(gy)
                    .and(x[0])
                    .par_map_collect(|&g, &v| if v > 0.0 { g } else { 0.0 }),
            )],
            Op::Clip { lo, hi } => {
                let mut out =
                    vec![Some(ndarray::Zip::from(gy).and(x[0]).par_map_collect(
                        |&g, &v| if v > *lo && v < *hi { g } else { 0.0 },
                    ))];
                out.resize(x.len(), None);
                out
            }
            Op::MaxPool {
                kernel,
                strides,
                pads,
            } => {
                let (_, argmax) = pool(x[0], *kernel, *strides, *pads, true);
                let mut gx = ArrayD::<f32>::zeros(x[0].raw_dim());
                let gxs = gx
                    .as_slice_mut()
                    .ok_or_else(|| self.bad(s, "layout".into()))?;
                for (o, &src) in gy.iter().zip(&argmax) {
                    gxs[src] += o;
                }
                vec![Some(gx)]
            }
            Op::AveragePool { kernel, strides } => {
                vec![Some(avg_pool_backward(x[0], *kernel, *strides, gy))]
            }
            Op::GlobalAveragePool => {
                let sh = x[0].shape();
                let plane: usize = sh[2..].iter().product();
                let mut gx = ArrayD::<f32>::zeros(x[0].raw_dim());
                let (n, c) = (sh[0], sh[1]);
                let g = gy.iter().copied().collect::<Vec<f32>>();
                if let Some(gxs) = gx.as_slice_mut() {
                    for k in 0..n * c {
                        let v = g[k] / plane as f32;
                        gxs[k * plane..(k + 1) * plane].fill(v);
                    }
                }
                vec![Some(gx)]
            }
            Op::Flatten { .. } | Op::Reshape => {
                let gx = gy
                    .to_shape(x[0].raw_dim())
                    .map_err(|e| self.bad(s, e.to_string()))?
                    .to_owned();
                let mut out = vec![Some(gx)];
                out.resize(x.len(), None);
                out
            }
            Op::Add => vec![
                Some(reduce_to(gy, x[0].shape())),
                Some(reduce_to(gy, x[1].shape())),
            ],
            Op::Mul => vec![
                Some(reduce_to(
                    &(&gy.view() * &x[1].view()).to_owned(),
                    x[0].shape(),
                )),
                Some(reduce_to(
                    &(&gy.view() * &x[0].view()).to_owned(),
                    x[1].shape(),
                )),
            ],
            Op::Sigmoid => vec![Some(
                ndarray::Zip::from(gy)
                    .and(y)
                    .map_collect(|&g, &v| g * v * (1.0 - v)),
            )],
            Op::Unary(u) => vec![Some(
                ndarray::Zip::from(gy)
                    .and(x[0])
                    .par_map_collect(|&g, &v| g * u.derivative(v)),
            )],
            Op::Sub => vec![
                want(0).then(|| reduce_to(gy, x[0].shape())),
                want(1).then(|| reduce_to(&gy.mapv(|g| -g), x[1].shape())),
            ],
            Op::Div => vec![
                want(0).then(|| reduce_to(&(&gy.view() / &x[1].view()).to_owned(), x[0].shape())),
                want(1).then(|| {
                    let q = (&x[0].view() / &x[1].view()).to_owned();
                    let g = (&gy.view() * &(&q.view() / &x[1].view())).mapv(|v| -v);
                    reduce_to(&g, x[1].shape())
                }),
            ],
            Op::Pow => {
                let (a, b) = (x[0].broadcast(gy.raw_dim()), x[1].broadcast(gy.raw_dim()));
                let (Some(a), Some(b)) = (a, b) else {
                    return Err(self.bad(s, "Pow's operands do not broadcast".into()));
                };
                let base = ndarray::Zip::from(gy)
                    .and(&a)
                    .and(&b)
                    .map_collect(|&g, &a, &b| g * b * a.powf(b - 1.0));
                let exponent = ndarray::Zip::from(gy)
                    .and(&a)
                    .and(&b)
                    .map_collect(|&g, &a, &b| if a > 0.0 { g * a.powf(b) * a.ln() } else { 0.0 });
                vec![
                    want(0).then(|| reduce_to(&base, x[0].shape())),
                    want(1).then(|| reduce_to(&exponent, x[1].shape())),
                ]
            }
            Op::LayerNorm(attrs) => {
                let g = layer_norm_backward(*attrs, x[0], x[1], gy).map_err(|e| self.bad(s, e))?;
                let mut out = vec![Some(g.x), Some(g.scale)];
                if let Some(b) = x.get(2) {
                    out.push(Some(
                        g.bias
                            .into_shape_with_order(b.raw_dim())
                            .map_err(|e| self.bad(s, format!("its bias: {e}")))?,
                    ));
                }
                out
            }
            Op::Reduce(r) => vec![Some(
                reduce_backward(r, x[0].shape(), gy).map_err(|e| self.bad(s, e))?,
            )],
            Op::Gather { axis } => {
                let ids = typed(1)?;
                vec![
                    want(0)
                        .then(|| gather_backward(x[0].shape(), ids, *axis, gy))
                        .transpose()
                        .map_err(|e| self.bad(s, e))?,
                    None,
                ]
            }
            Op::Where => {
                let (gx, gyy) = where_backward(typed(0)?, x[1].shape(), x[2].shape(), gy)
                    .map_err(|e| self.bad(s, e))?;
                vec![None, Some(gx), Some(gyy)]
            }
            Op::Evaluate => return Err(self.bad(s, "evaluated, not run".into())),
            Op::Concat { axis } => {
                let ax = axis_index(*axis, gy.ndim()).map_err(|e| self.bad(s, e))?;
                let mut start = 0;
                x.iter()
                    .map(|a| {
                        let len = a.shape()[ax];
                        let part = gy
                            .slice_axis(Axis(ax), ndarray::Slice::from(start..start + len))
                            .to_owned();
                        start += len;
                        Some(part)
                    })
                    .collect()
            }
            Op::Softmax { axis } => {
                let ax = axis_index(*axis, gy.ndim()).map_err(|e| self.bad(s, e))?;
                let gyy = gy * y;
                let dot = gyy.sum_axis(Axis(ax)).insert_axis(Axis(ax));
                vec![Some(&gyy - &(y * &dot))]
            }
            Op::Transpose { perm } => {
                let p = perm_of(perm, gy.ndim()).map_err(|e| self.bad(s, e))?;
                let mut inverse = vec![0; p.len()];
                for (i, &v) in p.iter().enumerate() {
                    inverse[v] = i;
                }
                vec![Some(
                    gy.view()
                        .permuted_axes(IxDyn(&inverse))
                        .as_standard_layout()
                        .to_owned(),
                )]
            }
            Op::ConvTranspose { .. } => {
                let g = transposed(&s.op, x[0], x[1]).map_err(|e| self.bad(s, e))?;
                // The dual convolution reads gy (Cout channels) and writes x's shape.
                let gx = conv_forward(&g, gy, x[1], None);
                let cols = im2col(&g, &contiguous(gy));
                let xm = from_nchw(&g, x[0]);
                let gw = xm
                    .dot(&cols.t())
                    .into_shape_with_order(x[1].raw_dim())
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let mut out = vec![Some(gx), Some(gw)];
                if x.len() > 2 {
                    let plane = g.h * g.w;
                    let mut gb = vec![0f32; g.c];
                    for (k, chunk) in gy
                        .iter()
                        .copied()
                        .collect::<Vec<f32>>()
                        .chunks(plane)
                        .enumerate()
                    {
                        gb[k % g.c] += chunk.iter().sum::<f32>();
                    }
                    out.push(Some(
                        ArrayD::from_shape_vec(IxDyn(&[g.c]), gb)
                            .map_err(|e| self.bad(s, e.to_string()))?,
                    ));
                }
                out
            }
            Op::Resize { .. } => {
                let (_, _, rows, cols) =
                    resize_maps(&s.op, x[0].shape()).map_err(|e| self.bad(s, e))?;
                let sh = x[0].shape();
                let (h, w) = (sh[2], sh[3]);
                let mut gx = vec![0f32; x[0].len()];
                let mut g = gy.iter();
                for nc in 0..sh[0] * sh[1] {
                    for &r in &rows {
                        for &col in &cols {
                            gx[(nc * h + r) * w + col] += g.next().copied().unwrap_or(0.0);
                        }
                    }
                }
                let mut out = vec![Some(
                    ArrayD::from_shape_vec(x[0].raw_dim(), gx)
                        .map_err(|e| self.bad(s, e.to_string()))?,
                )];
                out.resize(x.len(), None);
                out
            }
            Op::MatMul => matmul_backward(x[0], x[1], gy, [want(0), want(1)])
                .map_err(|e| self.bad(s, e))?
                .into(),
        })
        .map(|mut v: Vec<Option<ArrayD<f32>>>| {
            v.truncate(x.len());
            v
        })
    }
}

/// A step's inputs as its kernels take them: the float values (a
/// placeholder where an input is typed) and the typed ones by position.
fn split<'a>(x: &[Val<'a>]) -> (Vec<&'a ArrayD<f32>>, Vec<Option<&'a Tensor>>) {
    x.iter()
        .map(|v| match *v {
            Val::F(a) => (a, None),
            Val::T(t) => (&*NOT_FLOAT, Some(t)),
        })
        .unzip()
}

/// `f(a, b)` element by element with NumPy broadcasting.
fn broadcast2(
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Result<ArrayD<f32>, String> {
    let rank = a.ndim().max(b.ndim());
    let dim = |s: &[usize], i: usize| (i + s.len()).checked_sub(rank).map_or(1, |j| s[j]);
    let shape: Vec<usize> = (0..rank)
        .map(|i| dim(a.shape(), i).max(dim(b.shape(), i)))
        .collect();
    let (Some(av), Some(bv)) = (a.broadcast(IxDyn(&shape)), b.broadcast(IxDyn(&shape))) else {
        return Err(format!(
            "{:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        ));
    };
    Ok(ndarray::Zip::from(&av)
        .and(&bv)
        .par_map_collect(|&x, &y| f(x, y)))
}

/// Developer aid (`docs/engine.md`): with `ASCEND_QUANT_PROFILE` set, each
/// step's forward and backward wall time on stderr.
fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("ASCEND_QUANT_PROFILE").is_some())
}

/// The operator's name for the profile.
fn op_name(op: &Op) -> String {
    let debug = format!("{op:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The dual convolution of a ConvTranspose step.
fn transposed(op: &Op, x: &ArrayD<f32>, w: &ArrayD<f32>) -> Result<ConvGeom, String> {
    let Op::ConvTranspose {
        strides,
        dilations,
        pads,
        output_padding,
    } = op
    else {
        return Err("not a ConvTranspose".into());
    };
    let window = TransposedWindow {
        strides: *strides,
        dilations: *dilations,
        pads: *pads,
        output_padding: *output_padding,
    };
    transposed_geometry(&window, x, w)
}
