//! How a session treats the batch axis, and running a batch one sample at a
//! time: what a model exported for batch 1 needs when its graph bakes that
//! batch in (a `Reshape` to the constant `[1, -1]` before a classifier, as
//! EfficientNet-Lite's export has), so it computes every sample as it was
//! made to. Both engines run batches through [`run_batch`].

use super::SessionOptions;
use super::error::SimError;
use crate::onnx::graph::{constant_ints, constant_tensor};
use crate::onnx::{Dim, ModelProto, ValueSpec};
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
        match (opts.dynamic_batch, baked_batch(model).is_some()) {
            (false, _) => BatchMode::Declared,
            (true, false) => BatchMode::Free,
            (true, true) => BatchMode::PerSample,
        }
    }

    /// Whether fed batches may differ from the declared one.
    pub fn is_free(self) -> bool {
        self != BatchMode::Declared
    }

    /// The mode for an engine whose operators cost more per sample on a
    /// batch than one sample at a time: a free batch runs sample by sample.
    /// The native engine allocates each operator's output, and at batch 36
    /// those are megabytes each: `run` of 36 MobileNetV2 images took 10.3 ms
    /// per image (0.31 s of system time, 332 MB) as one batch against 5.25 ms
    /// (97 MB) one at a time, where one image alone takes 4.33 ms in process.
    pub fn sample_by_sample(self) -> BatchMode {
        match self {
            BatchMode::Free => BatchMode::PerSample,
            other => other,
        }
    }
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
    g.node
        .iter()
        .any(|n| {
            n.op_type() == "Reshape"
                && n.input
                    .first()
                    .is_some_and(|x| constant_tensor(g, x).is_none())
                && constant_ints(g, n, 1).and_then(|s| s.first().copied()) == Some(batch)
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
    let mut joined: Vec<Joined> = (0..fetch.len()).map(|_| Joined::default()).collect();
    let split: Vec<bool> = feeds
        .iter()
        .map(|(name, t)| {
            inputs.iter().any(|s| s.name == *name && batched(s))
                && t.shape().first() == Some(&samples)
        })
        .collect();
    for i in 0..samples {
        // Only the batched inputs are sliced; the others are fed as they are.
        let slices: Vec<Option<Tensor>> = feeds
            .iter()
            .zip(&split)
            .map(|((_, t), &s)| s.then(|| t.slice_axis0(i..i + 1)))
            .collect();
        let refs: Vec<(&str, &Tensor)> = feeds
            .iter()
            .zip(&slices)
            .map(|((name, t), slice)| (*name, slice.as_ref().unwrap_or(t)))
            .collect();
        for (k, v) in run_once(&refs, fetch)?.into_iter().enumerate() {
            joined[k].push(v, samples);
        }
    }
    joined
        .into_iter()
        .zip(fetch)
        .map(|(j, name)| {
            j.finish().ok_or_else(|| SimError::Run {
                reason: format!("the per-sample values of '{name}' cannot be joined"),
            })
        })
        .collect()
}

/// One fetched value's samples, joined along axis 0 as they arrive: float32
/// values in standard layout go straight into one buffer sized for every
/// sample (so a run holds each value once, not its parts and then their
/// join); anything else is kept as parts and joined at the end.
#[derive(Default)]
enum Joined {
    #[default]
    Empty,
    F32 {
        data: Vec<f32>,
        shape: Vec<usize>,
    },
    Parts(Vec<Tensor>),
}

impl Joined {
    fn push(&mut self, value: Tensor, samples: usize) {
        let taken = std::mem::take(self);
        *self = match (taken, value) {
            (Joined::Empty, Tensor::F32(a)) if a.is_standard_layout() && a.ndim() > 0 => {
                let mut data = Vec::with_capacity(a.len().saturating_mul(samples));
                data.extend_from_slice(a.as_slice().unwrap_or_default());
                Joined::F32 {
                    data,
                    shape: a.shape().to_vec(),
                }
            }
            (
                Joined::F32 {
                    mut data,
                    mut shape,
                },
                Tensor::F32(a),
            ) if a.is_standard_layout() && a.ndim() > 0 && a.shape()[1..] == shape[1..] => {
                data.extend_from_slice(a.as_slice().unwrap_or_default());
                shape[0] += a.shape()[0];
                Joined::F32 { data, shape }
            }
            (Joined::Empty, v) => Joined::Parts(vec![v]),
            (Joined::Parts(mut parts), v) => {
                parts.push(v);
                Joined::Parts(parts)
            }
            (joined @ Joined::F32 { .. }, v) => {
                let first = joined.finish().expect("a float32 buffer of its own shape");
                Joined::Parts(vec![first, v])
            }
        };
    }

    fn finish(self) -> Option<Tensor> {
        match self {
            Joined::Empty => None,
            Joined::F32 { data, shape } => ndarray::ArrayD::from_shape_vec(shape, data)
                .ok()
                .map(Tensor::F32),
            Joined::Parts(parts) => Tensor::concat_axis0(&parts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn f32s(shape: &[usize], first: f32) -> Tensor {
        let n = shape.iter().product();
        let v = (0..n).map(|i| first + i as f32).collect();
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
    }

    #[test]
    fn samples_join_in_order_as_ndarray_would() {
        let parts = [f32s(&[1, 2], 0.0), f32s(&[1, 2], 10.0), f32s(&[2, 2], 20.0)];
        let mut j = Joined::default();
        for p in &parts {
            j.push(p.clone(), 3);
        }
        assert_eq!(j.finish(), Tensor::concat_axis0(&parts));
        // Other element types are joined at the end, the same way.
        let ints: Vec<Tensor> = (0..3)
            .map(|i| Tensor::I64(ArrayD::from_elem(IxDyn(&[1, 2]), i)))
            .collect();
        let mut j = Joined::default();
        for p in &ints {
            j.push(p.clone(), 3);
        }
        assert_eq!(j.finish(), Tensor::concat_axis0(&ints));
    }

    #[test]
    fn samples_that_cannot_be_joined_say_so() {
        for second in [
            f32s(&[1, 3], 0.0),
            Tensor::I64(ArrayD::zeros(IxDyn(&[1, 2]))),
        ] {
            let mut j = Joined::default();
            j.push(f32s(&[1, 2], 0.0), 2);
            j.push(second, 2);
            assert_eq!(j.finish(), None);
        }
    }
}
