//! Empirical bias correction: quantized layers shift their outputs' mean
//! (rounded weights, clipped inputs). Over the calibration data, layer by
//! layer in graph order and with the quantized (and already corrected)
//! layers upstream, the mean output error of each layer is measured per
//! output channel and taken off its int32 bias, in units of the layer's
//! dequantization scale. `docs/algorithms.md` (Bias correction).
//!
//! The order matters: a layer's error includes what its inputs inherited
//! from upstream, so correcting every layer at once from one pass counts the
//! upstream shifts twice and diverges on deep networks (measured on
//! MobileNetV2: the mean error grew 30-fold). Each layer therefore gets a
//! pass of its own; the engine computes only what that layer's output
//! needs, so the passes cost about half the layer count in full passes.

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
    /// Mean absolute per-channel output error before any correction.
    pub mean_error_before: f64,
    /// The same after every correction.
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
/// batches, layer by layer; returns each corrected layer's error before and after.
pub fn correct_biases(
    executor: &dyn Executor,
    prepared: &ModelProto,
    factors: &mut [LayerFactors],
    data: &Dataset,
    run: &RunSettings,
    batches: usize,
) -> Result<Vec<BiasCorrection>, QuantError> {
    let targets: Vec<usize> = (0..factors.len())
        .filter(|&i| factors[i].bias_q.is_some())
        .collect();
    if targets.is_empty() {
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
    let means_of = |session: &dyn crate::sim::Session,
                    fetch: &[&str],
                    channels: &[usize]|
     -> Result<Vec<Vec<f64>>, QuantError> {
        let mut sums: Vec<Vec<f64>> = channels.iter().map(|&c| vec![0.0; c]).collect();
        let mut counts: Vec<Vec<u64>> = channels.iter().map(|&c| vec![0; c]).collect();
        for b in 0..batches {
            let batch = data.batch(run.batch_size, b)?;
            let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
            for (k, v) in session.run(&feeds, fetch)?.iter().enumerate() {
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
    let means =
        |session: &dyn crate::sim::Session, fetch: &[&str]| means_of(session, fetch, &channels);
    let reference = means(float.as_ref(), &fetch)?;
    // The error of every layer before any correction, for the report.
    let before = {
        let model = simulation_model(prepared, factors)?;
        means(executor.prepare(&model, &opts)?.as_ref(), &fetch)?
    };
    for (k, &i) in targets.iter().enumerate() {
        let model = simulation_model(prepared, factors)?;
        let one = SessionOptions {
            keep: vec![outputs[k].clone()],
            ..opts.clone()
        };
        let session = executor.prepare(&model, &one)?;
        let quantized = means_of(session.as_ref(), &[fetch[k]], &[channels[k]])?;
        let f = &mut factors[i];
        let deq = f.deq_scales();
        let bias = f.bias_q.as_mut().expect("targets have a bias");
        for (c, b) in bias.iter_mut().enumerate() {
            let error = quantized[0][c] - reference[k][c];
            let step = f64::from(deq[if deq.len() == 1 { 0 } else { c }]);
            let shift = (error / step).round();
            if shift.is_finite() {
                *b = (i64::from(*b) - shift as i64).clamp(i64::from(i32::MIN), i64::from(i32::MAX))
                    as i32;
            }
        }
    }
    let after = {
        let model = simulation_model(prepared, factors)?;
        means(executor.prepare(&model, &opts)?.as_ref(), &fetch)?
    };
    let mean_abs = |m: &[Vec<f64>], k: usize| {
        m[k].iter()
            .zip(&reference[k])
            .map(|(q, r)| (q - r).abs())
            .sum::<f64>()
            / m[k].len().max(1) as f64
    };
    let first: Vec<f64> = (0..targets.len()).map(|k| mean_abs(&before, k)).collect();
    let last: Vec<f64> = (0..targets.len()).map(|k| mean_abs(&after, k)).collect();

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
