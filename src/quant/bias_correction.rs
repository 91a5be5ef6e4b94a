//! Empirical bias correction: quantized layers shift their outputs' mean
//! (rounded weights, clipped inputs). Over the calibration data, with the
//! quantized model upstream, the mean output error of each layer is measured
//! per output channel and taken off its int32 bias, in units of the layer's
//! dequantization scale. `docs/algorithms.md` (Bias correction) describes it.
//!
//! The correction of a layer changes what the layers after it see, so the
//! spec's order is layer by layer. Running the model once per layer costs a
//! pass per layer (53 on MobileNetV2); instead every layer is corrected at
//! once from one pass with the current corrections, and the passes repeat:
//! after pass `k` every layer within `k` quantized layers of the input is
//! corrected exactly as the sequential order would, and the rest nearly so.

use super::calibrate::RunSettings;
use super::emit::{LayerFactors, simulation_model};
use super::error::QuantError;
use crate::data::Dataset;
use crate::onnx::ModelProto;
use crate::sim::{Executor, SessionOptions};
use crate::tensor::Tensor;

/// What bias correction did to one layer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BiasCorrection {
    /// The layer.
    pub layer: String,
    /// Mean absolute per-channel output error before the correction (the first pass).
    pub mean_error_before: f64,
    /// The same after the corrections (measured by a last pass).
    pub mean_error_after: f64,
}

/// Per-channel sums of `x` (axis 1 of `[N, C, ...]`, or the last axis of a 2-D `[N, C]`).
fn channel_sums(x: &ndarray::ArrayD<f32>, sums: &mut [f64], counts: &mut [u64]) {
    let shape = x.shape();
    if shape.len() < 2 || shape[1] != sums.len() {
        return;
    }
    let c = shape[1];
    let inner: usize = shape[2..].iter().product();
    let Some(data) = x.as_slice() else {
        return;
    };
    for (i, chunk) in data.chunks(inner.max(1)).enumerate() {
        let ch = i % c;
        sums[ch] += chunk.iter().map(|&v| f64::from(v)).sum::<f64>();
        counts[ch] += chunk.len() as u64;
    }
}

/// Corrects the int32 biases of `factors` in place over `batches` calibration
/// batches, in `passes` passes; returns what each corrected layer gained.
pub fn correct_biases(
    executor: &dyn Executor,
    prepared: &ModelProto,
    factors: &mut [LayerFactors],
    data: &Dataset,
    run: &RunSettings,
    batches: usize,
    passes: usize,
) -> Result<Vec<BiasCorrection>, QuantError> {
    let targets: Vec<usize> = (0..factors.len())
        .filter(|&i| factors[i].bias_q.is_some())
        .collect();
    if targets.is_empty() || passes == 0 {
        return Ok(Vec::new());
    }
    let outputs: Vec<String> = targets
        .iter()
        .map(|&i| factors[i].layer.output.clone())
        .collect();
    let fetch: Vec<&str> = outputs.iter().map(String::as_str).collect();
    let opts = SessionOptions {
        keep: outputs.clone(),
        dynamic_batch: run.dynamic_batch,
        optimize: true,
    };
    let channels: Vec<usize> = targets
        .iter()
        .map(|&i| factors[i].bias_q.as_ref().map_or(0, Vec::len))
        .collect();
    // Float means per channel, once.
    let float = executor.prepare(prepared, &opts)?;
    let means = |session: &dyn crate::sim::Session| -> Result<Vec<Vec<f64>>, QuantError> {
        let mut sums: Vec<Vec<f64>> = channels.iter().map(|&c| vec![0.0; c]).collect();
        let mut counts: Vec<Vec<u64>> = channels.iter().map(|&c| vec![0; c]).collect();
        for b in 0..batches {
            let batch = data.batch(run.batch_size, b)?;
            let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
            for (k, v) in session.run(&feeds, &fetch)?.iter().enumerate() {
                if let Some(a) = v.as_f32() {
                    channel_sums(a, &mut sums[k], &mut counts[k]);
                }
            }
        }
        Ok(sums
            .into_iter()
            .zip(counts)
            .map(|(s, n)| {
                s.iter()
                    .zip(&n)
                    .map(|(s, &n)| s / n.max(1) as f64)
                    .collect()
            })
            .collect())
    };
    let reference = means(float.as_ref())?;
    let mut first: Option<Vec<f64>> = None;
    let mut last = Vec::new();
    // `passes` corrections, then one more pass that only measures.
    for pass in 0..=passes {
        let model = simulation_model(prepared, factors)?;
        let session = executor.prepare(&model, &opts)?;
        let quantized = means(session.as_ref())?;
        let mut errors = Vec::with_capacity(targets.len());
        for (k, &i) in targets.iter().enumerate() {
            let f = &mut factors[i];
            let deq = f.deq_scales();
            let bias = f.bias_q.as_mut().expect("targets have a bias");
            let mut total = 0.0;
            for (c, b) in bias.iter_mut().enumerate() {
                let error = quantized[k][c] - reference[k][c];
                total += error.abs();
                let step = f64::from(deq[if deq.len() == 1 { 0 } else { c }]);
                let shift = (error / step).round();
                if pass < passes && shift.is_finite() {
                    *b = (i64::from(*b) - shift as i64)
                        .clamp(i64::from(i32::MIN), i64::from(i32::MAX))
                        as i32;
                }
            }
            errors.push(total / bias.len().max(1) as f64);
        }
        if first.is_none() {
            first = Some(errors.clone());
        }
        last = errors;
    }
    let first = first.unwrap_or_default();
    Ok(targets
        .iter()
        .enumerate()
        .map(|(k, &i)| BiasCorrection {
            layer: factors[i].layer.name.clone(),
            mean_error_before: first[k],
            mean_error_after: last[k],
        })
        .collect())
}
