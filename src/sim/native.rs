//! The native engine: runs float32 graphs made of the operators vision
//! models are built from on our own kernels (`kernels/`), with Conv + Relu /
//! Clip fused. A model with anything else is left to the rten engine
//! ([`NativeModel::build`] says `None`), so the two together run everything
//! rten runs, and the hot path runs at GEMM speed.
//!
//! Loading (this file's `build`) resolves every attribute, constant and
//! weight once; running walks the steps a fetch needs, in graph order,
//! dropping each value after its last use.

use super::error::{SimError, ValueRole};
use super::kernels::activation::Activation;
use super::kernels::conv::{Conv, Dense};
use super::native_ops::{self as ops, Elementwise};
use super::per_sample::BatchMode;
use super::prepare::{check_feed, feedable_inputs, rewrite_for_execution};
use super::steps::{Consts, Decline, Op, Step, conv_geometry, float_const, zero_point};
use super::{Session, SessionOptions};
use crate::onnx::attr::{int_attr, string_attr};
use crate::onnx::{GraphProto, ModelProto, NodeProto, ValueSpec, to_tensor};
use crate::ops::Unsupported;
use crate::ops::layout as ops_layout;
use crate::tensor::Tensor;
use ndarray::ArrayD;
use std::collections::{HashMap, HashSet};

/// A model the native engine runs.
pub struct NativeModel {
    steps: Vec<Step>,
    consts: HashMap<String, Tensor>,
    inputs: Vec<ValueSpec>,
    outputs: Vec<ValueSpec>,
    keep: Vec<String>,
    batch: BatchMode,
}

impl NativeModel {
    /// The model prepared for the native engine, or `None` when it does not
    /// run it: a deploy model with a node it does not run, or a model of
    /// which it would run fewer nodes than it hands to rten. Other nodes it
    /// does not run are run one by one on rten (`foreign`).
    pub fn build(
        model: &ModelProto,
        opts: &SessionOptions,
    ) -> Result<Option<NativeModel>, SimError> {
        Ok(Self::plan(model, opts)?.0)
    }

    /// [`NativeModel::build`], with what happened to each node.
    pub(super) fn plan(
        model: &ModelProto,
        opts: &SessionOptions,
    ) -> Result<(Option<NativeModel>, Plan), SimError> {
        let (model_or_none, mut plan) = Self::plan_inner(model, opts, true)?;
        plan.whole_on_rten = model_or_none.is_none();
        Ok((model_or_none, plan))
    }

    /// The model prepared without shape folding (what folding itself runs
    /// to read the shapes of values), or `None` as [`NativeModel::build`].
    pub(super) fn unfolded(
        model: &ModelProto,
        opts: &SessionOptions,
    ) -> Result<Option<NativeModel>, SimError> {
        Ok(Self::plan_inner(model, opts, false)?.0)
    }

    fn plan_inner(
        model: &ModelProto,
        opts: &SessionOptions,
        fold: bool,
    ) -> Result<(Option<NativeModel>, Plan), SimError> {
        let mut prepared = rewrite_for_execution(model, opts)?;
        let mut batch = BatchMode::of(model, opts).sample_by_sample();
        let deploy = super::ascend::has_ascend_ops(&prepared);
        let mut plan = Plan::default();
        if fold {
            let free_batch = feedable_inputs(&prepared)
                .first()
                .and_then(|s| s.shape.as_ref()?.first().cloned())
                .is_some_and(|d| !matches!(d, crate::onnx::Dim::Fixed(_)));
            let exposed: HashSet<String> = prepared
                .graph
                .iter()
                .flat_map(|g| g.output.iter().map(|o| o.name().to_string()))
                .chain(opts.keep.iter().cloned())
                .collect();
            let one_sample = batch == BatchMode::PerSample || free_batch;
            let before = prepared.graph.as_ref().map_or(0, |g| g.node.len());
            let probe = |m: &ModelProto, feeds: &[(&str, &Tensor)], fetch: &[&str]| {
                let unfolded = NativeModel::unfolded(
                    m,
                    &SessionOptions {
                        keep: Vec::new(),
                        dynamic_batch: false,
                        optimize: false,
                    },
                )
                .ok()??;
                NativeSession::new(unfolded).run(feeds, fetch).ok()
            };
            if let Some(folded) =
                super::fold::fold_constants(&prepared, one_sample, &exposed, &probe)
            {
                // Folded shapes and paddings are constants now: the work they
                // imply is checked again (a corrupted size in a shape
                // subgraph shows only here).
                crate::ops::work::check_work(&folded).map_err(|e| SimError::Load {
                    reason: e.to_string(),
                })?;
                prepared = folded;
                plan.folded = before - prepared.graph.as_ref().map_or(0, |g| g.node.len());
                // Folded shapes hold a batch of 1: the model runs sample by sample.
                if free_batch {
                    batch = BatchMode::PerSample;
                }
            }
        }
        let Some(graph) = prepared.graph.as_ref() else {
            return Ok((None, plan));
        };
        let index = crate::onnx::GraphIndex::new(graph).map_err(|e| SimError::Load {
            reason: e.to_string(),
        })?;
        let inputs = feedable_inputs(&prepared);
        // A deploy model's int8 / int32 values stay inside its quantized
        // steps (`native_deploy`): the caller may feed and see any other
        // type (a sentence encoder's int64 token ids), never those.
        let levels = |t: Option<i32>| matches!(t, Some(2 | 3 | 6));
        if deploy && (inputs.iter().any(|s| levels(s.elem_type)) || !outputs_are_not_levels(graph))
        {
            plan.declined.push(Unsupported {
                node: String::new(),
                op: String::new(),
                reason: "a deploy model with an int8, uint8 or int32 input or output".into(),
            });
            return Ok((None, plan));
        }
        let outputs: Vec<ValueSpec> = model
            .graph
            .iter()
            .flat_map(|g| &g.output)
            .map(ValueSpec::from_proto)
            .collect();
        let opset = crate::onnx::default_opset(&prepared).unwrap_or(1);
        let built = Self::steps(&prepared, &index, opset, opts, deploy, &mut plan);
        let Ok((steps, mut consts)) = built else {
            return Ok((None, plan));
        };
        // Mostly foreign: rten runs the whole model faster than node by node.
        let foreign = steps
            .iter()
            .filter(|s| matches!(s.op, Op::Foreign(_)))
            .count();
        if foreign > 0 && foreign * 2 > steps.len() {
            return Ok((None, plan));
        }
        // Weights the kernels packed are not kept a second time: only
        // constants a step reads, or that may be fetched, stay.
        let read: HashSet<&str> = steps
            .iter()
            .flat_map(|s| s.inputs.iter().map(String::as_str))
            .chain(outputs.iter().map(|o| o.name.as_str()))
            .chain(opts.keep.iter().map(String::as_str))
            .collect();
        consts.retain(|name, _| read.contains(name.as_str()));
        plan.native = steps.len() - foreign;
        Ok((
            Some(NativeModel {
                steps,
                consts,
                inputs,
                outputs,
                keep: opts.keep.clone(),
                batch,
            }),
            plan,
        ))
    }

    #[allow(clippy::type_complexity)]
    fn steps(
        model: &ModelProto,
        index: &crate::onnx::GraphIndex,
        opset: i64,
        opts: &SessionOptions,
        deploy: bool,
        plan: &mut Plan,
    ) -> Result<(Vec<Step>, Consts), Decline> {
        let graph = model.graph.as_ref().ok_or("the model holds no graph")?;
        let mut consts: Consts = HashMap::new();
        for t in &graph.initializer {
            let value = to_tensor(t).map_err(|e| e.to_string())?;
            consts.insert(t.name().to_string(), value);
        }
        // Which values are float32: what the float kernels may read.
        let mut float: HashSet<String> = feedable_inputs(model)
            .into_iter()
            .filter(|s| s.elem_type.is_none_or(|t| t == 1))
            .map(|s| s.name)
            .collect();
        let declared = declared_types(graph);
        let mut steps = Vec::new();
        let mut absorbed: HashSet<usize> = HashSet::new();
        let exposed: HashSet<&str> = graph
            .output
            .iter()
            .map(|o| o.name())
            .chain(opts.keep.iter().map(String::as_str))
            .collect();
        for &i in index.topological_order() {
            let node = &graph.node[i];
            if node.op_type() == "Constant" {
                let t = crate::onnx::attr::find(node, "value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or("a Constant without a tensor value")?;
                let out = node
                    .output
                    .first()
                    .ok_or("a Constant without output")?
                    .clone();
                consts.insert(out, to_tensor(t).map_err(|e| e.to_string())?);
                continue;
            }
            if absorbed.contains(&i) {
                continue;
            }
            let is_float = |v: &String| float.contains(v) || float_const(&consts, v).is_some();
            let native = (|| -> Result<Vec<Step>, Decline> {
                if let Some(s) =
                    super::native_deploy::step(graph, index, i, &exposed, &mut absorbed)?
                {
                    return Ok(vec![s]);
                }
                if node.op_type() == "QuantizeLinear" {
                    let (step, dq) = quant_dequant(graph, index, node, &consts, &opts.keep)?;
                    absorbed.insert(dq);
                    return Ok(vec![step]);
                }
                step(node, opset, &consts)
            })();
            // Float kernels read float values only; layout steps any type.
            let native = native.and_then(|s| {
                let bad = s.iter().find_map(|st| {
                    let any_type = matches!(st.op, Op::Layout(_));
                    st.inputs
                        .iter()
                        .find(|v| !any_type && !is_float(v))
                        .map(|v| format!("its input '{v}' is not float32"))
                });
                bad.map_or(Ok(s), Err)
            });
            match native {
                Ok(new) => {
                    let floats: Vec<String> = new
                        .iter()
                        .filter(|st| match &st.op {
                            Op::Layout(l) => match **l {
                                ops_layout::Layout::Cast(to) => to == 1,
                                _ => st.inputs.first().is_some_and(is_float),
                            },
                            _ => true,
                        })
                        .map(|st| st.output.clone())
                        .collect();
                    float.extend(floats);
                    steps.extend(new);
                }
                // Quantized values exist only inside the quantized steps: a
                // node that makes or reads them runs natively or not at all.
                Err(reason) if deploy && touches_levels(graph, index, node) => {
                    plan.declined.push(Unsupported::of(node, reason.clone()));
                    return Err(reason);
                }
                Err(_) if crate::ops::evaluates(node) => {
                    let mut inputs: Vec<String> = Vec::new();
                    let positions = node
                        .input
                        .iter()
                        .map(|v| {
                            (!v.is_empty()).then(|| {
                                inputs.push(v.clone());
                                inputs.len() - 1
                            })
                        })
                        .collect();
                    let outputs: Vec<String> = node.output.clone();
                    let floats = super::foreign::float_outputs(node, &is_float, &declared);
                    float.extend(floats);
                    let (first, more) = outputs.split_first().ok_or("a node without outputs")?;
                    let mut st = Step::new(
                        node.name(),
                        Op::Evaluated(Box::new(node.clone()), opset, positions),
                        inputs,
                        first.clone(),
                    );
                    st.more_outputs = more.to_vec();
                    steps.push(st);
                }
                Err(reason) => {
                    let why = Unsupported::of(node, reason);
                    let step = foreign_step(model, node, &consts, &declared, &why)
                        .map_err(|e| e.to_string())?;
                    let floats = super::foreign::float_outputs(node, &is_float, &declared);
                    float.extend(floats);
                    plan.declined.push(why);
                    steps.push(step);
                }
            }
        }
        if opts.optimize {
            fuse_activations(&mut steps, graph, &opts.keep);
            fuse_residual_adds(&mut steps, graph, &opts.keep);
            fuse_fake_quant(&mut steps, graph, &opts.keep, &consts);
            fuse_dense_bias(&mut steps, graph, &opts.keep, &consts);
            fuse_decomposed_layer_norms(&mut steps, graph, &opts.keep, &consts);
            fuse_erf_gelu(&mut steps, graph, &opts.keep, &consts);
        }
        Ok((steps, consts))
    }

    fn declared(&self, role: ValueRole) -> &[ValueSpec] {
        match role {
            ValueRole::Input => &self.inputs,
            ValueRole::Output => &self.outputs,
        }
    }

    fn unknown(&self, name: &str, role: ValueRole) -> SimError {
        SimError::UnknownValue {
            name: name.to_string(),
            role,
            hint: super::error::names_hint(self.declared(role), &self.keep, role),
        }
    }

    fn known(&self, name: &str, role: ValueRole) -> bool {
        self.declared(role).iter().any(|s| s.name == name) || self.keep.iter().any(|k| k == name)
    }
}

/// Whether every graph output is float32 (or undeclared).
/// Whether `node` is an Ascend quantization operator or reads the int8 /
/// int32 value of one (everything but AscendDequant and AscendAntiQuant,
/// whose outputs are float).
fn touches_levels(graph: &GraphProto, index: &crate::onnx::GraphIndex, node: &NodeProto) -> bool {
    use crate::deploy_format::{ASCEND_ANTI_QUANT, ASCEND_DEQUANT, is_ascend_op};
    let makes_levels =
        |op: &str| is_ascend_op(op) && op != ASCEND_DEQUANT && op != ASCEND_ANTI_QUANT;
    is_ascend_op(node.op_type())
        || node.input.iter().any(|v| {
            index
                .producer_node(v)
                .is_some_and(|p| makes_levels(graph.node[p].op_type()))
        })
}

/// Whether no graph output is of a type quantized values travel in
/// (uint8, int8, int32).
fn outputs_are_not_levels(g: &GraphProto) -> bool {
    g.output
        .iter()
        .map(ValueSpec::from_proto)
        .all(|s| !matches!(s.elem_type, Some(2 | 3 | 6)))
}

/// The step running `node` alone on rten (`foreign`).
fn foreign_step(
    model: &ModelProto,
    node: &NodeProto,
    consts: &Consts,
    declared: &HashMap<String, i32>,
    why: &Unsupported,
) -> Result<Step, SimError> {
    let foreign = super::foreign::Foreign::new(model, node, consts, declared, why)?;
    let inputs = foreign.inputs().to_vec();
    let (first, more) = foreign
        .outputs()
        .split_first()
        .ok_or_else(|| SimError::Load {
            reason: format!("{why}, and it has no output"),
        })?;
    let (first, more) = (first.clone(), more.to_vec());
    let mut s = Step::new(node.name(), Op::Foreign(Box::new(foreign)), inputs, first);
    s.more_outputs = more;
    Ok(s)
}

/// The types the graph declares for its values.
fn declared_types(g: &GraphProto) -> HashMap<String, i32> {
    g.input
        .iter()
        .chain(&g.output)
        .chain(&g.value_info)
        .map(ValueSpec::from_proto)
        .filter_map(|s| s.elem_type.map(|t| (s.name, t)))
        .collect()
}

/// What the native engine does with a model's nodes.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Plan {
    /// Steps it runs with its own kernels (after fusions).
    pub native: usize,
    /// Nodes whose values were computed when the model was prepared.
    pub folded: usize,
    /// Nodes it does not run, and why (each then runs alone on rten, or the
    /// whole model does).
    pub declined: Vec<Unsupported>,
    /// Whether the whole model runs on rten instead (a deploy model with a
    /// node the native engine does not run, or mostly such nodes).
    pub whole_on_rten: bool,
}

fn step(node: &NodeProto, opset: i64, consts: &Consts) -> Result<Vec<Step>, Decline> {
    if !node.domain().is_empty() && node.domain() != "ai.onnx" {
        return Err(format!("operator of domain '{}'", node.domain()));
    }
    let input = |k: usize| node.input.get(k).filter(|s| !s.is_empty());
    let operand = |k: usize| input(k).and_then(|name| consts.get(name));
    let mut inputs: Vec<String> = node
        .input
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    if let Some(first) = ops_layout::Layout::parse(node, opset, 0, &operand)? {
        let data = input(0).ok_or("its data input is missing")?.clone();
        return (0..node.output.len())
            .map(|k| {
                let op = if k == 0 {
                    first.clone()
                } else {
                    ops_layout::Layout::parse(node, opset, k, &operand)?.ok_or("not a layout op")?
                };
                Ok(Step::new(
                    node.name(),
                    Op::Layout(Box::new(op)),
                    vec![data.clone()],
                    node.output[k].clone(),
                ))
            })
            .collect();
    }
    if node.output.len() != 1 {
        return Err(format!("{} outputs", node.output.len()));
    }
    let scalar = |k: usize| -> Result<Option<f32>, Decline> {
        match input(k) {
            None => Ok(None),
            Some(name) => match float_const(consts, name) {
                Some(a) if a.len() == 1 => Ok(a.iter().next().copied()),
                _ => Err(format!("input '{name}' is not a float32 scalar constant")),
            },
        }
    };
    let float_input = |k: usize, what: &str| -> Result<&ArrayD<f32>, Decline> {
        let name = input(k).ok_or_else(|| format!("its {what} is missing"))?;
        float_const(consts, name)
            .ok_or_else(|| format!("its {what} '{name}' is not a float32 constant"))
    };
    let op = match node.op_type() {
        "Conv" => {
            let (conv, used) = conv(node, consts)?;
            inputs.truncate(used);
            Op::Conv(Box::new(conv))
        }
        "Gemm" => {
            let gemm = crate::ops::gemm::Gemm::parse(node)?;
            if !gemm.is_plain_product() {
                return Err("transA, alpha or beta other than the defaults".into());
            }
            let w = float_input(1, "weight")?;
            if w.ndim() != 2 {
                return Err("a weight that is not 2-D".into());
            }
            let trans_b = gemm.trans_b;
            let (k, m) = gemm.weight_k_n(w.shape()[0], w.shape()[1]);
            let bias = match input(2) {
                None => None,
                Some(_) => {
                    let c = float_input(2, "bias")?;
                    if c.len() != m || !(c.ndim() == 1 || c.ndim() == 2 && c.shape()[0] == 1) {
                        return Err("a bias that is not one value per output".into());
                    }
                    Some(c.iter().copied().collect())
                }
            };
            let weight: Vec<f32> = w.iter().copied().collect();
            inputs.truncate(1);
            Op::Dense(Box::new(Dense::new(&weight, k, m, trans_b, bias)), true)
        }
        "MatMul" => match float_input(1, "second operand") {
            // By a constant 2-D weight: the same kernel as Gemm, rows = every
            // leading axis of the input.
            Ok(w) if w.ndim() == 2 => {
                let (k, m) = (w.shape()[0], w.shape()[1]);
                let weight: Vec<f32> = w.iter().copied().collect();
                inputs.truncate(1);
                Op::Dense(Box::new(Dense::new(&weight, k, m, false, None)), false)
            }
            // Of two values (attention's q·kᵀ and p·v), batched.
            _ if inputs.len() == 2 => Op::MatMul,
            _ => return Err("a MatMul without two operands".into()),
        },
        "Relu" => Op::Clamp(0.0, f32::INFINITY),
        "Clip" => {
            let (lo, hi) = if node.input.len() > 1 {
                (scalar(1)?, scalar(2)?)
            } else {
                crate::ops::activation::clip_attributes(node)
            };
            inputs.truncate(1);
            Op::Clamp(lo.unwrap_or(f32::NEG_INFINITY), hi.unwrap_or(f32::INFINITY))
        }
        "Sigmoid" => Op::Sigmoid,
        "Round" => Op::Round,
        "Add" => Op::Binary(Elementwise::Add),
        "Sub" => Op::Binary(Elementwise::Sub),
        "Mul" => Op::Binary(Elementwise::Mul),
        "Div" => Op::Binary(Elementwise::Div),
        "Pow" => Op::Binary(Elementwise::Pow),
        "Max" | "Min" if inputs.len() == 2 => Op::Binary(if node.op_type() == "Max" {
            Elementwise::Max
        } else {
            Elementwise::Min
        }),
        "GlobalAveragePool" => Op::GlobalAveragePool,
        "MaxPool" | "AveragePool" => {
            let pool = ops::Pool::from_node(node)
                .ok_or("a pooling other than 2-D with explicit or VALID padding")?;
            if node.op_type() == "MaxPool" {
                Op::MaxPool(pool)
            } else {
                Op::AveragePool(pool)
            }
        }
        "Concat" => Op::Concat(int_attr(node, "axis").ok_or("Concat without an axis")?),
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" => {
            let r = crate::ops::reduce::Reduce::parse(node, opset, &operand)?
                .ok_or("not a reduction")?;
            inputs.truncate(1);
            Op::Reduce(Box::new(r))
        }
        "LayerNormalization" => {
            let scale: Vec<f32> = float_input(1, "scale")?.iter().copied().collect();
            let bias: Option<Vec<f32>> = match input(2) {
                Some(_) => Some(float_input(2, "bias")?.iter().copied().collect()),
                None => None,
            };
            let ln = crate::ops::norm::LayerNorm::parse(node, &scale, bias.as_deref())?;
            inputs.truncate(1);
            Op::LayerNorm(Box::new(ln))
        }
        "Softmax" => {
            let s = crate::ops::activation::Softmax::parse(node, opset);
            if s.flattened {
                Op::SoftmaxFlat(s.axis)
            } else {
                Op::Softmax(s.axis)
            }
        }
        "Resize" | "Upsample" => {
            // Nearest resizing by whole factors, in the two spellings that
            // pick input index floor(out / scale): PyTorch's export
            // (asymmetric + floor) and ONNX's default (half_pixel + round),
            // has its own fast step; every other Resize the general one.
            let general = || -> Result<Op, Decline> {
                let r = crate::ops::resize::Resize::parse(node, opset, &operand)?;
                Ok(Op::Resize(Box::new(r)))
            };
            let mode = string_attr(node, "mode").unwrap_or(b"nearest");
            let ctm = string_attr(node, "coordinate_transformation_mode").unwrap_or(b"half_pixel");
            let nearest = string_attr(node, "nearest_mode").unwrap_or(b"round_prefer_floor");
            let floor_index = match ctm {
                b"asymmetric" => nearest == b"floor",
                b"half_pixel" | b"pytorch_half_pixel" => {
                    nearest == b"round_prefer_floor" || nearest == b"round_prefer_ceil"
                }
                _ => false,
            };
            let axes = crate::onnx::attr::find(node, "axes").is_some();
            let whole_scales = match float_input(2, "scales") {
                Ok(s) if node.op_type() == "Resize" && opset >= 11 => {
                    Some(s.iter().copied().collect::<Vec<f32>>())
                        .filter(|s| s.iter().all(|v| *v >= 1.0 && v.fract() == 0.0))
                }
                _ => None,
            };
            inputs.truncate(1);
            match whole_scales {
                Some(scales)
                    if mode == b"nearest" && floor_index && !axes && input(3).is_none() =>
                {
                    Op::ResizeNearest(scales)
                }
                _ => general()?,
            }
        }
        other => match ops::Unary::of(node) {
            Some(u) => Op::Unary(u),
            None => return Err(format!("{other} is not an operator the native engine runs")),
        },
    };
    Ok(vec![Step::new(
        node.name(),
        op,
        inputs,
        node.output[0].clone(),
    )])
}

/// A `QuantizeLinear` whose only reader is a `DequantizeLinear` with the same
/// per-tensor scale and zero point, as one float step: `(clamp(round(x / s)
/// + z, lo, hi) − z) · s`, ONNX's arithmetic for the pair. Returns the step
/// and the index of the absorbed `DequantizeLinear`.
fn quant_dequant(
    graph: &GraphProto,
    index: &crate::onnx::GraphIndex,
    q: &NodeProto,
    consts: &Consts,
    keep: &[String],
) -> Result<(Step, usize), Decline> {
    let unfit =
        || "a QuantizeLinear not paired with a matching per-tensor DequantizeLinear".to_string();
    let out = q.output.first().ok_or_else(unfit)?;
    let exposed = keep.contains(out) || graph.output.iter().any(|o| o.name() == out);
    let [dq] = index.consumers(out) else {
        return Err("a geometry the native engine does not run (zero stride or dilation, channels not divisible by group, or SAME padding)".into());
    };
    let d = &graph.node[*dq];
    if exposed || d.op_type() != "DequantizeLinear" || d.input.first() != Some(out) {
        return Err("a geometry the native engine does not run (zero stride or dilation, channels not divisible by group, or SAME padding)".into());
    }
    let scalar = |name: Option<&String>| {
        name.and_then(|n| float_const(consts, n))
            .filter(|a| a.len() == 1)
            .and_then(|a| a.iter().next().copied())
    };
    let scale = scalar(q.input.get(1)).ok_or_else(unfit)?;
    if scalar(d.input.get(1)) != Some(scale) {
        return Err("a geometry the native engine does not run (zero stride or dilation, channels not divisible by group, or SAME padding)".into());
    }
    let zp = |n: &NodeProto| match n.input.get(2).filter(|s| !s.is_empty()) {
        None => Some((0.0, 0.0, 255.0)),
        Some(name) => zero_point(consts, name),
    };
    let (z, lo, hi) = zp(q).ok_or_else(unfit)?;
    if zp(d) != Some((z, lo, hi)) || d.output.len() != 1 {
        return Err("a geometry the native engine does not run (zero stride or dilation, channels not divisible by group, or SAME padding)".into());
    }
    Ok((
        Step::new(
            q.name(),
            Op::QuantDequant(ops::QuantDequant {
                scale,
                zero: z,
                lo,
                hi,
            }),
            vec![q.input.first().ok_or_else(unfit)?.clone()],
            d.output[0].clone(),
        ),
        *dq,
    ))
}

/// A Conv with constant weight (and bias); returns it and how many inputs it reads at run time.
fn conv(node: &NodeProto, consts: &Consts) -> Result<(Conv, usize), Decline> {
    let w = node
        .input
        .get(1)
        .and_then(|w| float_const(consts, w))
        .ok_or("its weight is not a float32 constant")?;
    let geometry = conv_geometry(node, w.shape())?;
    let (c_out, cg) = (w.shape()[0], w.shape()[1]);
    let bias = match node.input.get(2).filter(|s| !s.is_empty()) {
        None => None,
        Some(b) => {
            let b = float_const(consts, b).ok_or("its bias is not a float32 constant")?;
            if b.len() != c_out {
                return Err("its bias is not one value per output channel".into());
            }
            Some(b.iter().copied().collect())
        }
    };
    let group = geometry.group;
    Ok((
        Conv::new(
            geometry,
            cg * group,
            c_out,
            w.iter().copied().collect(),
            bias,
        ),
        1,
    ))
}

/// How many nodes read each value, and which values the caller sees (graph
/// outputs and kept values): what decides whether a fusion may hide a value.
struct Readers<'a> {
    count: HashMap<&'a str, usize>,
    exposed: HashSet<&'a str>,
}

impl<'a> Readers<'a> {
    fn new(graph: &'a GraphProto, keep: &'a [String]) -> Readers<'a> {
        let mut count: HashMap<&str, usize> = HashMap::new();
        for n in &graph.node {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                *count.entry(i.as_str()).or_default() += 1;
            }
        }
        let exposed = graph
            .output
            .iter()
            .map(|o| o.name())
            .chain(keep.iter().map(String::as_str))
            .collect();
        Readers { count, exposed }
    }

    /// Whether exactly `n` nodes read `v` and the caller does not see it.
    fn private(&self, v: &str, n: usize) -> bool {
        self.count.get(v) == Some(&n) && !self.exposed.contains(v)
    }
}

/// Folds activations into the Conv before them when nothing else needs the
/// Conv's own output (nor the Sigmoid's, for SiLU) and neither is kept nor
/// a graph output: `Relu`/`Clip` become the Conv's clamp, `Sigmoid(c)` with
/// `Mul(c, sigmoid)` (SiLU, as detectors export it) its SiLU.
fn fuse_activations(steps: &mut Vec<Step>, graph: &GraphProto, keep: &[String]) {
    let readers = Readers::new(graph, keep);
    let private = |v: &str, n: usize| readers.private(v, n);
    let producer = producers(steps);
    let mut removed = vec![false; steps.len()];
    for i in 0..steps.len() {
        let src = match steps[i].inputs.first() {
            Some(s) => s.clone(),
            None => continue,
        };
        let Some(&p) = producer.get(&src) else {
            continue;
        };
        let conv_free = matches!(&steps[p].op, Op::Conv(c) if c.activation == Activation::None);
        if !conv_free || removed[p] || removed[i] {
            continue;
        }
        match steps[i].op {
            Op::Clamp(lo, hi) if private(&src, 1) => {
                let out = steps[i].output.clone();
                set_activation(&mut steps[p], Activation::Clamp(lo, hi), out);
                removed[i] = true;
            }
            Op::Sigmoid if private(&src, 2) && private(&steps[i].output, 1) => {
                let sig = steps[i].output.clone();
                let mul = steps.iter().position(|m| {
                    matches!(m.op, Op::Binary(Elementwise::Mul))
                        && m.inputs.len() == 2
                        && m.inputs.contains(&src)
                        && m.inputs.contains(&sig)
                });
                if let Some(m) = mul {
                    let out = steps[m].output.clone();
                    set_activation(&mut steps[p], Activation::Silu, out);
                    removed[i] = true;
                    removed[m] = true;
                }
            }
            _ => {}
        }
    }
    remove_marked(steps, &removed);
}

/// Folds `Add(conv, r)` into the Conv that computes `conv` when nothing else
/// reads it and it is neither kept nor a graph output: the Conv takes `r` as
/// a second input and adds it to its outputs after the activation (a
/// residual block's sum, added while the output is in registers). The fused
/// step runs where the Add ran, so `r` is computed by then.
fn fuse_residual_adds(steps: &mut Vec<Step>, graph: &GraphProto, keep: &[String]) {
    let readers = Readers::new(graph, keep);
    let producer = producers(steps);
    let mut removed = vec![false; steps.len()];
    for i in 0..steps.len() {
        if !matches!(steps[i].op, Op::Binary(Elementwise::Add)) || steps[i].inputs.len() != 2 {
            continue;
        }
        let conv_side = (0..2).find(|&j| {
            let (a, r) = (&steps[i].inputs[j], &steps[i].inputs[1 - j]);
            let conv = producer.get(a).map(|&p| &steps[p]);
            a != r
                && readers.private(a, 1)
                && conv.is_some_and(|c| matches!(c.op, Op::Conv(_)) && c.inputs.len() == 1)
        });
        let Some(j) = conv_side else {
            continue;
        };
        let p = producer[&steps[i].inputs[j]];
        let residual = steps[i].inputs[1 - j].clone();
        let conv = std::mem::replace(&mut steps[p].op, Op::Identity);
        let x = steps[p].inputs[0].clone();
        steps[i] = Step::new(
            &steps[p].name.clone(),
            conv,
            vec![x, residual],
            steps[i].output.clone(),
        );
        removed[p] = true;
    }
    remove_marked(steps, &removed);
}

/// Folds `Add(MatMul(x, W), b)` (either order), with `b` a constant of one
/// value per output, into the MatMul's kernel as its bias when nothing else
/// reads the product and it is neither kept nor a graph output: the same one
/// addition per value, without a pass over the output (transformer exports
/// write every linear layer this way).
fn fuse_dense_bias(steps: &mut Vec<Step>, graph: &GraphProto, keep: &[String], consts: &Consts) {
    let readers = Readers::new(graph, keep);
    let producer = producers(steps);
    let mut removed = vec![false; steps.len()];
    for i in 0..steps.len() {
        if !matches!(steps[i].op, Op::Binary(Elementwise::Add)) || steps[i].inputs.len() != 2 {
            continue;
        }
        let found = (0..2).find_map(|j| {
            let (a, b) = (&steps[i].inputs[j], &steps[i].inputs[1 - j]);
            let &p = producer.get(a)?;
            let Op::Dense(d, false) = &steps[p].op else {
                return None;
            };
            let bias = float_const(consts, b)?;
            let fits = bias.ndim() == 1 && bias.len() == d.sizes().1;
            (fits && !d.has_bias() && !removed[p] && readers.private(a, 1))
                .then(|| (p, bias.iter().copied().collect::<Vec<f32>>()))
        });
        let Some((p, bias)) = found else {
            continue;
        };
        if let Op::Dense(d, _) = &mut steps[p].op {
            d.set_bias(bias);
        }
        steps[p].output = steps[i].output.clone();
        removed[i] = true;
    }
    remove_marked(steps, &removed);
}

/// Folds a LayerNorm written out as older exports write it —
/// `m = ReduceMean(x)`, `d = x − m`, `v = ReduceMean(d^2)`,
/// `y = d / Sqrt(v + eps)`, then optionally `· gamma` and `+ beta` (constants)
/// — into one LayerNorm step over the last axis, when every intermediate is
/// read only inside the pattern and neither kept nor a graph output. One
/// pass instead of up to nine; the same mean and variance, the division
/// taken as a product by the reciprocal (within an ulp).
fn fuse_decomposed_layer_norms(
    steps: &mut Vec<Step>,
    graph: &GraphProto,
    keep: &[String],
    consts: &Consts,
) {
    use crate::ops::reduce::{Reduce, ReduceKind};
    let readers = Readers::new(graph, keep);
    let producer = producers(steps);
    let consumer: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.inputs.iter().map(move |v| (v.as_str(), i)))
        .collect();
    let scalar = |name: &str| {
        float_const(consts, name)
            .filter(|a| a.len() == 1)
            .and_then(|a| a.iter().next().copied())
    };
    let last_axis_mean = |op: &Op| {
        matches!(op, Op::Reduce(r) if **r == Reduce {
            kind: ReduceKind::Mean,
            axes: Some(vec![-1]),
            keep_dims: true,
        })
    };
    let mut fused: Vec<(usize, Step, Vec<usize>)> = Vec::new();
    for i in 0..steps.len() {
        let found = (|| -> Option<(Step, Vec<usize>)> {
            let div = &steps[i];
            if !matches!(div.op, Op::Binary(Elementwise::Div)) || div.inputs.len() != 2 {
                return None;
            }
            let (d, s) = (&div.inputs[0], &div.inputs[1]);
            let p_sqrt = producer.get(s).copied()?;
            if !matches!(steps[p_sqrt].op, Op::Unary(ops::Unary::Sqrt)) {
                return None;
            }
            let e = steps[p_sqrt].inputs.first()?;
            let p_add = producer.get(e).copied()?;
            let add = &steps[p_add];
            if !matches!(add.op, Op::Binary(Elementwise::Add)) || add.inputs.len() != 2 {
                return None;
            }
            let (v, eps) = if let Some(eps) = scalar(&add.inputs[1]) {
                (&add.inputs[0], eps)
            } else {
                (&add.inputs[1], scalar(&add.inputs[0])?)
            };
            let p_var = producer.get(v).copied()?;
            if !last_axis_mean(&steps[p_var].op) {
                return None;
            }
            let sq = steps[p_var].inputs.first()?;
            let p_pow = producer.get(sq).copied()?;
            let pow = &steps[p_pow];
            let squares = matches!(pow.op, Op::Binary(Elementwise::Pow))
                && pow.inputs.len() == 2
                && &pow.inputs[0] == d
                && scalar(&pow.inputs[1]) == Some(2.0);
            let p_sub = producer.get(d).copied()?;
            let sub = &steps[p_sub];
            if !squares || !matches!(sub.op, Op::Binary(Elementwise::Sub)) || sub.inputs.len() != 2
            {
                return None;
            }
            let (x, m) = (&sub.inputs[0], &sub.inputs[1]);
            let p_mean = producer.get(m).copied()?;
            if !last_axis_mean(&steps[p_mean].op) || steps[p_mean].inputs.first() != Some(x) {
                return None;
            }
            let private = readers.private(m, 1)
                && readers.private(d, 2)
                && readers.private(sq, 1)
                && readers.private(v, 1)
                && readers.private(e, 1)
                && readers.private(s, 1);
            if !private {
                return None;
            }
            let mut parts = vec![p_mean, p_sub, p_pow, p_var, p_add, p_sqrt, i];
            let mut out = div.output.clone();
            // `· gamma` then `+ beta`, one value per position of the last axis.
            let vector = |name: &str| {
                float_const(consts, name)
                    .filter(|a| a.ndim() == 1)
                    .map(|a| a.iter().copied().collect::<Vec<f32>>())
            };
            let affine = |out: &str, kind: Elementwise| -> Option<(usize, Vec<f32>)> {
                let &c = consumer.get(out)?;
                let st = &steps[c];
                if !matches!(st.op, Op::Binary(k) if k == kind)
                    || st.inputs.len() != 2
                    || !readers.private(out, 1)
                {
                    return None;
                }
                let other = if st.inputs[0] == out {
                    &st.inputs[1]
                } else {
                    &st.inputs[0]
                };
                Some((c, vector(other)?))
            };
            let mut scale = vec![1.0];
            let mut bias = None;
            if let Some((c, g)) = affine(&out, Elementwise::Mul) {
                scale = g;
                parts.push(c);
                out = steps[c].output.clone();
                if let Some((c, b)) = affine(&out, Elementwise::Add) {
                    bias = Some(b);
                    parts.push(c);
                    out = steps[c].output.clone();
                }
            }
            let ln = crate::ops::norm::LayerNorm {
                axis: -1,
                epsilon: eps,
                scale,
                bias,
            };
            let last = *parts.iter().max()?;
            let step = Step::new(
                &steps[last].name.clone(),
                Op::LayerNorm(Box::new(ln)),
                vec![x.clone()],
                out,
            );
            Some((step, parts))
        })();
        if let Some((step, parts)) = found {
            fused.push((i, step, parts));
        }
    }
    let mut removed = vec![false; steps.len()];
    for (_, step, parts) in fused {
        if parts.iter().any(|&p| removed[p]) {
            continue;
        }
        let last = *parts.iter().max().expect("parts");
        for &p in &parts {
            removed[p] = p != last;
        }
        steps[last] = step;
    }
    remove_marked(steps, &removed);
}

/// Folds the exact GELU as PyTorch exports it — `Mul(Mul(x, Add(Erf(Div(x,
/// √2)), 1)), 0.5)`, or Hugging Face's `Mul(Mul(x, 0.5), Add(...))`, operands
/// in either order — into one GELU pass over `x`, when every intermediate
/// is read only inside the pattern and neither kept nor a graph output.
fn fuse_erf_gelu(steps: &mut Vec<Step>, graph: &GraphProto, keep: &[String], consts: &Consts) {
    let readers = Readers::new(graph, keep);
    let producer = producers(steps);
    let scalar = |name: &str| {
        float_const(consts, name)
            .filter(|a| a.len() == 1)
            .and_then(|a| a.iter().next().copied())
    };
    // The operands of a two-input `kind` step, the constant scalar one last.
    let split = |i: usize, kind: Elementwise| -> Option<(String, String)> {
        let st = &steps[i];
        if !matches!(st.op, Op::Binary(k) if k == kind) || st.inputs.len() != 2 {
            return None;
        }
        let (a, b) = (st.inputs[0].clone(), st.inputs[1].clone());
        Some(if scalar(&a).is_some() { (b, a) } else { (a, b) })
    };
    let private = |v: &str| readers.private(v, 1);
    let mut fused: Vec<(usize, String, Vec<usize>)> = Vec::new();
    for i in 0..steps.len() {
        let found = (|| -> Option<(String, Vec<usize>)> {
            let (u, w) = split(i, Elementwise::Mul)?;
            // `w` is 0.5 and `u = x · (1 + erf)`, or `w`/`u` are `x · 0.5` and `1 + erf`.
            let (x_side, plus) = if scalar(&w) == Some(0.5) {
                let p = *producer.get(&u)?;
                let (a, b) = split(p, Elementwise::Mul)?;
                if !private(&u) {
                    return None;
                }
                (vec![p], [a, b])
            } else {
                let half = [&u, &w]
                    .into_iter()
                    .find(|v| {
                        producer.get(v.as_str()).is_some_and(|&p| {
                            split(p, Elementwise::Mul).is_some_and(|(_, c)| scalar(&c) == Some(0.5))
                        })
                    })?
                    .clone();
                let other = if half == u { w.clone() } else { u.clone() };
                let p = producer[&half];
                let (x, _) = split(p, Elementwise::Mul)?;
                if !private(&half) {
                    return None;
                }
                (vec![p], [x, other])
            };
            // Which of the two is `1 + erf(x / √2)`, and `x` the other.
            for (x, one_plus) in [(&plus[0], &plus[1]), (&plus[1], &plus[0])] {
                let Some(&p_add) = producer.get(one_plus.as_str()) else {
                    continue;
                };
                let Some((e, one)) = split(p_add, Elementwise::Add) else {
                    continue;
                };
                let Some(&p_erf) = producer.get(&e) else {
                    continue;
                };
                if scalar(&one) != Some(1.0)
                    || !matches!(steps[p_erf].op, Op::Unary(ops::Unary::Erf))
                {
                    continue;
                }
                let d = steps[p_erf].inputs.first()?;
                let &p_div = producer.get(d)?;
                let (dx, c) = split(p_div, Elementwise::Div)?;
                let sqrt2 = scalar(&c).is_some_and(|c| (c - std::f32::consts::SQRT_2).abs() < 1e-6);
                if &dx != x || !sqrt2 || !(private(one_plus) && private(&e) && private(d)) {
                    continue;
                }
                let mut parts = x_side.clone();
                parts.extend([p_add, p_erf, p_div]);
                return Some((x.clone(), parts));
            }
            None
        })();
        if let Some((x, parts)) = found {
            fused.push((i, x, parts));
        }
    }
    let mut removed = vec![false; steps.len()];
    for (i, x, parts) in fused {
        if removed[i] || parts.iter().any(|&p| removed[p]) {
            continue;
        }
        for p in parts {
            removed[p] = true;
        }
        steps[i].op = Op::Unary(ops::Unary::Gelu);
        steps[i].inputs = vec![x];
    }
    remove_marked(steps, &removed);
}

/// Folds the fake-quant chain `Mul(1/s) → Round → Add(o) → Clip(lo, hi) →
/// Sub(o)` (scalar constants, every intermediate private) into one pass that
/// computes the same float operations in the same order.
fn fuse_fake_quant(steps: &mut Vec<Step>, graph: &GraphProto, keep: &[String], consts: &Consts) {
    let readers = Readers::new(graph, keep);
    let private = |v: &str| readers.private(v, 1);
    let scalar = |name: &str| {
        float_const(consts, name)
            .filter(|a| a.len() == 1)
            .and_then(|a| a.iter().next().copied())
    };
    let consumer: HashMap<String, usize> = steps
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.inputs.iter().map(move |v| (v.clone(), i)))
        .collect();
    // The step reading `v` when it is `v`'s only reader.
    let next = |v: &str| consumer.get(v).copied().filter(|_| private(v));
    // The runtime input and the scalar of a two-input arithmetic step.
    let split = |step: &Step| -> Option<(String, f32)> {
        match step.inputs.as_slice() {
            [a, b] => match (scalar(a), scalar(b)) {
                (None, Some(c)) => Some((a.clone(), c)),
                (Some(c), None) => Some((b.clone(), c)),
                _ => None,
            },
            _ => None,
        }
    };
    let mut removed = vec![false; steps.len()];
    let mut fused = Vec::new();
    for i in 0..steps.len() {
        let chain = (|| {
            if !matches!(steps[i].op, Op::Binary(Elementwise::Mul)) {
                return None;
            }
            let (x, inv) = split(&steps[i])?;
            let r = next(&steps[i].output)?;
            let a = next(&steps[r].output)?;
            let c = next(&steps[a].output)?;
            let d = next(&steps[c].output)?;
            if !matches!(steps[r].op, Op::Round)
                || !matches!(steps[a].op, Op::Binary(Elementwise::Add))
                || !matches!(steps[d].op, Op::Binary(Elementwise::Sub))
                || steps[d].inputs.first() != Some(&steps[c].output)
            {
                return None;
            }
            let Op::Clamp(lo, hi) = steps[c].op else {
                return None;
            };
            let (_, offset) = split(&steps[a])?;
            let (_, offset_again) = split(&steps[d])?;
            (offset == offset_again).then_some((x, inv, offset, lo, hi, [i, r, a, c, d]))
        })();
        if let Some((x, inv, offset, lo, hi, members)) = chain
            && members.iter().all(|&m| !removed[m])
        {
            for &m in &members {
                removed[m] = true;
            }
            fused.push((
                members[4],
                Step::new(
                    &steps[i].name,
                    Op::FakeQuant(ops::FakeQuant {
                        inv,
                        offset,
                        lo,
                        hi,
                    }),
                    vec![x],
                    steps[members[4]].output.clone(),
                ),
            ));
        }
    }
    // Each fused step takes the place of its chain's last step.
    for (at, step) in fused {
        steps[at] = step;
        removed[at] = false;
    }
    remove_marked(steps, &removed);
}

/// Which step computes each value.
fn producers(steps: &[Step]) -> HashMap<String, usize> {
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.output.clone(), i))
        .collect()
}

/// Drops the steps marked in `removed` (a fusion pass's leftovers).
fn remove_marked(steps: &mut Vec<Step>, removed: &[bool]) {
    let mut k = 0;
    steps.retain(|_| {
        k += 1;
        !removed[k - 1]
    });
}

fn set_activation(step: &mut Step, activation: Activation, output: String) {
    if let Op::Conv(c) = &mut step.op {
        c.activation = activation;
        step.output = output;
    }
}

/// A [`NativeModel`] behind the [`Session`] trait.
pub struct NativeSession {
    model: NativeModel,
}

impl NativeSession {
    /// Wraps a built model.
    pub fn new(model: NativeModel) -> NativeSession {
        NativeSession { model }
    }
}

impl Session for NativeSession {
    fn inputs(&self) -> &[ValueSpec] {
        &self.model.inputs
    }

    fn outputs(&self) -> &[ValueSpec] {
        &self.model.outputs
    }

    fn run(&self, feeds: &[(&str, &Tensor)], fetch: &[&str]) -> Result<Vec<Tensor>, SimError> {
        // One hand-over to the thread pool per run, not one per parallel
        // kernel (a caller outside the pool would block on each).
        let run =
            |f: &[(&str, &Tensor)], o: &[&str]| rayon::join(|| self.run_steps(f, o, None), || ()).0;
        super::per_sample::run_batch(self.model.batch, &self.model.inputs, feeds, fetch, &run)
    }

    fn run_visiting(
        &self,
        feeds: &[(&str, &Tensor)],
        fetch: &[&str],
        visit: &mut super::Visitor<'_>,
    ) -> Result<(), SimError> {
        if self.model.batch.is_free() {
            // A batch that fails part-way falls back to one sample at a time,
            // which would visit the values computed before the failure twice.
            return super::run_then_visit(self, feeds, fetch, visit);
        }
        rayon::join(|| self.run_steps(feeds, fetch, Some(visit)), || ())
            .0
            .map(drop)
    }
}

impl NativeSession {
    /// Runs the steps `fetch` needs. Without a visitor the fetched values are
    /// returned; with one, each is handed to it when computed (fed values
    /// first, constants at the end) and nothing is returned.
    fn run_steps(
        &self,
        feeds: &[(&str, &Tensor)],
        fetch: &[&str],
        mut visit: Option<&mut super::Visitor<'_>>,
    ) -> Result<Vec<Tensor>, SimError> {
        let m = &self.model;
        let mut values: HashMap<&str, Tensor> = HashMap::new();
        for (name, value) in feeds {
            if !m.known(name, ValueRole::Input) {
                return Err(m.unknown(name, ValueRole::Input));
            }
            if let Some(spec) = m.inputs.iter().find(|s| s.name == *name) {
                check_feed(spec, value, m.batch.is_free())?;
            }
            values.insert(name, (*value).clone());
        }
        for name in fetch {
            if !m.known(name, ValueRole::Output) {
                return Err(m.unknown(name, ValueRole::Output));
            }
        }
        // The steps the fetched values need, given what was fed.
        let mut needed: HashSet<&str> = fetch.iter().copied().collect();
        let mut run = vec![false; m.steps.len()];
        for (i, s) in m.steps.iter().enumerate().rev() {
            if s.outputs()
                .any(|o| needed.contains(o.as_str()) && !values.contains_key(o.as_str()))
            {
                run[i] = true;
                needed.extend(s.inputs.iter().map(String::as_str));
            }
        }
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (i, s) in m.steps.iter().enumerate().filter(|(i, _)| run[*i]) {
            for v in &s.inputs {
                last_use.insert(v, i);
            }
        }
        // Fetched values outlive their last use only when they are returned.
        let fetched: HashSet<&str> = match visit {
            Some(_) => HashSet::new(),
            None => fetch.iter().copied().collect(),
        };
        let mut visited = vec![false; fetch.len()];
        if let Some(visit) = visit.as_deref_mut() {
            // Fed values are visited first: they may be freed after their last use.
            for (k, name) in fetch.iter().enumerate() {
                if let Some(fed) = feeds.iter().find(|(n, _)| n == name) {
                    visit(k, fed.1);
                    visited[k] = true;
                }
            }
        }
        // Developer aid (docs/engine.md): per-node wall time on stderr.
        let profile = std::env::var_os("ASCEND_QUANT_PROFILE").is_some();
        for (i, s) in m.steps.iter().enumerate().filter(|(i, _)| run[*i]) {
            let args: Vec<&Tensor> = s
                .inputs
                .iter()
                .map(|name| {
                    values
                        .get(name.as_str())
                        .or_else(|| m.consts.get(name))
                        .ok_or_else(|| SimError::Run {
                            reason: format!("node '{}': input '{name}' was not fed and nothing computes it; feed it", s.name),
                        })
                })
                .collect::<Result<_, _>>()?;
            let started = profile.then(std::time::Instant::now);
            let outs = eval(&s.op, &args).map_err(|reason| SimError::Run {
                reason: format!("node '{}': {reason}", s.name),
            })?;
            if let Some(t) = started {
                eprintln!(
                    "{:>9.3} ms {} {:?}{}",
                    t.elapsed().as_secs_f64() * 1e3,
                    s.name,
                    args.first().map(|a| a.shape()).unwrap_or_default(),
                    if matches!(s.op, Op::Foreign(_)) {
                        " (rten)"
                    } else {
                        ""
                    }
                );
            }
            for v in &s.inputs {
                if last_use.get(v.as_str()) == Some(&i) && !fetched.contains(v.as_str()) {
                    values.remove(v.as_str());
                }
            }
            for (name, out) in s.outputs().zip(outs) {
                match visit.as_deref_mut() {
                    Some(visit) if fetch.contains(&name.as_str()) => {
                        for (k, _) in fetch.iter().enumerate().filter(|(_, n)| **n == name) {
                            visit(k, &out);
                            visited[k] = true;
                        }
                        if last_use.get(name.as_str()).is_some_and(|&l| l > i) {
                            values.insert(name, out);
                        }
                    }
                    _ => {
                        values.insert(name, out);
                    }
                }
            }
        }
        if let Some(visit) = visit {
            for (k, name) in fetch.iter().enumerate().filter(|(k, _)| !visited[*k]) {
                let value = m.consts.get(*name).ok_or_else(|| SimError::Run {
                    reason: format!("'{name}' was not computed"),
                })?;
                visit(k, value);
            }
            return Ok(Vec::new());
        }
        // Fetched values are moved out (copied only when fetched twice).
        fetch
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let again = fetch[k + 1..].contains(name);
                let value = if again {
                    values.get(name).cloned()
                } else {
                    values.remove(name)
                };
                value
                    .or_else(|| m.consts.get(*name).cloned())
                    .ok_or_else(|| SimError::Run {
                        reason: format!("'{name}' was not computed"),
                    })
            })
            .collect()
    }
}

/// Input `k` of a float kernel.
fn float_arg<'a>(args: &[&'a Tensor], k: usize) -> Result<&'a ArrayD<f32>, String> {
    let t = args.get(k).ok_or_else(|| format!("input {k} is missing"))?;
    t.as_f32()
        .ok_or_else(|| format!("input {k} is {}, where float32 is needed", t.dtype()))
}

fn eval(op: &Op, args: &[&Tensor]) -> Result<Vec<Tensor>, String> {
    if let Op::Foreign(f) = op {
        return f.run(args);
    }
    if let Op::Evaluated(node, opset, positions) = op {
        let inputs: Vec<Option<&Tensor>> = positions
            .iter()
            .map(|p| p.and_then(|k| args.get(k).copied()))
            .collect();
        return crate::ops::eval_constant(node, *opset, &inputs)
            .unwrap_or_else(|| Err(format!("{} is not evaluated here", node.op_type())));
    }
    if let Op::Layout(l) = op {
        let x = args.first().ok_or("the node has no input to read")?;
        return Ok(vec![l.run(x)?]);
    }
    let x = float_arg(args, 0)?;
    let out = match op {
        // A second input is a residual the engine fused (`fuse_residual_adds`).
        Op::Conv(c) => ops::conv(c, x, args.get(1).map(|_| float_arg(args, 1)).transpose()?),
        Op::Dense(d, two_d) => ops::dense(d, x, *two_d),
        Op::Clamp(lo, hi) => Ok(ops::clamp(x, *lo, *hi)),
        Op::Sigmoid => Ok(ops::sigmoid(x)),
        Op::Round => Ok(x.mapv(f32::round_ties_even)),
        Op::Unary(u) => Ok(ops::unary(*u, x)),
        Op::FakeQuant(q) => Ok(q.apply(x)),
        Op::QuantDequant(q) => Ok(q.apply(x)),
        Op::Binary(e) => ops::binary(*e, x, float_arg(args, 1)?),
        Op::GlobalAveragePool => ops::global_average_pool(x),
        Op::MaxPool(p) => p.run(x, true),
        Op::AveragePool(p) => p.run(x, false),
        Op::Concat(axis) => {
            let parts = (0..args.len())
                .map(|k| float_arg(args, k))
                .collect::<Result<Vec<_>, _>>()?;
            ops::concat(&parts, *axis)
        }
        Op::Identity => Ok(x.clone()),
        Op::Softmax(axis) => ops::softmax(x, *axis, false),
        Op::SoftmaxFlat(axis) => ops::softmax(x, *axis, true),
        Op::ResizeNearest(scales) => ops::resize_nearest(x, scales),
        Op::Resize(r) => r.run(x),
        Op::LayerNorm(ln) => ln.run(x),
        Op::Reduce(r) => r.run(x),
        Op::MatMul => ops::matmul(x, float_arg(args, 1)?),
        Op::Quantize(q) => Ok(q.apply(x)),
        Op::AntiQuant(q) => Ok(q.apply(x)),
        Op::IntConv(c) => ops::int_conv(c, x),
        Op::IntDense(d, two_d) => ops::int_dense(d, x, *two_d),
        Op::IntMatMul(m) => m.run(x, float_arg(args, 1)?),
        Op::Layout(_) | Op::Foreign(_) | Op::Evaluated(..) => unreachable!("handled above"),
    };
    out.map(|a| vec![Tensor::F32(a)])
}
