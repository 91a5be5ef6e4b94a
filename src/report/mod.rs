//! Reports of a quantization run: the JSON written next to the models and
//! the summary table printed for people.

pub mod analyze;
pub mod calibration_page;
pub mod compare;
pub mod html;
pub mod metric;

use crate::quant::layers::LayerCandidate;
use crate::quant::weights::NuqSummary;
use serde::Serialize;
use std::io::Write;

/// One quantized layer in the report.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// The layer (node) name.
    pub name: String,
    /// Its operator.
    pub op_type: String,
    /// The activation calibrator.
    pub act_algo: String,
    /// Whether activations are asymmetric.
    pub asymmetric: bool,
    /// Activation scale.
    pub scale_d: f32,
    /// Activation offset.
    pub offset_d: i32,
    /// Weight scales (one, or one per output channel).
    pub scale_w: Vec<f32>,
    /// Cosine similarity of the layer's output, float vs fake-quant, on the
    /// first `similarity_samples` calibration samples (null when not measured).
    pub cosine: f64,
    /// NUQ's levels and compression figures, when NUQ was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nuq: Option<NuqSummary>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct QuantReport {
    /// The input model.
    pub model: String,
    /// Files written.
    pub outputs: Vec<String>,
    /// Calibration batches used.
    pub batches: usize,
    /// Samples per batch.
    pub batch_size: usize,
    /// Where the statistics were computed ("cpu simulator" or "npu (SoC, device)").
    pub backend: String,
    /// Calibration samples the similarity was measured on.
    pub similarity_samples: usize,
    /// Conv layers that absorbed a BatchNormalization.
    pub fused_batch_norms: Vec<String>,
    /// Quantized layers, in graph order.
    pub layers: Vec<LayerReport>,
    /// Tensor quantizations (`NODE:INPUT_INDEX`, no weight scales).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tensor_quantize: Vec<LayerReport>,
    /// Candidate layers left in float, with the reason.
    pub skipped: Vec<LayerCandidate>,
    /// AdaRound per layer (output MSE with nearest and learned rounding on the sampled positions).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub adaround: Vec<crate::quant::adaround::AdaReport>,
    /// Bias correction per layer (mean absolute per-channel output error before and after).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bias_correction: Vec<crate::quant::bias_correction::BiasCorrection>,
    /// Seconds the run took.
    pub seconds: f64,
    /// Seconds spent observing activations, building the models, and measuring similarity.
    pub phase_seconds: [f64; 3],
}

/// Bytes an entropy coder needs for the weights of the NUQ layers, uniform
/// and after NUQ (None when no layer took NUQ).
pub fn nuq_bytes(layers: &[LayerReport]) -> Option<(f64, f64)> {
    let taken: Vec<&NuqSummary> = layers
        .iter()
        .filter_map(|l| l.nuq.as_ref())
        .filter(|n| n.note.is_none() && n.weights > 0)
        .collect();
    if taken.is_empty() {
        return None;
    }
    let bytes = |i: usize| -> f64 {
        taken
            .iter()
            .map(|n| n.weights as f64 * n.bits_per_weight[i] / 8.0)
            .sum()
    };
    Some((bytes(0), bytes(1)))
}

/// `n` and the noun, singular or plural: "1 batch", "2 batches".
pub fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A cosine for a table: "-" when none was measured (NaN).
fn cosine_cell(c: f64) -> String {
    if c.is_nan() {
        "-".into()
    } else {
        format!("{c:.5}")
    }
}

impl QuantReport {
    /// Writes the summary table.
    pub fn print_table(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:<36} {:<14} {:<10} {:>12} {:>7} {:>10} {:>9}",
            "layer", "op", "algo", "scale_d", "offset", "scale_w", "cosine"
        )?;
        for l in self.layers.iter().chain(&self.tensor_quantize) {
            let sw = match l.scale_w.len() {
                0 => "-".to_string(),
                1 => format!("{:.3e}", l.scale_w[0]),
                n => format!("{n} ch"),
            };
            writeln!(
                out,
                "{:<36} {:<14} {:<10} {:>12.5e} {:>7} {:>10} {:>9}",
                l.name,
                l.op_type,
                l.act_algo,
                l.scale_d,
                l.offset_d,
                sw,
                cosine_cell(l.cosine)
            )?;
        }
        let nuq: Vec<(&str, &NuqSummary)> = self
            .layers
            .iter()
            .filter_map(|l| l.nuq.as_ref().map(|n| (l.name.as_str(), n)))
            .collect();
        for (name, n) in &nuq {
            match &n.note {
                Some(note) => writeln!(out, "{name:<36} NUQ: {note}")?,
                None => writeln!(
                    out,
                    "{name:<36} NUQ: {} levels used of {}, {:.2} -> {:.2} bits/weight{}",
                    n.distinct[1],
                    n.distinct[0],
                    n.bits_per_weight[0],
                    n.bits_per_weight[1],
                    n.output_error
                        .map(|[u, a]| format!(
                            ", output error {:.3}% -> {:.3}% of the output energy",
                            100.0 * u,
                            100.0 * a
                        ))
                        .unwrap_or_default()
                )?,
            }
        }
        if !self.adaround.is_empty() {
            let (n, l): (f32, f32) = self.adaround.iter().fold((0.0, 0.0), |(a, b), r| {
                (a + r.output_mse[0], b + r.output_mse[1])
            });
            writeln!(
                out,
                "AdaRound: {}, summed layer output MSE {n:.4e} (nearest) -> {l:.4e} (learned), {} flipped",
                counted(self.adaround.len(), "layer", "layers"),
                counted(
                    self.adaround.iter().map(|r| r.flipped).sum::<usize>(),
                    "weight",
                    "weights"
                )
            )?;
        }
        if !self.bias_correction.is_empty() {
            let mean = |f: fn(&crate::quant::bias_correction::BiasCorrection) -> f64| {
                self.bias_correction.iter().map(f).sum::<f64>() / self.bias_correction.len() as f64
            };
            writeln!(
                out,
                "bias correction: {}, mean output error per channel {:.4e} -> {:.4e}",
                counted(self.bias_correction.len(), "layer", "layers"),
                mean(|b| b.mean_error_before),
                mean(|b| b.mean_error_after)
            )?;
        }
        if let Some((before, after)) = nuq_bytes(&self.layers) {
            writeln!(
                out,
                "NUQ weights at their entropy: {:.1} KiB uniform -> {:.1} KiB ({:.1}% smaller)",
                before / 1024.0,
                after / 1024.0,
                100.0 * (1.0 - after / before)
            )?;
        }
        for s in &self.skipped {
            writeln!(
                out,
                "{:<36} {:<14} kept in float: {}",
                s.node,
                s.op_type,
                s.note.as_deref().unwrap_or("")
            )?;
        }
        writeln!(
            out,
            "{} quantized, {} kept in float, {} x {}, {:.2} s \
             (observing {:.2} s, building {:.2} s, similarity {:.2} s)",
            counted(self.layers.len(), "layer", "layers"),
            self.skipped.len(),
            counted(self.batches, "batch", "batches"),
            counted(self.batch_size, "sample", "samples"),
            self.seconds,
            self.phase_seconds[0],
            self.phase_seconds[1],
            self.phase_seconds[2]
        )?;
        for o in &self.outputs {
            writeln!(out, "wrote {o}")?;
        }
        Ok(())
    }
}
