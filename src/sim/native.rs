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
use super::kernels::conv::{Conv, ConvGeometry, Dense};
use super::kernels::int_conv::{IntConv, IntDense};
use super::native_ops::{self as ops, Elementwise};
use super::per_sample::BatchMode;
use super::prepare::{check_feed, feedable_inputs, rewrite_for_execution};
use super::{Session, SessionOptions};
use crate::onnx::attr::{float_attr, int_attr, ints_attr, string_attr};
use crate::onnx::{GraphProto, ModelProto, NodeProto, ValueSpec, to_tensor};
use crate::tensor::Tensor;
use ndarray::ArrayD;
use std::collections::{HashMap, HashSet};

/// What one step computes.
pub(super) enum Op {
    Conv(Box<Conv>),
    Dense(Box<Dense>),
    Clamp(f32, f32),
    Sigmoid,
    Round,
    FakeQuant(ops::FakeQuant),
    QuantDequant(ops::QuantDequant),
    Binary(Elementwise),
    GlobalAveragePool,
    MaxPool(ops::Pool),
    AveragePool(ops::Pool),
    Flatten(i64),
    Reshape(Vec<i64>, bool),
    Concat(i64),
    Identity,
    Softmax(i64),
    SoftmaxFlat(i64),
    ResizeNearest(Vec<f32>),
    /// Deploy models (`native_deploy`): int8 levels from floats,
    Quantize(ops::AscendQuantize),
    /// floats from int8 levels,
    AntiQuant(ops::AscendAntiQuantize),
    /// a quantized Conv with its dequantization,
    IntConv(Box<IntConv>),
    /// a quantized Gemm (true: 2-D input only) or MatMul with its dequantization.
    IntDense(Box<IntDense>, bool),
}

/// One node, ready to run.
pub(super) struct Step {
    pub(super) name: String,
    pub(super) op: Op,
    pub(super) inputs: Vec<String>,
    pub(super) output: String,
}

/// A model the native engine runs.
pub struct NativeModel {
    steps: Vec<Step>,
    consts: HashMap<String, ArrayD<f32>>,
    inputs: Vec<ValueSpec>,
    outputs: Vec<ValueSpec>,
    keep: Vec<String>,
    batch: BatchMode,
}

/// Why a node keeps a model off the native engine (only used to decide).
pub(super) type Decline = ();

impl NativeModel {
    /// The model prepared for the native engine, or `None` when it uses an
    /// operator, attribute or element type the native engine does not run.
    pub fn build(
        model: &ModelProto,
        opts: &SessionOptions,
    ) -> Result<Option<NativeModel>, SimError> {
        let mut prepared = rewrite_for_execution(model, opts)?;
        let mut batch = BatchMode::of(model, opts).sample_by_sample();
        if !super::ascend::has_ascend_ops(&prepared) {
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
            if let Some(folded) = super::fold::fold_constants(&prepared, one_sample, &exposed) {
                prepared = folded;
                // Folded shapes hold a batch of 1: the model runs sample by sample.
                if free_batch {
                    batch = BatchMode::PerSample;
                }
            }
        }
        let Some(graph) = prepared.graph.as_ref() else {
            return Ok(None);
        };
        let index = crate::onnx::GraphIndex::new(graph).map_err(|e| SimError::Load {
            reason: e.to_string(),
        })?;
        let inputs = feedable_inputs(&prepared);
        // A deploy model's int8 / int32 values stay inside its quantized
        // steps (`native_deploy`); only what the caller sees must be float.
        let float = if super::ascend::has_ascend_ops(&prepared) {
            outputs_are_float(graph)
        } else {
            graph_is_float(graph)
        };
        if inputs.iter().any(|s| s.elem_type != Some(1)) || !float {
            return Ok(None);
        }
        let outputs: Vec<ValueSpec> = model
            .graph
            .iter()
            .flat_map(|g| &g.output)
            .map(ValueSpec::from_proto)
            .collect();
        let opset = prepared
            .opset_import
            .iter()
            .find(|o| o.domain().is_empty() || o.domain() == "ai.onnx")
            .and_then(|o| o.version)
            .unwrap_or(1);
        Ok(Self::steps(graph, &index, opset, opts)
            .ok()
            .map(|(steps, mut consts)| {
                // Weights the kernels packed are not kept a second time: only
                // constants a step reads, or that may be fetched, stay.
                let read: HashSet<&str> = steps
                    .iter()
                    .flat_map(|s| s.inputs.iter().map(String::as_str))
                    .chain(outputs.iter().map(|o| o.name.as_str()))
                    .chain(opts.keep.iter().map(String::as_str))
                    .collect();
                consts.retain(|name, _| read.contains(name.as_str()));
                (steps, consts)
            })
            .map(|(steps, consts)| NativeModel {
                steps,
                consts,
                inputs,
                outputs,
                keep: opts.keep.clone(),
                batch,
            }))
    }

    #[allow(clippy::type_complexity)]
    fn steps(
        graph: &GraphProto,
        index: &crate::onnx::GraphIndex,
        opset: i64,
        opts: &SessionOptions,
    ) -> Result<(Vec<Step>, HashMap<String, ArrayD<f32>>), Decline> {
        let mut consts: HashMap<String, ArrayD<f32>> = HashMap::new();
        let mut int_consts: HashMap<String, Vec<i64>> = HashMap::new();
        // Scalar int8/uint8 zero points: (zero point, lowest, highest level).
        let mut zero_points: HashMap<String, (f32, f32, f32)> = HashMap::new();
        // Constants of other types (a deploy model's weights, biases and
        // scales): only its quantized steps may read them.
        let mut others: HashSet<String> = HashSet::new();
        for t in &graph.initializer {
            add_const(
                (&mut consts, &mut int_consts, &mut zero_points, &mut others),
                t.name(),
                to_tensor(t).map_err(|_| ())?,
            )?;
        }
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
                    .ok_or(())?;
                let out = node.output.first().ok_or(())?.clone();
                add_const(
                    (&mut consts, &mut int_consts, &mut zero_points, &mut others),
                    &out,
                    to_tensor(t).map_err(|_| ())?,
                )?;
                continue;
            }
            if absorbed.contains(&i) {
                continue;
            }
            if let Some(s) = super::native_deploy::step(graph, index, i, &exposed, &mut absorbed)? {
                steps.push(s);
                continue;
            }
            if node.op_type() == "QuantizeLinear" {
                let (step, dq) =
                    quant_dequant(graph, index, node, &consts, &zero_points, &opts.keep)?;
                absorbed.insert(dq);
                steps.push(step);
                continue;
            }
            steps.push(step(node, opset, &consts, &int_consts, &others)?);
        }
        if opts.optimize {
            fuse_activations(&mut steps, graph, &opts.keep);
            fuse_residual_adds(&mut steps, graph, &opts.keep);
            fuse_fake_quant(&mut steps, graph, &opts.keep, &consts);
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
fn outputs_are_float(g: &GraphProto) -> bool {
    g.output
        .iter()
        .map(ValueSpec::from_proto)
        .all(|s| s.elem_type.is_none_or(|t| t == 1))
}

/// Whether every value the graph declares is float32 (or undeclared).
fn graph_is_float(g: &GraphProto) -> bool {
    g.output
        .iter()
        .chain(&g.value_info)
        .map(ValueSpec::from_proto)
        .all(|s| s.elem_type.is_none_or(|t| t == 1))
}

fn step(
    node: &NodeProto,
    opset: i64,
    consts: &HashMap<String, ArrayD<f32>>,
    int_consts: &HashMap<String, Vec<i64>>,
    others: &HashSet<String>,
) -> Result<Step, Decline> {
    if node.output.len() != 1 || !node.domain().is_empty() && node.domain() != "ai.onnx" {
        return Err(());
    }
    let input = |k: usize| node.input.get(k).filter(|s| !s.is_empty());
    let scalar = |k: usize| -> Result<Option<f32>, Decline> {
        match input(k) {
            None => Ok(None),
            Some(name) => match consts.get(name) {
                Some(a) if a.len() == 1 => Ok(a.iter().next().copied()),
                _ => Err(()),
            },
        }
    };
    let mut inputs: Vec<String> = node
        .input
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    let op = match node.op_type() {
        "Conv" => {
            let (conv, used) = conv(node, consts)?;
            inputs.truncate(used);
            Op::Conv(Box::new(conv))
        }
        "Gemm" => {
            if int_attr(node, "transA").unwrap_or(0) != 0
                || float_attr(node, "alpha").unwrap_or(1.0) != 1.0
                || float_attr(node, "beta").unwrap_or(1.0) != 1.0
            {
                return Err(());
            }
            let w = consts.get(input(1).ok_or(())?).ok_or(())?;
            if w.ndim() != 2 {
                return Err(());
            }
            let trans_b = int_attr(node, "transB").unwrap_or(0) != 0;
            let (k, m) = if trans_b {
                (w.shape()[1], w.shape()[0])
            } else {
                (w.shape()[0], w.shape()[1])
            };
            let bias = match input(2) {
                None => None,
                Some(name) => {
                    let c = consts.get(name).ok_or(())?;
                    if c.len() != m || !(c.ndim() == 1 || c.ndim() == 2 && c.shape()[0] == 1) {
                        return Err(());
                    }
                    Some(c.iter().copied().collect())
                }
            };
            let weight: Vec<f32> = w.iter().copied().collect();
            inputs.truncate(1);
            Op::Dense(Box::new(Dense::new(&weight, k, m, trans_b, bias)))
        }
        "Relu" => Op::Clamp(0.0, f32::INFINITY),
        "Clip" => {
            let (lo, hi) = if node.input.len() > 1 {
                (scalar(1)?, scalar(2)?)
            } else {
                (float_attr(node, "min"), float_attr(node, "max"))
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
        "GlobalAveragePool" => Op::GlobalAveragePool,
        "MaxPool" | "AveragePool" => {
            let pool = ops::Pool::from_node(node).ok_or(())?;
            if node.op_type() == "MaxPool" {
                Op::MaxPool(pool)
            } else {
                Op::AveragePool(pool)
            }
        }
        "Flatten" => Op::Flatten(int_attr(node, "axis").unwrap_or(1)),
        "Reshape" => {
            let shape = int_consts.get(input(1).ok_or(())?).ok_or(())?.clone();
            inputs.truncate(1);
            Op::Reshape(shape, int_attr(node, "allowzero").unwrap_or(0) != 0)
        }
        "Concat" => Op::Concat(int_attr(node, "axis").ok_or(())?),
        "Identity" | "Dropout" => {
            inputs.truncate(1);
            Op::Identity
        }
        "Softmax" => {
            // Before opset 13 the input is flattened to 2-D at `axis` (default 1).
            if opset < 13 {
                Op::SoftmaxFlat(int_attr(node, "axis").unwrap_or(1))
            } else {
                Op::Softmax(int_attr(node, "axis").unwrap_or(-1))
            }
        }
        "Resize" => {
            // Nearest resizing by whole factors, in the two spellings that
            // pick input index floor(out / scale): PyTorch's export
            // (asymmetric + floor) and ONNX's default (half_pixel + round).
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
            if mode != b"nearest"
                || !floor_index
                || axes
                || node.input.len() < 3
                || input(3).is_some()
            {
                return Err(());
            }
            let scales = consts.get(input(2).ok_or(())?).ok_or(())?;
            let scales: Vec<f32> = scales.iter().copied().collect();
            if scales.iter().any(|s| *s < 1.0 || s.fract() != 0.0) {
                return Err(());
            }
            inputs.truncate(1);
            Op::ResizeNearest(scales)
        }
        _ => return Err(()),
    };
    // Every remaining input must be a runtime value or a float constant.
    if inputs
        .iter()
        .any(|i| int_consts.contains_key(i) || others.contains(i))
    {
        return Err(());
    }
    Ok(Step {
        name: node.name().to_string(),
        op,
        inputs,
        output: node.output[0].clone(),
    })
}

/// The constant tables: float tensors, int64 tensors (shapes), scalar
/// int8/uint8 zero points as (zero point, lowest, highest level), and the
/// names of constants of any other type.
type ConstTables<'a> = (
    &'a mut HashMap<String, ArrayD<f32>>,
    &'a mut HashMap<String, Vec<i64>>,
    &'a mut HashMap<String, (f32, f32, f32)>,
    &'a mut HashSet<String>,
);

/// Files one constant in its table.
fn add_const(
    (floats, ints, zero_points, others): ConstTables<'_>,
    name: &str,
    t: Tensor,
) -> Result<(), Decline> {
    match t {
        Tensor::F32(a) => {
            floats.insert(name.to_string(), a);
        }
        Tensor::I64(a) => {
            ints.insert(name.to_string(), a.iter().copied().collect());
        }
        Tensor::I8(a) if a.len() == 1 => {
            let z = f32::from(*a.iter().next().expect("one value"));
            zero_points.insert(name.to_string(), (z, -128.0, 127.0));
        }
        Tensor::U8(a) if a.len() == 1 => {
            let z = f32::from(*a.iter().next().expect("one value"));
            zero_points.insert(name.to_string(), (z, 0.0, 255.0));
        }
        _ => {
            others.insert(name.to_string());
        }
    }
    Ok(())
}

/// A `QuantizeLinear` whose only reader is a `DequantizeLinear` with the same
/// per-tensor scale and zero point, as one float step: `(clamp(round(x / s)
/// + z, lo, hi) − z) · s`, ONNX's arithmetic for the pair. Returns the step
/// and the index of the absorbed `DequantizeLinear`.
fn quant_dequant(
    graph: &GraphProto,
    index: &crate::onnx::GraphIndex,
    q: &NodeProto,
    consts: &HashMap<String, ArrayD<f32>>,
    zero_points: &HashMap<String, (f32, f32, f32)>,
    keep: &[String],
) -> Result<(Step, usize), Decline> {
    let out = q.output.first().ok_or(())?;
    let exposed = keep.contains(out) || graph.output.iter().any(|o| o.name() == out);
    let [dq] = index.consumers(out) else {
        return Err(());
    };
    let d = &graph.node[*dq];
    if exposed || d.op_type() != "DequantizeLinear" || d.input.first() != Some(out) {
        return Err(());
    }
    let scalar = |name: Option<&String>| {
        name.and_then(|n| consts.get(n))
            .filter(|a| a.len() == 1)
            .and_then(|a| a.iter().next().copied())
    };
    let scale = scalar(q.input.get(1)).ok_or(())?;
    if scalar(d.input.get(1)) != Some(scale) {
        return Err(());
    }
    let zp = |n: &NodeProto| match n.input.get(2).filter(|s| !s.is_empty()) {
        None => Some((0.0, 0.0, 255.0)),
        Some(name) => zero_points.get(name).copied(),
    };
    let (z, lo, hi) = zp(q).ok_or(())?;
    if zp(d) != Some((z, lo, hi)) || d.output.len() != 1 {
        return Err(());
    }
    Ok((
        Step {
            name: q.name().to_string(),
            op: Op::QuantDequant(ops::QuantDequant {
                scale,
                zero: z,
                lo,
                hi,
            }),
            inputs: vec![q.input.first().ok_or(())?.clone()],
            output: d.output[0].clone(),
        },
        *dq,
    ))
}

/// A Conv with constant weight (and bias); returns it and how many inputs it reads at run time.
fn conv(node: &NodeProto, consts: &HashMap<String, ArrayD<f32>>) -> Result<(Conv, usize), Decline> {
    let w = consts.get(node.input.get(1).ok_or(())?).ok_or(())?;
    let geometry = conv_geometry(node, w.shape())?;
    let (c_out, cg) = (w.shape()[0], w.shape()[1]);
    let bias = match node.input.get(2).filter(|s| !s.is_empty()) {
        None => None,
        Some(b) => {
            let b = consts.get(b).ok_or(())?;
            if b.len() != c_out {
                return Err(());
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

/// A 2-D Conv's attributes for a weight of shape `[C_out, C_in/group, kh, kw]`.
pub(super) fn conv_geometry(node: &NodeProto, weight: &[usize]) -> Result<ConvGeometry, Decline> {
    let &[c_out, _, kh, kw] = weight else {
        return Err(());
    };
    let auto_pad = string_attr(node, "auto_pad").unwrap_or(b"NOTSET");
    let group = int_attr(node, "group").unwrap_or(1).max(1) as usize;
    let two = |name: &str, default: usize| -> Result<(usize, usize), Decline> {
        match ints_attr(node, name) {
            None => Ok((default, default)),
            Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 0) => {
                Ok((v[0] as usize, v[1] as usize))
            }
            _ => Err(()),
        }
    };
    if let Some(k) = ints_attr(node, "kernel_shape")
        && k != [kh as i64, kw as i64]
    {
        return Err(());
    }
    let stride = two("strides", 1)?;
    let dilation = two("dilations", 1)?;
    if stride.0 == 0 || stride.1 == 0 || dilation.0 == 0 || dilation.1 == 0 || c_out % group != 0 {
        return Err(());
    }
    let pads = match (auto_pad, ints_attr(node, "pads")) {
        (b"NOTSET", None) | (b"VALID", _) => [0; 4],
        (b"NOTSET", Some(p)) if p.len() == 4 && p.iter().all(|&x| x >= 0) => {
            [p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize]
        }
        _ => return Err(()),
    };
    Ok(ConvGeometry {
        kernel: (kh, kw),
        stride,
        dilation,
        pads,
        group,
    })
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
        steps[i] = Step {
            name: steps[p].name.clone(),
            op: conv,
            inputs: vec![x, residual],
            output: steps[i].output.clone(),
        };
        removed[p] = true;
    }
    remove_marked(steps, &removed);
}

/// Folds the fake-quant chain `Mul(1/s) → Round → Add(o) → Clip(lo, hi) →
/// Sub(o)` (scalar constants, every intermediate private) into one pass that
/// computes the same float operations in the same order.
fn fuse_fake_quant(
    steps: &mut Vec<Step>,
    graph: &GraphProto,
    keep: &[String],
    consts: &HashMap<String, ArrayD<f32>>,
) {
    let readers = Readers::new(graph, keep);
    let private = |v: &str| readers.private(v, 1);
    let scalar = |name: &str| {
        consts
            .get(name)
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
                Step {
                    name: steps[i].name.clone(),
                    op: Op::FakeQuant(ops::FakeQuant {
                        inv,
                        offset,
                        lo,
                        hi,
                    }),
                    inputs: vec![x],
                    output: steps[members[4]].output.clone(),
                },
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
        let mut values: HashMap<&str, ArrayD<f32>> = HashMap::new();
        for (name, value) in feeds {
            if !m.known(name, ValueRole::Input) {
                return Err(m.unknown(name, ValueRole::Input));
            }
            if let Some(spec) = m.inputs.iter().find(|s| s.name == *name) {
                check_feed(spec, value, m.batch.is_free())?;
            }
            let Tensor::F32(a) = value else {
                return Err(SimError::InputMismatch {
                    name: name.to_string(),
                    reason: format!(
                        "got {} data but the value is float32; convert the data",
                        value.dtype()
                    ),
                });
            };
            values.insert(name, a.clone());
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
            if needed.contains(s.output.as_str()) && !values.contains_key(s.output.as_str()) {
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
            let args: Vec<&ArrayD<f32>> = s
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
            let out = eval(&s.op, &args).map_err(|reason| SimError::Run {
                reason: format!("node '{}': {reason}", s.name),
            })?;
            if let Some(t) = started {
                eprintln!(
                    "{:>9.3} ms {} {:?}",
                    t.elapsed().as_secs_f64() * 1e3,
                    s.name,
                    args[0].shape()
                );
            }
            for v in &s.inputs {
                if last_use.get(v.as_str()) == Some(&i) && !fetched.contains(v.as_str()) {
                    values.remove(v.as_str());
                }
            }
            match visit.as_deref_mut() {
                Some(visit) if fetch.contains(&s.output.as_str()) => {
                    let value = Tensor::F32(out);
                    for (k, _) in fetch.iter().enumerate().filter(|(_, n)| **n == s.output) {
                        visit(k, &value);
                        visited[k] = true;
                    }
                    let Tensor::F32(out) = value else {
                        unreachable!("wrapped above")
                    };
                    if last_use.get(s.output.as_str()).is_some_and(|&l| l > i) {
                        values.insert(&s.output, out);
                    }
                }
                _ => {
                    values.insert(&s.output, out);
                }
            }
        }
        if let Some(visit) = visit {
            for (k, name) in fetch.iter().enumerate().filter(|(k, _)| !visited[*k]) {
                let value = m.consts.get(*name).ok_or_else(|| SimError::Run {
                    reason: format!("'{name}' was not computed"),
                })?;
                visit(k, &Tensor::F32(value.clone()));
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
                    .map(Tensor::F32)
                    .ok_or_else(|| SimError::Run {
                        reason: format!("'{name}' was not computed"),
                    })
            })
            .collect()
    }
}

fn eval(op: &Op, args: &[&ArrayD<f32>]) -> Result<ArrayD<f32>, String> {
    let x = *args.first().ok_or("the node has no input to read")?;
    match op {
        // A second input is a residual the engine fused (`fuse_residual_adds`).
        Op::Conv(c) => ops::conv(c, x, args.get(1).copied()),
        Op::Dense(d) => ops::dense(d, x),
        Op::Clamp(lo, hi) => Ok(ops::clamp(x, *lo, *hi)),
        Op::Sigmoid => Ok(ops::sigmoid(x)),
        Op::Round => Ok(x.mapv(f32::round_ties_even)),
        Op::FakeQuant(q) => Ok(q.apply(x)),
        Op::QuantDequant(q) => Ok(q.apply(x)),
        Op::Binary(e) => ops::binary(*e, x, args.get(1).ok_or("a second input is missing")?),
        Op::GlobalAveragePool => ops::global_average_pool(x),
        Op::MaxPool(p) => p.run(x, true),
        Op::AveragePool(p) => p.run(x, false),
        Op::Flatten(axis) => ops::flatten(x, *axis),
        Op::Reshape(shape, allow_zero) => ops::reshape(x, shape, *allow_zero),
        Op::Concat(axis) => ops::concat(args, *axis),
        Op::Identity => Ok(x.clone()),
        Op::Softmax(axis) => ops::softmax(x, *axis, false),
        Op::SoftmaxFlat(axis) => ops::softmax(x, *axis, true),
        Op::ResizeNearest(scales) => ops::resize_nearest(x, scales),
        Op::Quantize(q) => Ok(q.apply(x)),
        Op::AntiQuant(q) => Ok(q.apply(x)),
        Op::IntConv(c) => ops::int_conv(c, x),
        Op::IntDense(d, two_d) => ops::int_dense(d, x, *two_d),
    }
}
