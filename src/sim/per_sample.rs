//! How a session treats the batch axis, and running a batch one sample at a
//! time: what a model exported for batch 1 needs when its graph bakes that
//! batch in (a `Reshape` to the constant `[1, -1]` before a classifier, as
//! EfficientNet-Lite's export has), so it computes every sample as it was
//! made to. Both engines run batches through [`run_batch`].

use super::SessionOptions;
use super::error::SimError;
use crate::onnx::graph::initializer;
use crate::onnx::{Dim, ModelProto, ValueSpec, to_tensor};
use crate::tensor::Tensor;

/// How a session runs a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchMode {
    /// The batch the model declares, as one run.
    Declared,
    /// Any batch as one run; one sample at a time when that run fails.
    Free,
    /// Any batch, always one sample at a time: the graph bakes its batch in.
    PerSample,
}

impl BatchMode {
    /// The mode for `model` prepared with `opts`.
    pub fn of(model: &ModelProto, opts: &SessionOptions) -> BatchMode {
        match (opts.dynamic_batch, bakes_its_batch(model)) {
            (false, _) => BatchMode::Declared,
            (true, false) => BatchMode::Free,
            (true, true) => BatchMode::PerSample,
        }
    }

    /// Whether fed batches may differ from the declared one.
    pub fn is_free(self) -> bool {
        self != BatchMode::Declared
    }
}

/// Whether `model` bakes its batch into its graph ([`baked_batch`]).
fn bakes_its_batch(model: &ModelProto) -> bool {
    baked_batch(model).is_some()
}

/// The batch `b` that `model` declares on its first input, when the graph
/// also holds a `Reshape` of a computed value to a constant shape that starts
/// with `b`: such a graph folds a bigger batch into one row without failing,
/// and any value after it (a layer's input fetched by a pass) is silently
/// wrong. `None` for every other model.
pub fn baked_batch(model: &ModelProto) -> Option<i64> {
    let g = model.graph.as_ref()?;
    let first = super::prepare::feedable_inputs(model).into_iter().next()?;
    let Some(Dim::Fixed(batch)) = first.shape.and_then(|d| d.first().cloned()) else {
        return None;
    };
    let batch = batch as i64;
    let constant_first = |name: &str| -> Option<i64> {
        let t = match initializer(g, name) {
            Some(t) => to_tensor(t).ok()?,
            None => g
                .node
                .iter()
                .find(|n| n.op_type() == "Constant" && n.output.first().is_some_and(|o| o == name))
                .and_then(|n| crate::onnx::attr::find(n, "value")?.t.as_ref())
                .and_then(|t| to_tensor(t).ok())?,
        };
        match t {
            Tensor::I64(a) => a.iter().next().copied(),
            _ => None,
        }
    };
    let computed = |name: &str| initializer(g, name).is_none();
    g.node
        .iter()
        .any(|n| {
            n.op_type() == "Reshape"
                && n.input.first().is_some_and(|x| computed(x))
                && n.input
                    .get(1)
                    .and_then(|s| constant_first(s))
                    .is_some_and(|b| b == batch)
        })
        .then_some(batch)
}

/// One run of a session on some feeds.
pub type RunOnce<'a> = dyn Fn(&[(&str, &Tensor)], &[&str]) -> Result<Vec<Tensor>, SimError> + 'a;

/// Runs `feeds` as `mode` says: whole, or sample by sample.
pub fn run_batch(
    mode: BatchMode,
    inputs: &[ValueSpec],
    feeds: &[(&str, &Tensor)],
    fetch: &[&str],
    run_once: &RunOnce<'_>,
) -> Result<Vec<Tensor>, SimError> {
    if mode == BatchMode::PerSample && samples(inputs, feeds) > 1 {
        return run_per_sample(inputs, feeds, fetch, run_once);
    }
    match run_once(feeds, fetch) {
        Err(SimError::Run { reason }) if mode == BatchMode::Free => {
            run_per_sample(inputs, feeds, fetch, run_once).map_err(|_| SimError::Run { reason })
        }
        other => other,
    }
}

/// Whether `spec` has a batch axis to split: a declared shape whose first
/// axis is free (an input declared without a shape, such as a pass's bias
/// fed whole to every sample, has none).
fn batched(spec: &ValueSpec) -> bool {
    matches!(spec.shape.as_deref(), Some([first, ..]) if !matches!(first, Dim::Fixed(_)))
}

/// The samples in the fed batch: the largest axis 0 of the fed batched inputs.
fn samples(inputs: &[ValueSpec], feeds: &[(&str, &Tensor)]) -> usize {
    feeds
        .iter()
        .filter(|(name, _)| inputs.iter().any(|s| s.name == *name && batched(s)))
        .map(|(_, t)| t.shape().first().copied().unwrap_or(1))
        .max()
        .unwrap_or(1)
}

/// Runs the batch one sample at a time and joins the results along axis 0;
/// an error when the batch holds one sample (nothing to split).
fn run_per_sample(
    inputs: &[ValueSpec],
    feeds: &[(&str, &Tensor)],
    fetch: &[&str],
    run_once: &RunOnce<'_>,
) -> Result<Vec<Tensor>, SimError> {
    let samples = samples(inputs, feeds);
    if samples <= 1 {
        return Err(SimError::Run {
            reason: "one sample".into(),
        });
    }
    let mut parts: Vec<Vec<Tensor>> = vec![Vec::with_capacity(samples); fetch.len()];
    for i in 0..samples {
        let sliced: Vec<(&str, Tensor)> = feeds
            .iter()
            .map(|(name, t)| {
                let split = inputs.iter().any(|s| s.name == *name && batched(s))
                    && t.shape().first() == Some(&samples);
                (
                    *name,
                    if split {
                        t.slice_axis0(i..i + 1)
                    } else {
                        (*t).clone()
                    },
                )
            })
            .collect();
        let refs: Vec<(&str, &Tensor)> = sliced.iter().map(|(n, t)| (*n, t)).collect();
        for (k, v) in run_once(&refs, fetch)?.into_iter().enumerate() {
            parts[k].push(v);
        }
    }
    parts
        .iter()
        .zip(fetch)
        .map(|(p, name)| {
            Tensor::concat_axis0(p).ok_or_else(|| SimError::Run {
                reason: format!("the per-sample values of '{name}' cannot be joined"),
            })
        })
        .collect()
}
