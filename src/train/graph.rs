//! A differentiable execution of an ONNX graph on the CPU: the graph's nodes
//! become operators with a forward and a backward pass over `ndarray`
//! values, in topological order. Initializers are values like any other;
//! the gradient of every value is available after a backward pass, so a
//! trainer updates the ones it trains (weights, biases, clips).
//!
//! Supported today: Conv (dense, and depthwise through
//! [`super::depthwise`]), ConvTranspose (group 1), Gemm, MatMul (by a 2-D weight), Relu, Clip,
//! Sigmoid, HardSigmoid, HardSwish, MaxPool, AveragePool (no padding),
//! GlobalAveragePool, Flatten, Reshape, Transpose, Concat, Softmax, Add, Mul,
//! nearest Resize.
//! Any other operator is an error naming the node and the operator.

use super::depthwise::{self, Depthwise};
use super::fake_quant::{arq_retrain_forward, ulq_backward, ulq_forward, ulq_grid};
use crate::onnx::attr::{float_attr, int_attr, ints_attr};
use crate::onnx::graph::GraphIndex;
use crate::onnx::{GraphProto, ModelProto, NodeProto, to_tensor};
use crate::tensor::Tensor;
use ndarray::{Array2, ArrayD, Axis, Ix2, IxDyn};
use std::collections::HashMap;

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
enum Op {
    Conv {
        group: usize,
        strides: (usize, usize),
        dilations: (usize, usize),
        pads: (usize, usize, usize, usize),
    },
    Gemm {
        trans_b: bool,
    },
    Relu,
    Clip {
        lo: f32,
        hi: f32,
    },
    MaxPool {
        kernel: (usize, usize),
        strides: (usize, usize),
        pads: (usize, usize, usize, usize),
    },
    AveragePool {
        kernel: (usize, usize),
        strides: (usize, usize),
    },
    GlobalAveragePool,
    Flatten {
        axis: usize,
    },
    Reshape,
    Add,
    Mul,
    Sigmoid,
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    Concat {
        axis: i64,
    },
    Softmax {
        axis: i64,
    },
    Transpose {
        perm: Option<Vec<usize>>,
    },
    MatMul,
    ConvTranspose {
        strides: (usize, usize),
        dilations: (usize, usize),
        pads: (usize, usize, usize, usize),
        output_padding: (usize, usize),
    },
    Resize {
        /// Output height and width, or scales when `None`.
        sizes: Option<(usize, usize)>,
        scales: (f32, f32),
        coordinates: String,
        nearest: String,
    },
}

#[derive(Clone, Debug)]
struct Step {
    node: String,
    op: Op,
    inputs: Vec<usize>,
    output: usize,
}

/// A graph ready for forward and backward passes.
#[derive(Clone, Debug)]
pub struct TrainGraph {
    names: Vec<String>,
    index: HashMap<String, usize>,
    /// Initializer values (float32), by value id.
    constants: HashMap<usize, ArrayD<f32>>,
    /// Int64 constants (Reshape shapes), by value id.
    shapes: HashMap<usize, Vec<i64>>,
    /// The shape constant of each Reshape step, by step index.
    reshape_targets: HashMap<usize, usize>,
    steps: Vec<Step>,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    /// Fake quantization of layers, by step index.
    quant: HashMap<usize, LayerQuant>,
}

/// How one Conv or Gemm layer is fake-quantized while training: ULQ on its
/// input (learnable clips), ARQ-retrain on its weight.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerQuant {
    /// Lower clip of the input.
    pub clip_min: f32,
    /// Upper clip of the input.
    pub clip_max: f32,
    /// clip_min stays 0 (inputs produced by ReLU-like operators).
    pub fixed_min: bool,
    /// One weight scale per output channel (Conv only).
    pub channel_wise: bool,
}

/// The values of one forward pass, kept for the backward pass.
pub struct Activations {
    values: Vec<Option<ArrayD<f32>>>,
    /// Fake-quantized (input, weight) of quantized steps.
    quantized: HashMap<usize, (ArrayD<f32>, ArrayD<f32>)>,
}

impl Activations {
    /// The value called `name`, if the pass computed or was fed it.
    pub fn get<'a>(&'a self, graph: &TrainGraph, name: &str) -> Option<&'a ArrayD<f32>> {
        graph.index.get(name).and_then(|&i| self.values[i].as_ref())
    }
}

/// The gradients of one backward pass, by value.
pub struct Gradients {
    grads: Vec<Option<ArrayD<f32>>>,
    clips: HashMap<String, (f64, f64)>,
}

impl Gradients {
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

/// A pool's 2-D kernel and strides.
fn window(n: &NodeProto) -> Result<(Hw, Hw), TrainError> {
    let kernel = pair(
        &ints_attr(n, "kernel_shape").unwrap_or_default(),
        n,
        "kernel_shape",
    )?;
    let strides = pair(&ints_attr(n, "strides").unwrap_or(vec![1, 1]), n, "strides")?;
    Ok((kernel, strides))
}

fn pads4(n: &NodeProto) -> Result<(usize, usize, usize, usize), TrainError> {
    if int_attr(n, "auto_pad").is_some()
        || crate::onnx::attr::string_attr(n, "auto_pad").is_some_and(|p| p != b"NOTSET")
    {
        return Err(unsupported(n, "auto_pad: give explicit pads"));
    }
    match ints_attr(n, "pads").as_deref() {
        None => Ok((0, 0, 0, 0)),
        Some([t, l, b, r]) if [*t, *l, *b, *r].iter().all(|&v| v >= 0) => {
            Ok((*t as usize, *l as usize, *b as usize, *r as usize))
        }
        Some(p) => Err(unsupported(n, format!("pads {p:?}"))),
    }
}

impl TrainGraph {
    /// Builds the training graph of `model` (BatchNormalization should be
    /// folded first: it is not a trainable operator here).
    pub fn new(model: &ModelProto) -> Result<TrainGraph, TrainError> {
        let g: &GraphProto = model
            .graph
            .as_ref()
            .ok_or_else(|| TrainError::Invalid("the model holds no graph".into()))?;
        let order = GraphIndex::new(g)
            .map_err(|e| TrainError::Invalid(e.to_string()))?
            .topological_order()
            .to_vec();
        let mut t = TrainGraph {
            names: Vec::new(),
            index: HashMap::new(),
            constants: HashMap::new(),
            shapes: HashMap::new(),
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
                Tensor::I64(a) => {
                    t.shapes.insert(id, a.iter().copied().collect());
                }
                _ => {}
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
                    Tensor::I64(a) => {
                        t.shapes.insert(id, a.iter().copied().collect());
                    }
                    other => {
                        return Err(unsupported(n, format!("{} constants", other.dtype())));
                    }
                }
                continue;
            }
            let op = match n.op_type() {
                "Conv" => Op::Conv {
                    group: int_attr(n, "group").unwrap_or(1).max(1) as usize,
                    strides: pair(&ints_attr(n, "strides").unwrap_or(vec![1, 1]), n, "strides")?,
                    dilations: pair(
                        &ints_attr(n, "dilations").unwrap_or(vec![1, 1]),
                        n,
                        "dilations",
                    )?,
                    pads: pads4(n)?,
                },
                "ConvTranspose" => {
                    if int_attr(n, "group").unwrap_or(1) != 1
                        || crate::onnx::attr::find(n, "output_shape").is_some()
                    {
                        return Err(unsupported(
                            n,
                            "groups or output_shape: only group 1 with explicit pads trains",
                        ));
                    }
                    Op::ConvTranspose {
                        strides: pair(
                            &ints_attr(n, "strides").unwrap_or(vec![1, 1]),
                            n,
                            "strides",
                        )?,
                        dilations: pair(
                            &ints_attr(n, "dilations").unwrap_or(vec![1, 1]),
                            n,
                            "dilations",
                        )?,
                        pads: pads4(n)?,
                        output_padding: pair(
                            &ints_attr(n, "output_padding").unwrap_or(vec![0, 0]),
                            n,
                            "output_padding",
                        )?,
                    }
                }
                "Gemm" => {
                    if int_attr(n, "transA").unwrap_or(0) != 0
                        || float_attr(n, "alpha").unwrap_or(1.0) != 1.0
                        || float_attr(n, "beta").unwrap_or(1.0) != 1.0
                    {
                        return Err(unsupported(
                            n,
                            "transA, alpha or beta other than the defaults",
                        ));
                    }
                    Op::Gemm {
                        trans_b: int_attr(n, "transB").unwrap_or(0) == 1,
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
                    if ints_attr(n, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1))
                        || int_attr(n, "ceil_mode").unwrap_or(0) != 0
                        || n.output.len() > 1
                    {
                        return Err(unsupported(n, "dilations, ceil_mode or indices output"));
                    }
                    let (kernel, strides) = window(n)?;
                    Op::MaxPool {
                        kernel,
                        strides,
                        pads: pads4(n)?,
                    }
                }
                "AveragePool" => {
                    if pads4(n)? != (0, 0, 0, 0) || int_attr(n, "ceil_mode").unwrap_or(0) != 0 {
                        return Err(unsupported(n, "padding or ceil_mode"));
                    }
                    let (kernel, strides) = window(n)?;
                    Op::AveragePool { kernel, strides }
                }
                "GlobalAveragePool" => Op::GlobalAveragePool,
                "Flatten" => {
                    let axis = int_attr(n, "axis").unwrap_or(1);
                    if axis < 0 {
                        return Err(unsupported(n, "negative axis"));
                    }
                    Op::Flatten {
                        axis: axis as usize,
                    }
                }
                "Reshape" => Op::Reshape,
                "Add" => Op::Add,
                "Mul" => Op::Mul,
                "Sigmoid" => Op::Sigmoid,
                "HardSigmoid" => Op::HardSigmoid {
                    alpha: float_attr(n, "alpha").unwrap_or(0.2),
                    beta: float_attr(n, "beta").unwrap_or(0.5),
                },
                "HardSwish" => Op::HardSwish,
                "Concat" => Op::Concat {
                    axis: int_attr(n, "axis").unwrap_or(0),
                },
                "Softmax" => {
                    let opset = model
                        .opset_import
                        .iter()
                        .find(|o| o.domain().is_empty() || o.domain() == "ai.onnx")
                        .and_then(|o| o.version)
                        .unwrap_or(13);
                    let axis = int_attr(n, "axis").unwrap_or(if opset >= 13 { -1 } else { 1 });
                    if opset < 13 && axis != -1 {
                        return Err(unsupported(
                            n,
                            "Softmax before opset 13 flattens; re-export with opset >= 13",
                        ));
                    }
                    Op::Softmax { axis }
                }
                "Transpose" => Op::Transpose {
                    perm: ints_attr(n, "perm")
                        .map(|p| p.iter().map(|&v| v.max(0) as usize).collect()),
                },
                "MatMul" => Op::MatMul,
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
                    let sizes = lookup(3).and_then(|id| t.shapes.get(&id)).cloned();
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
                other => {
                    return Err(unsupported(
                        n,
                        format!(
                            "{other} cannot be trained yet; keep it out of the model, or run post-training quantization"
                        ),
                    ));
                }
            };
            if n.output.len() != 1 || n.input.is_empty() {
                return Err(unsupported(n, "needs one output and at least one input"));
            }
            // Reshape's shape and Resize's scales/sizes are constants read at
            // build time, not values.
            let data_inputs = if matches!(op, Op::Reshape | Op::Resize { .. }) {
                1
            } else {
                n.input.len()
            };
            let inputs = n
                .input
                .iter()
                .take(data_inputs)
                .filter(|s| !s.is_empty())
                .map(|s| t.id(s))
                .collect();
            if let Op::Reshape = op {
                let shape = n.input.get(1).map(|s| t.id(s));
                if shape.is_none_or(|id| !t.shapes.contains_key(&id)) {
                    return Err(unsupported(n, "the shape must be an int64 constant"));
                }
                t.reshape_targets
                    .insert(t.steps.len(), shape.unwrap_or_default());
            }
            let output = t.id(&n.output[0]);
            t.steps.push(Step {
                node: n.name().to_string(),
                op,
                inputs,
                output,
            });
        }
        for o in &g.output {
            let id = t.id(o.name());
            t.outputs.push(id);
        }
        Ok(t)
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

    /// Runs the graph on `feeds` (graph inputs by name).
    pub fn forward(&self, feeds: &[(&str, &ArrayD<f32>)]) -> Result<Activations, TrainError> {
        let mut values: Vec<Option<ArrayD<f32>>> = vec![None; self.names.len()];
        for (&id, a) in &self.constants {
            values[id] = Some(a.clone());
        }
        for (name, a) in feeds {
            let id = *self.index.get(*name).ok_or_else(|| {
                TrainError::Invalid(format!("'{name}' is not an input of the model"))
            })?;
            values[id] = Some((*a).clone());
        }
        let mut quantized = HashMap::new();
        for (k, s) in self.steps.iter().enumerate() {
            let x: Vec<&ArrayD<f32>> = s
                .inputs
                .iter()
                .map(|&i| {
                    values[i].as_ref().ok_or_else(|| {
                        TrainError::Invalid(format!(
                            "node '{}': input '{}' has no value (not fed?)",
                            s.node, self.names[i]
                        ))
                    })
                })
                .collect::<Result<_, _>>()?;
            let y = match self.quant.get(&k) {
                Some(q) => {
                    let (xq, wq) =
                        fake_quantize(q, &s.op, x[0], x[1]).map_err(|e| self.bad(s, e))?;
                    let mut qx = vec![&xq, &wq];
                    qx.extend(x.iter().skip(2).copied());
                    let y = self.run_step(k, s, &qx)?;
                    quantized.insert(k, (xq, wq));
                    y
                }
                None => self.run_step(k, s, &x)?,
            };
            values[s.output] = Some(y);
        }
        Ok(Activations { values, quantized })
    }

    fn bad(&self, s: &Step, why: String) -> TrainError {
        TrainError::Invalid(format!("node '{}': {why}", s.node))
    }

    fn run_step(&self, k: usize, s: &Step, x: &[&ArrayD<f32>]) -> Result<ArrayD<f32>, TrainError> {
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
            Op::Relu => x[0].mapv(|v| v.max(0.0)),
            Op::Clip { lo, hi } => x[0].mapv(|v| v.clamp(*lo, *hi)),
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
                let target = self
                    .reshape_targets
                    .get(&k)
                    .and_then(|id| self.shapes.get(id))
                    .ok_or_else(|| self.bad(s, "the shape must be a constant".into()))?;
                let shape = reshape_target(x[0].shape(), target).map_err(|e| self.bad(s, e))?;
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
            Op::Sigmoid => x[0].mapv(|v| 1.0 / (1.0 + (-v).exp())),
            Op::HardSigmoid { alpha, beta } => x[0].mapv(|v| (alpha * v + beta).clamp(0.0, 1.0)),
            Op::HardSwish => x[0].mapv(|v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0)),
            Op::Concat { axis } => {
                let ax = axis_index(*axis, x[0].ndim()).map_err(|e| self.bad(s, e))?;
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
                let g = transposed_geometry(&s.op, x[0], x[1]).map_err(|e| self.bad(s, e))?;
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
            Op::MatMul => {
                let (a, b) = (x[0], x[1]);
                let (rows, k) = matmul_shape(a, b).map_err(|e| self.bad(s, e))?;
                let a2 = a
                    .to_shape((rows, k))
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let b2 = b
                    .view()
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let y = a2.dot(&b2);
                let mut shape = a.shape().to_vec();
                let last = shape.len() - 1;
                shape[last] = b2.ncols();
                y.into_shape_with_order(IxDyn(&shape))
                    .map_err(|e| self.bad(s, e.to_string()))?
            }
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
        let value = |i: usize| {
            acts.values[i]
                .as_ref()
                .ok_or_else(|| TrainError::Invalid(format!("'{}' was not computed", self.names[i])))
        };
        for (step, s) in self.steps.iter().enumerate().rev() {
            let Some(gy) = grads[s.output].take() else {
                continue;
            };
            let x: Vec<&ArrayD<f32>> = s
                .inputs
                .iter()
                .map(|&i| value(i))
                .collect::<Result<_, _>>()?;
            let y = value(s.output)?;
            let gx = match (self.quant.get(&step), acts.quantized.get(&step)) {
                (Some(q), Some((xq, wq))) => {
                    let mut qx = vec![xq, wq];
                    qx.extend(x.iter().skip(2).copied());
                    let mut g = self.step_backward(s, &qx, y, &gy)?;
                    // ULQ on the input; the weight gradient passes straight through.
                    if let Some(Some(gxq)) = g.first() {
                        let grid = ulq_grid(q.clip_min, q.clip_max, 8)
                            .ok_or_else(|| self.bad(s, "empty clip range".into()))?;
                        let xs: Vec<f32> = x[0].iter().copied().collect();
                        let gs: Vec<f32> = gxq.iter().copied().collect();
                        let u = ulq_backward(&xs, &gs, &grid, 8);
                        clips.insert(s.node.clone(), (u.clip_min, u.clip_max));
                        g[0] = Some(
                            ArrayD::from_shape_vec(x[0].raw_dim(), u.input)
                                .map_err(|e| self.bad(s, e.to_string()))?,
                        );
                    }
                    g
                }
                _ => self.step_backward(s, &x, y, &gy)?,
            };
            grads[s.output] = Some(gy);
            for (k, g) in gx.into_iter().enumerate() {
                if let Some(g) = g {
                    let id = s.inputs[k];
                    grads[id] = Some(match grads[id].take() {
                        Some(prev) => prev + &g,
                        None => g,
                    });
                }
            }
        }
        Ok(Gradients { grads, clips })
    }

    fn step_backward(
        &self,
        s: &Step,
        x: &[&ArrayD<f32>],
        y: &ArrayD<f32>,
        gy: &ArrayD<f32>,
    ) -> Result<Vec<Option<ArrayD<f32>>>, TrainError> {
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
                    .map_collect(|&g, &v| if v > 0.0 { g } else { 0.0 }),
            )],
            Op::Clip { lo, hi } => {
                let mut out =
                    vec![Some(ndarray::Zip::from(gy).and(x[0]).map_collect(
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
            Op::HardSigmoid { alpha, beta } => vec![Some(
                ndarray::Zip::from(gy).and(x[0]).map_collect(|&g, &v| {
                    let t = alpha * v + beta;
                    if t > 0.0 && t < 1.0 { g * alpha } else { 0.0 }
                }),
            )],
            Op::HardSwish => vec![Some(ndarray::Zip::from(gy).and(x[0]).map_collect(
                |&g, &v| {
                    if v <= -3.0 {
                        0.0
                    } else if v >= 3.0 {
                        g
                    } else {
                        g * (v / 3.0 + 0.5)
                    }
                },
            ))],
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
                let g = transposed_geometry(&s.op, x[0], x[1]).map_err(|e| self.bad(s, e))?;
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
            Op::MatMul => {
                let (a, b) = (x[0], x[1]);
                let (rows, k) = matmul_shape(a, b).map_err(|e| self.bad(s, e))?;
                let a2 = a
                    .to_shape((rows, k))
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let b2 = b
                    .view()
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let g2 = gy
                    .to_shape((rows, b2.ncols()))
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let ga = g2
                    .dot(&b2.t())
                    .into_shape_with_order(a.raw_dim())
                    .map_err(|e| self.bad(s, e.to_string()))?;
                let gb = a2.t().dot(&g2).into_dyn();
                vec![Some(ga), Some(gb)]
            }
        })
        .map(|mut v: Vec<Option<ArrayD<f32>>>| {
            let _ = y;
            v.truncate(x.len());
            v
        })
    }
}

/// The fake-quantized input (ULQ) and weight (ARQ-retrain) of a layer.
fn fake_quantize(
    q: &LayerQuant,
    op: &Op,
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
) -> Result<(ArrayD<f32>, ArrayD<f32>), String> {
    let grid = ulq_grid(q.clip_min, q.clip_max, 8).ok_or("empty clip range")?;
    let xs: Vec<f32> = x.iter().copied().collect();
    let mut xq = vec![0f32; xs.len()];
    ulq_forward(&xs, &grid, 8, &mut xq);
    let ws: Vec<f32> = w.iter().copied().collect();
    let mut wq = vec![0f32; ws.len()];
    match op {
        // One scale per output channel: axis 0 of a Conv weight.
        Op::Conv { .. } if q.channel_wise => {
            let per = ws.len() / w.shape()[0].max(1);
            for (src, dst) in ws.chunks(per.max(1)).zip(wq.chunks_mut(per.max(1))) {
                arq_retrain_forward(src, 8, dst);
            }
        }
        // Axis 1 of a ConvTranspose weight [Cin, Cout, kh, kw].
        Op::ConvTranspose { .. } if q.channel_wise => {
            let sh = w.shape();
            let (cout, plane) = (sh[1], sh[2] * sh[3]);
            for c in 0..cout {
                let idx: Vec<usize> = (0..sh[0])
                    .flat_map(|i| (0..plane).map(move |k| (i * cout + c) * plane + k))
                    .collect();
                let src: Vec<f32> = idx.iter().map(|&k| ws[k]).collect();
                let mut dst = vec![0f32; src.len()];
                arq_retrain_forward(&src, 8, &mut dst);
                for (&k, v) in idx.iter().zip(dst) {
                    wq[k] = v;
                }
            }
        }
        _ => {
            arq_retrain_forward(&ws, 8, &mut wq);
        }
    }
    Ok((
        ArrayD::from_shape_vec(x.raw_dim(), xq).map_err(|e| e.to_string())?,
        ArrayD::from_shape_vec(w.raw_dim(), wq).map_err(|e| e.to_string())?,
    ))
}

/// Output height and width and, per output row and column, the input row
/// and column nearest Resize reads (ONNX's coordinate transformation and
/// nearest-rounding rules).
fn resize_maps(op: &Op, shape: &[usize]) -> Result<(usize, usize, Vec<usize>, Vec<usize>), String> {
    let Op::Resize {
        sizes,
        scales,
        coordinates,
        nearest,
    } = op
    else {
        return Err("not a Resize".into());
    };
    if shape.len() != 4 {
        return Err(format!("input {shape:?}: only 4-D Resize trains"));
    }
    let (h, w) = (shape[2], shape[3]);
    let (oh, ow) = match sizes {
        Some(s) => *s,
        None => (
            (h as f32 * scales.0).floor() as usize,
            (w as f32 * scales.1).floor() as usize,
        ),
    };
    if oh == 0 || ow == 0 || oh as u64 * ow as u64 > crate::onnx::limits::MAX_ELEMENTS {
        return Err(format!("output {oh}x{ow} is empty or too large"));
    }
    let map = |out: usize, input: usize| -> Vec<usize> {
        let scale = out as f64 / input as f64;
        (0..out)
            .map(|o| {
                let o = o as f64;
                let x = match coordinates.as_str() {
                    "asymmetric" => o / scale,
                    "align_corners" if out > 1 => o * (input as f64 - 1.0) / (out as f64 - 1.0),
                    "align_corners" => 0.0,
                    "pytorch_half_pixel" if out == 1 => 0.0,
                    _ => (o + 0.5) / scale - 0.5,
                };
                let i = match nearest.as_str() {
                    "floor" => x.floor(),
                    "ceil" => x.ceil(),
                    "round_prefer_ceil" => (x + 0.5).floor(),
                    _ => {
                        // round half down
                        if x.fract() == 0.5 {
                            x.floor()
                        } else {
                            x.round()
                        }
                    }
                };
                i.clamp(0.0, input as f64 - 1.0) as usize
            })
            .collect()
    };
    Ok((oh, ow, map(oh, h), map(ow, w)))
}

/// A possibly negative ONNX axis as an index.
fn axis_index(axis: i64, rank: usize) -> Result<usize, String> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(a)
        .ok()
        .filter(|&a| a < rank)
        .ok_or_else(|| format!("axis {axis} is outside rank {rank}"))
}

/// Transpose's permutation (default: reversed axes), checked.
fn perm_of(perm: &Option<Vec<usize>>, rank: usize) -> Result<Vec<usize>, String> {
    let p = perm.clone().unwrap_or_else(|| (0..rank).rev().collect());
    let mut seen = vec![false; rank];
    if p.len() != rank
        || p.iter()
            .any(|&v| v >= rank || std::mem::replace(&mut seen[v], true))
    {
        return Err(format!("perm {p:?} is not a permutation of {rank} axes"));
    }
    Ok(p)
}

/// (rows, k) of `a @ b` with `a` of any rank ≥ 1 and `b` 2-D.
fn matmul_shape(a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<(usize, usize), String> {
    if b.ndim() != 2 || a.ndim() < 2 {
        return Err(format!(
            "MatMul of {:?} by {:?}: only an N-D input times a 2-D weight trains",
            a.shape(),
            b.shape()
        ));
    }
    let k = a.shape()[a.ndim() - 1];
    if k != b.shape()[0] {
        return Err(format!("MatMul of {:?} by {:?}", a.shape(), b.shape()));
    }
    Ok((a.len() / k.max(1), k))
}

fn softmax(x: &ArrayD<f32>, axis: usize) -> ArrayD<f32> {
    let mut y = x.clone();
    for mut lane in y.lanes_mut(Axis(axis)) {
        let m = lane.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        lane.mapv_inplace(|v| (v - m).exp());
        let sum: f32 = lane.sum();
        lane.mapv_inplace(|v| v / sum);
    }
    y
}

/// Sums a broadcast gradient back to `shape`.
fn reduce_to(g: &ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    let mut r = g.clone();
    while r.ndim() > shape.len() {
        r = r.sum_axis(Axis(0));
    }
    for (axis, &d) in shape.iter().enumerate() {
        if d == 1 && r.shape()[axis] != 1 {
            r = r.sum_axis(Axis(axis)).insert_axis(Axis(axis));
        }
    }
    r
}

fn reshape_target(input: &[usize], target: &[i64]) -> Result<Vec<usize>, String> {
    let total: usize = input.iter().product();
    let mut shape: Vec<usize> = Vec::with_capacity(target.len());
    let mut infer = None;
    for (k, &d) in target.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(k);
                shape.push(1);
            }
            0 => shape.push(*input.get(k).ok_or("0 past the input's rank")?),
            d if d > 0 => shape.push(d as usize),
            _ => return Err(format!("shape {target:?} is not valid")),
        }
    }
    if let Some(k) = infer {
        let known: usize = shape.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {input:?} to {target:?}"));
        }
        shape[k] = total / known;
    }
    Ok(shape)
}

/// The geometry of one convolution call.
struct ConvGeom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    kh: usize,
    kw: usize,
    group: usize,
    strides: (usize, usize),
    dilations: (usize, usize),
    pads: (usize, usize, usize, usize),
    oh: usize,
    ow: usize,
}

fn conv_geometry(
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    group: usize,
    strides: (usize, usize),
    dilations: (usize, usize),
    pads: (usize, usize, usize, usize),
) -> Result<ConvGeom, String> {
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() != 4 || ws.len() != 4 {
        return Err(format!(
            "input {xs:?} and weight {ws:?}: only 2-D convolutions train"
        ));
    }
    let (n, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (m, cg, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
    if cg * group != c || m % group != 0 || strides.0 == 0 || strides.1 == 0 {
        return Err(format!(
            "weight {ws:?} with group {group} does not fit input {xs:?}"
        ));
    }
    if group != 1 && !(group == c && m == c) {
        return Err(format!(
            "grouped convolution with {group} groups: only dense and depthwise convolutions train"
        ));
    }
    let span_h = dilations.0 * (kh - 1) + 1;
    let span_w = dilations.1 * (kw - 1) + 1;
    let (ph, pw) = (h + pads.0 + pads.2, wd + pads.1 + pads.3);
    if ph < span_h || pw < span_w {
        return Err("the kernel is larger than the padded input".into());
    }
    Ok(ConvGeom {
        n,
        c,
        h,
        w: wd,
        m,
        kh,
        kw,
        group,
        strides,
        dilations,
        pads,
        oh: (ph - span_h) / strides.0 + 1,
        ow: (pw - span_w) / strides.1 + 1,
    })
}

impl ConvGeom {
    fn depthwise(&self) -> Depthwise {
        Depthwise {
            n: self.n,
            c: self.c,
            h: self.h,
            w: self.w,
            kh: self.kh,
            kw: self.kw,
            stride: self.strides,
            dilation: self.dilations,
            pads: self.pads,
        }
    }

    /// For output position (r, col) and tap (i, j), the input position if inside.
    fn source(&self, r: usize, col: usize, i: usize, j: usize) -> Option<(usize, usize)> {
        let ih = (r * self.strides.0 + i * self.dilations.0).checked_sub(self.pads.0)?;
        let iw = (col * self.strides.1 + j * self.dilations.1).checked_sub(self.pads.1)?;
        (ih < self.h && iw < self.w).then_some((ih, iw))
    }
}

/// `[c·kh·kw, n·oh·ow]` columns of a dense convolution.
fn im2col(g: &ConvGeom, x: &[f32]) -> Array2<f32> {
    let cols = g.n * g.oh * g.ow;
    let mut out = Array2::<f32>::zeros((g.c * g.kh * g.kw, cols));
    for (row, mut line) in out.outer_iter_mut().enumerate() {
        let (ci, i, j) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
        for b in 0..g.n {
            for r in 0..g.oh {
                for col in 0..g.ow {
                    if let Some((ih, iw)) = g.source(r, col, i, j) {
                        line[(b * g.oh + r) * g.ow + col] =
                            x[((b * g.c + ci) * g.h + ih) * g.w + iw];
                    }
                }
            }
        }
    }
    out
}

fn col2im(g: &ConvGeom, cols: &Array2<f32>) -> Vec<f32> {
    let mut x = vec![0f32; g.n * g.c * g.h * g.w];
    for (row, line) in cols.outer_iter().enumerate() {
        let (ci, i, j) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
        for b in 0..g.n {
            for r in 0..g.oh {
                for col in 0..g.ow {
                    if let Some((ih, iw)) = g.source(r, col, i, j) {
                        x[((b * g.c + ci) * g.h + ih) * g.w + iw] +=
                            line[(b * g.oh + r) * g.ow + col];
                    }
                }
            }
        }
    }
    x
}

/// `[m, n·oh·ow]` ↔ NCHW `[n, m, oh, ow]`.
fn to_nchw(g: &ConvGeom, y: &Array2<f32>) -> ArrayD<f32> {
    let plane = g.oh * g.ow;
    let mut out = vec![0f32; g.n * g.m * plane];
    for (mi, line) in y.outer_iter().enumerate() {
        for b in 0..g.n {
            for p in 0..plane {
                out[(b * g.m + mi) * plane + p] = line[b * plane + p];
            }
        }
    }
    ArrayD::from_shape_vec(IxDyn(&[g.n, g.m, g.oh, g.ow]), out).unwrap_or_default()
}

fn from_nchw(g: &ConvGeom, y: &ArrayD<f32>) -> Array2<f32> {
    let plane = g.oh * g.ow;
    let ys: Vec<f32> = y.iter().copied().collect();
    Array2::from_shape_fn((g.m, g.n * plane), |(mi, k)| {
        let (b, p) = (k / plane, k % plane);
        ys[(b * g.m + mi) * plane + p]
    })
}

fn contiguous(a: &ArrayD<f32>) -> Vec<f32> {
    a.iter().copied().collect()
}

fn conv_forward(
    g: &ConvGeom,
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    bias: Option<&[f32]>,
) -> ArrayD<f32> {
    if g.group > 1 {
        let mut y = vec![0f32; g.n * g.m * g.oh * g.ow];
        depthwise::forward(
            &g.depthwise(),
            &contiguous(x),
            &contiguous(w),
            bias.unwrap_or(&[]),
            &mut y,
        );
        return ArrayD::from_shape_vec(IxDyn(&[g.n, g.m, g.oh, g.ow]), y).unwrap_or_default();
    }
    let cols = im2col(g, &contiguous(x));
    let wm = Array2::from_shape_vec((g.m, g.c * g.kh * g.kw), contiguous(w)).unwrap_or_default();
    let mut y = wm.dot(&cols);
    if let Some(b) = bias {
        for (mi, mut line) in y.outer_iter_mut().enumerate() {
            line += b.get(mi).copied().unwrap_or(0.0);
        }
    }
    to_nchw(g, &y)
}

fn conv_backward(
    g: &ConvGeom,
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    gy: &ArrayD<f32>,
) -> (ArrayD<f32>, ArrayD<f32>, ArrayD<f32>) {
    let shape_x = IxDyn(&[g.n, g.c, g.h, g.w]);
    if g.group > 1 {
        let d = g.depthwise();
        let (xs, ws, gys) = (contiguous(x), contiguous(w), contiguous(gy));
        let mut gx = vec![0f32; xs.len()];
        depthwise::grad_input(&d, &gys, &ws, &mut gx);
        let (mut gw, mut gb) = (vec![0f32; ws.len()], vec![0f32; g.c]);
        depthwise::grad_weight(&d, &xs, &gys, &mut gw, &mut gb);
        return (
            ArrayD::from_shape_vec(shape_x, gx).unwrap_or_default(),
            ArrayD::from_shape_vec(w.raw_dim(), gw).unwrap_or_default(),
            ArrayD::from_shape_vec(IxDyn(&[g.c]), gb).unwrap_or_default(),
        );
    }
    let cols = im2col(g, &contiguous(x));
    let gym = from_nchw(g, gy);
    let wm = Array2::from_shape_vec((g.m, g.c * g.kh * g.kw), contiguous(w)).unwrap_or_default();
    let gw = gym.dot(&cols.t());
    let gcols = wm.t().dot(&gym);
    let gb = gym.sum_axis(Axis(1));
    (
        ArrayD::from_shape_vec(shape_x, col2im(g, &gcols)).unwrap_or_default(),
        gw.into_shape_with_order(w.raw_dim()).unwrap_or_default(),
        gb.into_dyn(),
    )
}

/// The convolution whose input gradient a ConvTranspose computes: input
/// channels = the ConvTranspose's outputs (its weight `[Cin, Cout, kh, kw]`
/// read as a convolution weight `[m = Cin, c = Cout, kh, kw]`), input plane =
/// the ConvTranspose's output plane, output plane = its input plane.
fn transposed_geometry(op: &Op, x: &ArrayD<f32>, w: &ArrayD<f32>) -> Result<ConvGeom, String> {
    let Op::ConvTranspose {
        strides,
        dilations,
        pads,
        output_padding,
    } = op
    else {
        return Err("not a ConvTranspose".into());
    };
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() != 4 || ws.len() != 4 || ws[0] != xs[1] || xs[2] == 0 || xs[3] == 0 {
        return Err(format!("input {xs:?} and weight {ws:?}: only 2-D, group 1"));
    }
    let size = |i: usize, s: usize, d: usize, k: usize, p0: usize, p1: usize, op: usize| {
        ((i - 1) * s + d * (k - 1) + 1 + op).checked_sub(p0 + p1)
    };
    let (h, wd) = (
        size(
            xs[2],
            strides.0,
            dilations.0,
            ws[2],
            pads.0,
            pads.2,
            output_padding.0,
        ),
        size(
            xs[3],
            strides.1,
            dilations.1,
            ws[3],
            pads.1,
            pads.3,
            output_padding.1,
        ),
    );
    let (Some(h), Some(wd)) = (h, wd) else {
        return Err("the pads are larger than the output".into());
    };
    Ok(ConvGeom {
        n: xs[0],
        c: ws[1],
        h,
        w: wd,
        m: ws[0],
        kh: ws[2],
        kw: ws[3],
        group: 1,
        strides: *strides,
        dilations: *dilations,
        pads: *pads,
        oh: xs[2],
        ow: xs[3],
    })
}

/// The input gradient of the dense convolution `g` for output gradient `gy`.
fn conv_input_grad(g: &ConvGeom, w: &ArrayD<f32>, gy: &ArrayD<f32>) -> ArrayD<f32> {
    let gym = from_nchw(g, gy);
    let wm = Array2::from_shape_vec((g.m, g.c * g.kh * g.kw), contiguous(w)).unwrap_or_default();
    let gcols = wm.t().dot(&gym);
    ArrayD::from_shape_vec(IxDyn(&[g.n, g.c, g.h, g.w]), col2im(g, &gcols)).unwrap_or_default()
}

/// Max (with the flat index of each maximum) or average pooling, 4-D input.
fn pool(
    x: &ArrayD<f32>,
    kernel: (usize, usize),
    strides: (usize, usize),
    pads: (usize, usize, usize, usize),
    max: bool,
) -> (ArrayD<f32>, Vec<usize>) {
    let sh = x.shape();
    let (n, c, h, w) = (sh[0], sh[1], sh[2], sh[3]);
    let oh = (h + pads.0 + pads.2).saturating_sub(kernel.0) / strides.0.max(1) + 1;
    let ow = (w + pads.1 + pads.3).saturating_sub(kernel.1) / strides.1.max(1) + 1;
    let xs = contiguous(x);
    let mut out = Vec::with_capacity(n * c * oh * ow);
    let mut arg = Vec::with_capacity(n * c * oh * ow);
    for nc in 0..n * c {
        for r in 0..oh {
            for col in 0..ow {
                let (mut best, mut at, mut sum, mut count) = (f32::NEG_INFINITY, 0, 0f32, 0);
                for i in 0..kernel.0 {
                    for j in 0..kernel.1 {
                        let (Some(ih), Some(iw)) = (
                            (r * strides.0 + i).checked_sub(pads.0),
                            (col * strides.1 + j).checked_sub(pads.1),
                        ) else {
                            continue;
                        };
                        if ih >= h || iw >= w {
                            continue;
                        }
                        let k = (nc * h + ih) * w + iw;
                        if xs[k] > best {
                            best = xs[k];
                            at = k;
                        }
                        sum += xs[k];
                        count += 1;
                    }
                }
                out.push(if max {
                    best
                } else {
                    sum / (kernel.0 * kernel.1) as f32
                });
                arg.push(at);
                let _ = count;
            }
        }
    }
    (
        ArrayD::from_shape_vec(IxDyn(&[n, c, oh, ow]), out).unwrap_or_default(),
        arg,
    )
}

fn avg_pool_backward(
    x: &ArrayD<f32>,
    kernel: (usize, usize),
    strides: (usize, usize),
    gy: &ArrayD<f32>,
) -> ArrayD<f32> {
    let sh = x.shape();
    let (h, w) = (sh[2], sh[3]);
    let (oh, ow) = (gy.shape()[2], gy.shape()[3]);
    let mut gx = vec![0f32; x.len()];
    let area = (kernel.0 * kernel.1) as f32;
    for (k, &g) in gy.iter().enumerate() {
        let (nc, r, col) = (k / (oh * ow), (k / ow) % oh, k % ow);
        for i in 0..kernel.0 {
            for j in 0..kernel.1 {
                let (ih, iw) = (r * strides.0 + i, col * strides.1 + j);
                if ih < h && iw < w {
                    gx[(nc * h + ih) * w + iw] += g / area;
                }
            }
        }
    }
    ArrayD::from_shape_vec(x.raw_dim(), gx).unwrap_or_default()
}
