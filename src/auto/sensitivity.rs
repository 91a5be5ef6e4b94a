//! Per-layer sensitivity: each quantized layer replayed alone on its float
//! input (fed straight into the quantized model through the engine's taps),
//! its output compared with the float layer's. No full re-run per layer.

use crate::data::Dataset;
use crate::onnx::ModelProto;
use crate::quant::emit::{LayerFactors, simulation_model};
use crate::quant::error::QuantError;
use crate::sim::{Executor, SessionOptions};
use crate::similarity::Similarity;
use crate::tensor::Tensor;
use serde::Serialize;

/// How much quantizing one layer changes its output.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSensitivity {
    /// The layer.
    pub name: String,
    /// Its operator.
    pub op_type: String,
    /// Cosine similarity of its quantized output with the float one, on its float input.
    pub cosine: f64,
    /// AMCT's score `0.5 + 0.5 * cosine` in [0, 1]; lower is more sensitive.
    pub similarity: f64,
}

/// Sensitivities of every layer in `factors`, measured on up to `samples`
/// samples of `data`, worst first.
pub fn layer_sensitivities(
    executor: &dyn Executor,
    prepared: &ModelProto,
    factors: &[LayerFactors],
    data: &Dataset,
    batch_size: usize,
    dynamic_batch: bool,
    samples: usize,
) -> Result<Vec<LayerSensitivity>, QuantError> {
    let mut keep: Vec<String> = factors
        .iter()
        .flat_map(|f| {
            [f.layer.act_input.clone(), f.layer.output.clone()]
                .into_iter()
                .chain(f.layer.second_input.clone())
        })
        .collect();
    keep.sort();
    keep.dedup();
    let opts = SessionOptions {
        keep: keep.clone(),
        dynamic_batch,
        optimize: true,
    };
    let float = executor.prepare(prepared, &opts)?;
    let quant = executor.prepare(&simulation_model(prepared, factors)?, &opts)?;
    let fetch: Vec<&str> = keep.iter().map(String::as_str).collect();
    let mut acc = vec![Similarity::default(); factors.len()];
    let mut seen = 0;
    for b in 0..data.batch_count(batch_size) {
        if seen >= samples {
            break;
        }
        let batch = data.batch(batch_size, b)?;
        seen += batch.first().map(|(_, t)| t.shape()[0]).unwrap_or(0);
        let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let values = float.run(&feeds, &fetch)?;
        let value = |name: &str| &values[keep.iter().position(|k| k == name).expect("kept")];
        for (f, a) in factors.iter().zip(acc.iter_mut()) {
            // A two-input MatMul replays on both its float inputs.
            let mut feeds = vec![(f.layer.act_input.as_str(), value(&f.layer.act_input))];
            if let Some(second) = &f.layer.second_input {
                feeds.push((second.as_str(), value(second)));
            }
            let replayed = quant.run(&feeds, &[f.layer.output.as_str()])?;
            if let (Some(x), Some(y)) = (value(&f.layer.output).as_f32(), replayed[0].as_f32()) {
                a.add(x.iter(), y.iter());
            }
        }
    }
    let mut out: Vec<LayerSensitivity> = factors
        .iter()
        .zip(acc)
        .map(|(f, a)| {
            let cosine = a.cosine();
            LayerSensitivity {
                name: f.layer.name.clone(),
                op_type: f.layer.op_type.clone(),
                cosine,
                similarity: 0.5 + 0.5 * cosine,
            }
        })
        .collect();
    out.sort_by(|a, b| a.similarity.total_cmp(&b.similarity));
    Ok(out)
}
