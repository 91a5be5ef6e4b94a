//! Running a batch one sample at a time: the fallback of a dynamic-batch
//! session when the whole batch fails (a model exported for batch 1 with a
//! Reshape to `[1, -1]` runs every sample as it was made to).

use super::error::SimError;
use crate::onnx::ValueSpec;
use crate::tensor::Tensor;

/// One run of a session on some feeds.
pub type RunOnce<'a> = dyn Fn(&[(&str, &Tensor)], &[&str]) -> Result<Vec<Tensor>, SimError> + 'a;

/// Runs the batch one sample at a time and joins the results along axis 0;
/// an error when the batch holds one sample (nothing to split).
pub fn run_per_sample(
    inputs: &[ValueSpec],
    feeds: &[(&str, &Tensor)],
    fetch: &[&str],
    run_once: &RunOnce<'_>,
) -> Result<Vec<Tensor>, SimError> {
    let samples = feeds
        .iter()
        .filter(|(name, _)| inputs.iter().any(|s| s.name == *name))
        .map(|(_, t)| t.shape().first().copied().unwrap_or(1))
        .max()
        .unwrap_or(1);
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
                let batched =
                    inputs.iter().any(|s| s.name == *name) && t.shape().first() == Some(&samples);
                (
                    *name,
                    if batched {
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
