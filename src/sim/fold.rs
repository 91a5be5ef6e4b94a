//! Shape folding: the parts of a graph that compute constants — the shape
//! arithmetic real exports carry (`Shape → Gather → … → Reshape`'s target,
//! TF-style "same" padding computed from the input's size, a detector's
//! anchor grid) — are computed once when the model is prepared and replaced
//! by initializers; then a constant zero `Pad` before a convolution is folded
//! into the convolution's own padding. The meaning of the model is unchanged
//! for the batch the engine runs (see [`fold_constants`]).
//!
//! A value is *static* when it follows from constants and from the shapes of
//! values whose shapes are known before running: graph inputs with fixed
//! dimensions, and the outputs of operators whose output shapes follow from
//! their inputs' shapes and static values ([`ops::shape_value_inputs`]).
//! The shapes read by `Shape` / `Size` nodes are taken from one run of the
//! model on the rten engine with zero inputs (only the nodes those values
//! need run); everything else is evaluated by [`ops::eval_constant`].

use crate::onnx::proto::type_proto;
use crate::onnx::{Dim, GraphIndex, ModelProto, NodeProto, Storage, ValueInfoProto, ValueSpec};
use crate::ops;
use crate::ops::window::{AutoPad, Window};
use crate::tensor::{DType, Tensor};
use std::collections::{HashMap, HashSet};

/// The largest initializer (in elements) shape folding reads: constants of
/// shape arithmetic are small, and weights are never copied for it.
const MAX_READ: usize = 1 << 16;

/// `model` with its static values computed and made initializers and the
/// nodes computing them removed, then zero `Pad`s folded into the
/// convolutions after them. `one_sample` says the engine runs one sample at
/// a time, so a free first axis of the first input counts as 1; other free
/// dimensions keep everything that depends on them unfolded. Values in
/// `exposed` (graph outputs, kept values) stay available under their names.
/// Returns `None` when there is nothing to fold.
pub(super) fn fold_constants(
    model: &ModelProto,
    one_sample: bool,
    exposed: &HashSet<String>,
    probe: &Probe<'_>,
) -> Option<ModelProto> {
    let mut folded = fold_static_values(model, one_sample, exposed, probe);
    let padded = fold_pads(folded.as_ref().unwrap_or(model), exposed);
    if padded.is_some() {
        folded = padded;
    }
    folded
}

fn opset(model: &ModelProto) -> i64 {
    crate::onnx::default_opset(model).unwrap_or(1)
}

/// Runs a model (given with the values to fetch as its outputs) on some
/// feeds without folding it: what reads the shapes `Shape` nodes see.
pub(super) type Probe<'a> =
    dyn Fn(&ModelProto, &[(&str, &Tensor)], &[&str]) -> Option<Vec<Tensor>> + 'a;

fn fold_static_values(
    model: &ModelProto,
    one_sample: bool,
    exposed: &HashSet<String>,
    probe_run: &Probe<'_>,
) -> Option<ModelProto> {
    let g = model.graph.as_ref()?;
    let index = GraphIndex::new(g).ok()?;
    let opset = opset(model);
    let inits: HashMap<&str, usize> = g
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name(), i))
        .collect();
    let inputs = super::prepare::feedable_inputs(model);
    // Which values have a known shape, and which a known value.
    let mut shaped: HashSet<&str> = inits.keys().copied().collect();
    let mut valued: HashSet<&str> = shaped.clone();
    for (k, spec) in inputs.iter().enumerate() {
        let fixed = spec.shape.as_ref().is_some_and(|dims| {
            dims.iter()
                .enumerate()
                .all(|(axis, d)| matches!(d, Dim::Fixed(_)) || (one_sample && k == 0 && axis == 0))
        });
        if fixed {
            shaped.insert(spec.name.as_str());
        }
    }
    let default_domain = |n: &NodeProto| n.domain().is_empty() || n.domain() == "ai.onnx";
    let present = |n: &'_ NodeProto| -> Vec<(usize, String)> {
        n.input
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k, v.clone()))
            .collect()
    };
    let mut static_nodes: Vec<usize> = Vec::new();
    let mut probe: Vec<String> = Vec::new();
    for &i in index.topological_order() {
        let n = &g.node[i];
        if !default_domain(n) || ops::is_random(n.op_type()) {
            continue;
        }
        let ins = present(n);
        let outs = n
            .output
            .iter()
            .filter(|o| !o.is_empty())
            .map(String::as_str);
        let all_valued = ins.iter().all(|(_, v)| valued.contains(v.as_str()));
        let shape_read = matches!(n.op_type(), "Shape" | "Size")
            && ins
                .first()
                .is_some_and(|(_, v)| shaped.contains(v.as_str()));
        if n.op_type() == "Constant" || (ops::evaluates(n) && (all_valued || shape_read)) {
            if !all_valued && n.op_type() != "Constant" {
                let Some(out) = n.output.first() else {
                    continue;
                };
                probe.push(out.clone());
            }
            if n.op_type() != "Constant" {
                static_nodes.push(i);
            }
            for o in outs {
                valued.insert(o);
                shaped.insert(o);
            }
            continue;
        }
        let Some(value_inputs) = ops::shape_value_inputs(n.op_type()) else {
            continue;
        };
        let follows = ins.iter().all(|(k, v)| {
            shaped.contains(v.as_str())
                && (!value_inputs.contains(k) || valued.contains(v.as_str()))
        });
        if follows {
            shaped.extend(outs);
        }
    }
    // Only values read by a node that stays, or seen by the caller, are kept.
    let static_outputs: HashSet<&str> = static_nodes
        .iter()
        .flat_map(|&i| g.node[i].output.iter().map(String::as_str))
        .collect();
    let needed = |v: &str| {
        exposed.contains(v)
            || index
                .consumers(v)
                .iter()
                .any(|&c| !static_nodes.contains(&c) && g.node[c].op_type() != "Constant")
    };
    if !static_outputs.iter().any(|v| needed(v)) {
        return None;
    }
    let mut values: HashMap<String, Tensor> = if probe.is_empty() {
        HashMap::new()
    } else {
        probe_shapes(model, &inputs, &probe, probe_run)?
    };
    // Evaluate in graph order; a node that fails (or reads an initializer
    // too big to copy) stays in the graph, and so does what reads it.
    let read_init = |name: &str, values: &mut HashMap<String, Tensor>| -> bool {
        if values.contains_key(name) {
            return true;
        }
        let Some(&k) = inits.get(name) else {
            return false;
        };
        let t = &g.initializer[k];
        if t.dims.iter().product::<i64>() > MAX_READ as i64 {
            return false;
        }
        match crate::onnx::to_tensor(t) {
            Ok(v) => {
                values.insert(name.to_string(), v);
                true
            }
            Err(_) => false,
        }
    };
    let mut folded_nodes: HashSet<usize> = HashSet::new();
    for &i in &static_nodes {
        let n = &g.node[i];
        if n.output.iter().all(|o| values.contains_key(o)) {
            folded_nodes.insert(i);
            continue;
        }
        let mut ok = true;
        for v in n.input.iter().filter(|v| !v.is_empty()) {
            ok &= read_init(v, &mut values) || constant_node_value(g, &index, v, &mut values);
        }
        if !ok {
            continue;
        }
        let args: Vec<Option<&Tensor>> = n
            .input
            .iter()
            .map(|v| (!v.is_empty()).then(|| values.get(v)).flatten())
            .collect();
        if !small_result(n, &args) {
            continue;
        }
        if let Some(Ok(outs)) = ops::eval_constant(n, opset, &args)
            && outs.len() == n.output.len()
        {
            for (name, v) in n.output.iter().zip(outs) {
                values.insert(name.clone(), v);
            }
            folded_nodes.insert(i);
        }
    }
    if folded_nodes.is_empty() {
        return None;
    }
    let mut m = model.clone();
    let graph = m.graph.as_mut().expect("checked above");
    let kept_nodes: Vec<NodeProto> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| !folded_nodes.contains(i))
        .map(|(_, n)| n.clone())
        .collect();
    let read_after: HashSet<&str> = kept_nodes
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    for &i in &folded_nodes {
        for o in &g.node[i].output {
            if (read_after.contains(o.as_str()) || exposed.contains(o))
                && let Some(v) = values.get(o)
            {
                graph
                    .initializer
                    .push(crate::onnx::to_proto(o, v, Storage::Raw));
            }
        }
    }
    graph.node = kept_nodes;
    remove_dead_nodes(graph, exposed);
    Some(m)
}

/// Whether a node that makes values from a shape (ConstantOfShape, Expand,
/// Range, Pad) makes at most [`MAX_READ`] of them: what folding computes is
/// shape arithmetic and small tables; anything bigger runs with the model.
fn small_result(n: &NodeProto, args: &[Option<&Tensor>]) -> bool {
    let ints = |k: usize| {
        args.get(k)
            .copied()
            .flatten()
            .and_then(|t| ops::ints_of(t).ok())
    };
    let count = |dims: &[i64]| {
        dims.iter().try_fold(1u64, |acc, &d| {
            acc.checked_mul(u64::try_from(d.max(1)).ok()?)
        })
    };
    let within = |n: Option<u64>| n.is_some_and(|n| n <= MAX_READ as u64);
    let input_len = args
        .first()
        .copied()
        .flatten()
        .map_or(0, |t| t.len() as u64);
    match n.op_type() {
        "ConstantOfShape" => within(ints(0).and_then(|d| count(&d))),
        "Expand" => within(ints(1).and_then(|d| count(&d)).map(|n| n.max(input_len))),
        "Pad" => within(ints(1).map(|p| {
            let grow: i64 = p.iter().map(|v| v.max(&0)).sum();
            input_len.saturating_mul(1 + grow.max(0) as u64)
        })),
        "Range" => {
            let one = |k: usize| {
                args.get(k)
                    .copied()
                    .flatten()
                    .and_then(|t| t.to_f64_vec().first().copied())
            };
            match (one(0), one(1), one(2)) {
                (Some(s), Some(l), Some(d)) if d != 0.0 => {
                    ((l - s) / d).ceil().max(0.0) <= MAX_READ as f64
                }
                _ => false,
            }
        }
        _ => true,
    }
}

/// The value of a `Constant` node's output, filed in `values`.
fn constant_node_value(
    g: &crate::onnx::GraphProto,
    index: &GraphIndex,
    name: &str,
    values: &mut HashMap<String, Tensor>,
) -> bool {
    if values.contains_key(name) {
        return true;
    }
    let Some(p) = index.producer_node(name) else {
        return false;
    };
    let n = &g.node[p];
    let value = ops::constant_value(n).and_then(|t| crate::onnx::to_tensor(t).ok());
    match value {
        Some(v) => {
            values.insert(name.to_string(), v);
            true
        }
        None => false,
    }
}

/// The outputs of `Shape` / `Size` nodes (`probe`), from one run of the
/// model, unfolded, on the native engine with zero inputs (free dimensions
/// as 1). `None` when it cannot run the model.
fn probe_shapes(
    model: &ModelProto,
    inputs: &[ValueSpec],
    probe: &[String],
    run: &Probe<'_>,
) -> Option<HashMap<String, Tensor>> {
    let mut m = model.clone();
    let g = m.graph.as_mut()?;
    g.output = probe
        .iter()
        .map(|name| ValueInfoProto {
            name: Some(name.clone()),
            ..Default::default()
        })
        .collect();
    // Declared as int64, so the engine hands them back as such.
    for o in &mut g.output {
        o.r#type = Some(crate::onnx::proto::TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DType::I64.onnx_code()),
                shape: None,
            })),
            ..Default::default()
        });
    }
    let feeds: Vec<(String, Tensor)> = inputs
        .iter()
        .map(|spec| {
            let dims: Vec<usize> = spec
                .shape
                .iter()
                .flatten()
                .map(|d| match d {
                    Dim::Fixed(n) => *n,
                    _ => 1,
                })
                .collect();
            let zeros = Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&dims)));
            let t = match spec.elem_type {
                Some(code) if code != DType::F32.onnx_code() => ops::layout::cast(&zeros, code),
                _ => Ok(zeros),
            };
            t.map(|t| (spec.name.clone(), t))
        })
        .collect::<Result<_, _>>()
        .ok()?;
    let feed_refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let fetch: Vec<&str> = probe.iter().map(String::as_str).collect();
    let got = run(&m, &feed_refs, &fetch)?;
    Some(probe.iter().cloned().zip(got).collect())
}

/// Removes nodes whose outputs nothing reads and the caller does not see,
/// until none is left.
fn remove_dead_nodes(g: &mut crate::onnx::GraphProto, exposed: &HashSet<String>) {
    loop {
        let read: HashSet<String> = g
            .node
            .iter()
            .flat_map(|n| n.input.iter().cloned())
            .chain(g.output.iter().map(|o| o.name().to_string()))
            .chain(exposed.iter().cloned())
            .collect();
        let before = g.node.len();
        g.node
            .retain(|n| n.output.iter().any(|o| !o.is_empty() && read.contains(o)));
        if g.node.len() == before {
            return;
        }
    }
}

/// Folds each constant-mode `Pad` of zeros over the two spatial axes of a
/// 4-D value into the convolutions that alone read it (explicit padding),
/// which then read the Pad's input.
fn fold_pads(model: &ModelProto, exposed: &HashSet<String>) -> Option<ModelProto> {
    let g = model.graph.as_ref()?;
    let index = GraphIndex::new(g).ok()?;
    let opset = opset(model);
    let constant = |name: &str| -> Option<Tensor> {
        let k = index.initializer(name)?;
        crate::onnx::to_tensor(&g.initializer[k]).ok()
    };
    let mut plan: Vec<(usize, [i64; 4])> = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        if n.op_type() != "Pad" || !(n.domain().is_empty() || n.domain() == "ai.onnx") {
            continue;
        }
        let attrs = ops::layout::PadAttributes::of(n);
        let mode_ok = attrs.constant;
        let pads = if opset < 11 {
            attrs.pads.clone()
        } else {
            n.input
                .get(1)
                .and_then(|p| constant(p))
                .and_then(|t| ops::ints_of(&t).ok())
        };
        let zero_value = match n.input.get(2).filter(|v| !v.is_empty()) {
            None => opset >= 11 || attrs.value == 0.0,
            Some(v) => constant(v).is_some_and(|t| t.len() == 1 && t.to_f64_vec()[0] == 0.0),
        };
        let (Some(out), Some(src)) = (n.output.first(), n.input.first()) else {
            continue;
        };
        if src.is_empty() {
            continue;
        }
        let readers = index.consumers(out);
        let convs_only = !readers.is_empty()
            && readers.iter().all(|&c| {
                let r = &g.node[c];
                r.op_type() == "Conv"
                    && r.input.first() == Some(out)
                    && Window::auto_pad(r) == AutoPad::NotSet
                    && Window::pads_as_written(r)
                        .is_none_or(|p| p.len() == 4 && p.iter().all(|&v| v >= 0))
            });
        match pads {
            Some(p)
                if mode_ok
                    && zero_value
                    && n.input.len() <= 3
                    && convs_only
                    && !exposed.contains(out)
                    && p.len() == 8
                    && p.iter().all(|&v| v >= 0)
                    && p[0] == 0
                    && p[1] == 0
                    && p[4] == 0
                    && p[5] == 0 =>
            {
                plan.push((i, [p[2], p[3], p[6], p[7]]));
            }
            _ => {}
        }
    }
    if plan.is_empty() {
        return None;
    }
    let mut m = model.clone();
    let graph = m.graph.as_mut()?;
    let mut drop = HashSet::new();
    for (i, extra) in plan {
        let (src, out) = (
            graph.node[i].input[0].clone(),
            graph.node[i].output[0].clone(),
        );
        for &c in index.consumers(&out) {
            let conv = &mut graph.node[c];
            let mut pads = Window::pads_as_written(conv).unwrap_or(vec![0; 4]);
            for (p, e) in pads.iter_mut().zip(extra) {
                *p += e;
            }
            Window::set_pads(conv, &pads);
            conv.input[0] = src.clone();
        }
        drop.insert(i);
    }
    let mut k = 0;
    graph.node.retain(|_| {
        k += 1;
        !drop.contains(&(k - 1))
    });
    Some(m)
}
