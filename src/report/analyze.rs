//! Where the quantization error comes from (`compare --analyze`): every
//! layer quantized alone, its activation and its weight separately, and the
//! error each one causes in the model's outputs; plus every layer's input
//! histogram with the range its quantization keeps.

use crate::data::Dataset;
use crate::onnx::{ModelProto, graph_of};
use crate::quant::calibrate::RunSettings;
use crate::quant::emit::{LayerFactors, simulation_model, weight_only_model};
use crate::quant::error::QuantError;
use crate::quant::observe::finite_extremes;
use crate::quant::observe::histogram::Histogram;
use crate::sim::{Executor, SessionOptions};
use crate::similarity::Similarity;
use crate::tensor::Tensor;
use serde::Serialize;

/// How far a model's outputs are from the float model's.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct OutputError {
    /// Cosine similarity of all outputs, concatenated.
    pub cosine: f64,
    /// Mean squared difference.
    pub mse: f64,
}

impl OutputError {
    fn of(s: &Similarity) -> OutputError {
        OutputError {
            cosine: s.cosine(),
            mse: s.mse(),
        }
    }
}

/// One layer's share of the error.
#[derive(Clone, Debug, Serialize)]
pub struct LayerContribution {
    /// The layer.
    pub name: String,
    /// Its operator.
    pub op_type: String,
    /// The values it quantizes: its input, and a two-input MatMul's second
    /// input (whose error counts as the activation's).
    pub inputs: Vec<String>,
    /// The outputs' error with only this layer's input activation quantized.
    pub activation: OutputError,
    /// The outputs' error with only this layer's weight (and bias) quantized;
    /// `None` for layers without a weight.
    pub weight: Option<OutputError>,
}

impl LayerContribution {
    /// The larger of the two errors (MSE), for ranking.
    pub fn worst_mse(&self) -> f64 {
        self.activation.mse.max(self.weight.map_or(0.0, |w| w.mse))
    }
}

/// A layer's float input distribution and the range its quantization keeps.
#[derive(Clone, Debug, Serialize)]
pub struct InputHistogram {
    /// The layer.
    pub layer: String,
    /// Lower edge.
    pub lo: f32,
    /// Upper edge.
    pub hi: f32,
    /// Counts per bin.
    pub counts: Vec<f64>,
    /// The representable range `[(−128 − offset)·s, (127 − offset)·s]`.
    pub clip: (f32, f32),
    /// Fraction of the values outside the range (clipped).
    pub clipped: f64,
}

/// The whole analysis.
#[derive(Clone, Debug, Serialize)]
pub struct Analysis {
    /// Samples the errors were measured on.
    pub samples: usize,
    /// The error with every layer quantized (for scale).
    pub all_layers: OutputError,
    /// Per layer, the worst contribution first.
    pub layers: Vec<LayerContribution>,
    /// Per layer, in graph order.
    pub histograms: Vec<InputHistogram>,
}

/// Analyses `factors` (of `prepared`, the float model as calibration
/// prepared it) on the first `run.similarity_samples` samples of `data`
/// (batches of `run.batch_size`); `run.progress` hears of each layer.
pub fn analyze(
    executor: &dyn Executor,
    prepared: &ModelProto,
    factors: &[LayerFactors],
    data: &Dataset,
    run: &RunSettings,
) -> Result<Analysis, QuantError> {
    let (batch_size, dynamic_batch, samples) =
        (run.batch_size, run.dynamic_batch, run.similarity_samples);
    let g = graph_of(prepared, "the float model")?;
    let outputs: Vec<String> = g.output.iter().map(|o| o.name().to_string()).collect();
    let out_refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    let batches = data
        .batch_count(batch_size)
        .min(samples.div_ceil(batch_size.max(1)))
        .max(1);
    let opts = |keep: Vec<String>| SessionOptions {
        keep,
        dynamic_batch,
        optimize: true,
    };
    // The float pass: reference outputs (kept: `samples` rows at most) and input histograms.
    let inputs: Vec<String> = factors.iter().map(|f| f.layer.act_input.clone()).collect();
    let mut keep = outputs.clone();
    keep.extend(inputs.iter().cloned());
    keep.sort();
    keep.dedup();
    let float = executor.prepare(prepared, &opts(keep.clone()))?;
    let fetch: Vec<&str> = keep.iter().map(String::as_str).collect();
    let mut reference: Vec<Vec<Tensor>> = Vec::new();
    let mut hists: Vec<Histogram> = factors.iter().map(|_| Histogram::aligned(64)).collect();
    let mut clipped = vec![(0u64, 0u64); factors.len()];
    let mut seen = 0;
    for b in 0..batches {
        let batch = data.batch(batch_size, b)?;
        seen += batch.first().map_or(0, |(_, t)| t.shape()[0]);
        let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let values = float.run(&feeds, &fetch)?;
        let value = |name: &str| &values[keep.iter().position(|k| k == name).expect("kept")];
        for (k, f) in factors.iter().enumerate() {
            if let Some(slice) = value(&f.layer.act_input)
                .as_f32()
                .and_then(|a| a.as_slice())
                && let Ok((mn, mx)) = finite_extremes(slice)
            {
                hists[k].add(slice, mn, mx);
                let (lo, hi) = f.act.range(8);
                clipped[k].0 += slice.iter().filter(|&&v| v < lo || v > hi).count() as u64;
                clipped[k].1 += slice.len() as u64;
            }
        }
        reference.push(outputs.iter().map(|o| value(o).clone()).collect());
    }
    let score = |model: &ModelProto| -> Result<OutputError, QuantError> {
        let s = executor.prepare(model, &opts(outputs.clone()))?;
        let mut acc = Similarity::default();
        for (b, reference) in reference.iter().enumerate() {
            let batch = data.batch(batch_size, b)?;
            let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
            for (r, q) in reference.iter().zip(s.run(&feeds, &out_refs)?) {
                if let (Some(r), Some(q)) = (r.as_f32(), q.as_f32()) {
                    acc.add(r.iter(), q.iter());
                }
            }
        }
        Ok(OutputError::of(&acc))
    };
    let all_layers = score(&simulation_model(prepared, factors)?)?;
    let total = factors.len();
    let mut layers = Vec::with_capacity(total);
    for (k, f) in factors.iter().enumerate() {
        let act_only = LayerFactors {
            weight_q: None,
            bias_q: None,
            ..f.clone()
        };
        let activation = score(&simulation_model(prepared, &[act_only])?)?;
        let weight = match f.weight_q {
            Some(_) => Some(score(&weight_only_model(
                prepared,
                std::slice::from_ref(f),
            )?)?),
            None => None,
        };
        layers.push(LayerContribution {
            name: f.layer.name.clone(),
            op_type: f.layer.op_type.clone(),
            inputs: std::iter::once(f.layer.act_input.clone())
                .chain(f.layer.second_input.clone())
                .collect(),
            activation,
            weight,
        });
        (run.progress)(k + 1, total);
    }
    layers.sort_by(|a, b| b.worst_mse().total_cmp(&a.worst_mse()));
    let histograms = factors
        .iter()
        .zip(hists)
        .zip(clipped)
        .map(|((f, h), (out, n))| InputHistogram {
            layer: f.layer.name.clone(),
            lo: h.lo(),
            hi: h.hi(),
            counts: h.counts().to_vec(),
            clip: f.act.range(8),
            clipped: out as f64 / n.max(1) as f64,
        })
        .collect();
    Ok(Analysis {
        samples: seen,
        all_layers,
        layers,
        histograms,
    })
}
