//! `calibrate --html PAGE`: one self-contained page about a calibration —
//! the factors of every layer, its calibrator, a bar chart of per-layer
//! cosine similarity, and each layer's input histogram with the range its
//! quantization keeps (inline SVG; no scripts, no external files).

use super::QuantReport;
use super::compare::ActivationHistogram;
use super::html::{cosine_chart, escape, histogram_svg};
use crate::data::Dataset;
use crate::quant::emit::LayerFactors;
use crate::quant::error::QuantError;
use crate::quant::observe::finite_extremes;
use crate::quant::observe::histogram::Histogram;
use crate::sim::{Executor, SessionOptions};
use crate::tensor::Tensor;
use std::fmt::Write;

/// Histogram bins per layer.
const BINS: usize = 64;

/// Each quantized layer's float input distribution over the first
/// `max_samples` samples of `data` (the model `prepared` is the float model
/// the factors' names refer to), with the range of its activation factors.
pub fn input_histograms(
    executor: &dyn Executor,
    prepared: &crate::onnx::ModelProto,
    factors: &[LayerFactors],
    data: &Dataset,
    (batch_size, dynamic_batch): (usize, bool),
    max_samples: usize,
) -> Result<Vec<ActivationHistogram>, QuantError> {
    let inputs: Vec<String> = factors.iter().map(|f| f.layer.act_input.clone()).collect();
    let mut unique = inputs.clone();
    unique.sort();
    unique.dedup();
    let session = executor.prepare(
        prepared,
        &SessionOptions {
            keep: unique.clone(),
            dynamic_batch,
            optimize: true,
        },
    )?;
    let fetch: Vec<&str> = unique.iter().map(String::as_str).collect();
    let mut hists: Vec<Histogram> = unique.iter().map(|_| Histogram::aligned(BINS)).collect();
    let mut seen = 0;
    for b in 0..data.batch_count(batch_size) {
        if seen >= max_samples {
            break;
        }
        let batch = data.batch(batch_size, b)?;
        seen += batch.first().map_or(0, |(_, t)| t.shape()[0]);
        let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let values = session.run(&feeds, &fetch)?;
        for (h, v) in hists.iter_mut().zip(&values) {
            if let Some(x) = v.as_f32() {
                let x = x.as_standard_layout();
                let slice = x.as_slice().expect("standard layout");
                if let Ok((lo, hi)) = finite_extremes(slice) {
                    h.add(slice, lo, hi);
                }
            }
        }
    }
    Ok(factors
        .iter()
        .zip(&inputs)
        .map(|(f, input)| {
            let h = &hists[unique.iter().position(|u| u == input).expect("listed")];
            ActivationHistogram {
                layer: f.layer.name.clone(),
                lo: h.lo(),
                hi: h.hi(),
                counts: h.counts(),
                clip: Some(f.act.range(8)),
            }
        })
        .collect())
}

/// The page for `report`, with the histograms from [`input_histograms`]
/// (matched to layers by name).
pub fn render(report: &QuantReport, histograms: &[ActivationHistogram]) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>ascend-quant calibration</title>\
<style>body{{font-family:sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;font-size:13px}}\
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}}td:first-child,th:first-child{{text-align:left}}\
.bad{{background:#fde2e2}}h2{{margin-top:28px}}h3{{font-size:14px;margin:18px 0 4px}}</style></head><body>\n\
<h1>Calibration</h1>\n<p>model: <code>{}</code><br>backend: {}<br>{} layers quantized, {} left in float; {} batches of {} samples; {:.2} s</p>\n",
        escape(&report.model),
        escape(&report.backend),
        report.layers.len(),
        report.skipped.len(),
        report.batches,
        report.batch_size,
        report.seconds,
    );
    let measured = report.layers.iter().any(|l| l.cosine.is_finite());
    if measured {
        let _ = writeln!(
            h,
            "<h2>Cosine similarity per layer</h2>\n<p>Each layer's output, float vs fake-quant, on {} calibration samples, in graph order.</p>",
            report.similarity_samples
        );
        let rows: Vec<(&str, f64, bool)> = report
            .layers
            .iter()
            .map(|l| (l.name.as_str(), l.cosine, true))
            .collect();
        h.push_str(&cosine_chart(&rows));
    }
    h.push_str("<h2>Factors</h2>\n<table><tr><th>layer</th><th>op</th><th>calibrator</th><th>activations</th><th>scale_d</th><th>offset_d</th><th>range kept</th><th>weight scales</th><th>cosine</th></tr>\n");
    for l in &report.layers {
        let range = histograms
            .iter()
            .find(|g| g.layer == l.name)
            .and_then(|g| g.clip)
            .map_or(String::new(), |(a, b)| format!("{a:.4} .. {b:.4}"));
        let (wmin, wmax) = l
            .scale_w
            .iter()
            .fold((f32::INFINITY, 0.0f32), |(a, b), &s| (a.min(s), b.max(s)));
        let weights = match l.scale_w.len() {
            0 => String::new(),
            1 => format!("{wmax:.4e}"),
            n => format!("{n} channels, {wmin:.3e} .. {wmax:.3e}"),
        };
        let _ = writeln!(
            h,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.5e}</td><td>{}</td><td>{range}</td><td>{weights}</td><td>{}</td></tr>",
            if l.cosine < 0.99 {
                " class=\"bad\""
            } else {
                ""
            },
            escape(&l.name),
            escape(&l.op_type),
            escape(&l.act_algo),
            if l.asymmetric {
                "asymmetric"
            } else {
                "symmetric"
            },
            l.scale_d,
            l.offset_d,
            if l.cosine.is_finite() {
                format!("{:.5}", l.cosine)
            } else {
                "—".into()
            },
        );
    }
    h.push_str("</table>\n");
    if !report.skipped.is_empty() {
        h.push_str(
            "<h2>Left in float</h2>\n<table><tr><th>layer</th><th>op</th><th>why</th></tr>\n",
        );
        for c in &report.skipped {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&c.node),
                escape(&c.op_type),
                escape(c.note.as_deref().unwrap_or(""))
            );
        }
        h.push_str("</table>\n");
    }
    if !histograms.is_empty() {
        h.push_str("<h2>Input activations</h2>\n<p>Each layer's float input over the first calibration samples; the red lines bound the range its int8 grid keeps (values outside are clipped). Layers with DMQ balancing quantize their input divided per channel, so their lines are indicative.</p>\n");
        for (i, g) in histograms.iter().enumerate() {
            let _ = writeln!(h, "<h3>{}</h3>", escape(&g.layer));
            h.push_str(&histogram_svg(
                &format!("histogram-{i}"),
                g.lo,
                g.hi,
                &g.counts,
                g.clip,
                (760, 140),
            ));
        }
    }
    h.push_str("</body></html>\n");
    h
}
