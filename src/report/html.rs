//! A self-contained HTML page for a comparison: a table, a bar chart of
//! per-layer cosine similarity and a histogram of one layer's activations
//! with the quantization range drawn on it, all inline SVG (no scripts, no
//! external files).

use super::compare::Comparison;
use std::fmt::Write;

pub(super) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the page.
pub fn render(c: &Comparison, float_model: &str, quant_model: &str) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>ascend-quant comparison</title>\
<style>body{{font-family:sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;font-size:13px}}\
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
.bad{{background:#fde2e2}}h2{{margin-top:28px}}</style></head><body>\n\
<h1>Float vs quantized, layer by layer</h1>\n<p>float: <code>{}</code><br>quantized: <code>{}</code><br>{} samples, {} layers, worst first.</p>\n",
        escape(float_model),
        escape(quant_model),
        c.samples,
        c.layers.len()
    );
    let rows: Vec<(&str, f64, bool)> = c
        .layers
        .iter()
        .map(|l| (l.name.as_str(), l.cosine, l.quantized))
        .collect();
    h.push_str("<h2>Cosine similarity per layer</h2>\n");
    h.push_str(&cosine_chart(&rows));
    // Histogram of the chosen layer's input.
    if let Some(hist) = &c.histogram {
        let _ = writeln!(
            h,
            "<h2>Input activations of <code>{}</code></h2>",
            escape(&hist.layer)
        );
        h.push_str(&histogram_svg(
            "histogram",
            hist.lo,
            hist.hi,
            &hist.counts,
            hist.clip,
            (760, 220),
        ));
    }
    if let Some(a) = &c.analysis {
        analysis_section(&mut h, a);
    }
    h.push_str("<h2>Table</h2>\n<table><tr><th>layer</th><th>op</th><th>quantized</th><th>cosine</th><th>relative L2</th><th>max abs</th></tr>\n");
    for l in &c.layers {
        let _ = writeln!(
            h,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{:.6}</td><td>{:.4e}</td><td>{:.4e}</td></tr>",
            if l.cosine < 0.99 {
                " class=\"bad\""
            } else {
                ""
            },
            escape(&l.name),
            l.op_type,
            if l.quantized { "yes" } else { "no" },
            l.cosine,
            l.relative_l2,
            l.max_abs
        );
    }
    h.push_str("</table>\n</body></html>\n");
    h
}

/// An inline SVG bar chart of per-layer cosine similarity: one row per
/// `(layer, cosine, quantized)`, red below 0.99, grey when not quantized.
pub(super) fn cosine_chart(rows: &[(&str, f64, bool)]) -> String {
    let mut h = String::new();
    let row = 16;
    let width = 760;
    let label_w = 330;
    let min_cos = rows
        .iter()
        .map(|r| r.1)
        .filter(|c| c.is_finite())
        .fold(1.0f64, f64::min)
        .min(0.99);
    let lo = (min_cos - 0.01).max(-1.0);
    let height = row * rows.len() + 30;
    let _ = writeln!(
        h,
        "<svg id=\"cosine\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\">"
    );
    for (i, &(name, cosine, quantized)) in rows.iter().enumerate() {
        let y = i * row;
        let frac = ((cosine - lo) / (1.0 - lo)).clamp(0.0, 1.0);
        let frac = if frac.is_finite() { frac } else { 0.0 };
        let bar = (frac * (width - label_w - 70) as f64) as usize;
        let color = if cosine < 0.99 {
            "#d9534f"
        } else if quantized {
            "#4a90d9"
        } else {
            "#9e9e9e"
        };
        let _ = writeln!(
            h,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text><rect class=\"bar\" x=\"{label_w}\" y=\"{}\" width=\"{bar}\" height=\"{}\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\" font-size=\"11\">{:.5}</text>",
            label_w - 6,
            y + 12,
            escape(name),
            y + 2,
            row - 4,
            label_w + bar + 4,
            y + 12,
            cosine
        );
    }
    let _ = writeln!(
        h,
        "<text x=\"{label_w}\" y=\"{}\" font-size=\"11\">axis from {lo:.3} to 1; red: below 0.99, grey: not quantized</text></svg>",
        height - 8
    );
    h
}

/// An inline SVG histogram (square-root counts) with the clip range drawn on it.
pub(super) fn histogram_svg(
    id: &str,
    lo: f32,
    hi: f32,
    counts: &[f64],
    clip: Option<(f32, f32)>,
    (w, ht): (usize, usize),
) -> String {
    let mut h = String::new();
    let max = counts.iter().copied().fold(0.0f64, f64::max).max(1.0);
    let n = counts.len().max(1);
    let bw = (w - 60) as f64 / n as f64;
    let span = f64::from(hi - lo).max(f64::MIN_POSITIVE);
    let xpos = |v: f32| 40.0 + (f64::from(v - lo) / span) * (w - 60) as f64;
    let _ = writeln!(
        h,
        "<svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\">",
        ht + 40
    );
    for (i, &count) in counts.iter().enumerate() {
        // Square-root scale so the tails stay visible.
        let bh = ((count / max).sqrt() * ht as f64) as usize;
        let _ = writeln!(
            h,
            "<rect class=\"bin\" x=\"{:.1}\" y=\"{}\" width=\"{:.1}\" height=\"{bh}\" fill=\"#4a90d9\"/>",
            40.0 + i as f64 * bw,
            ht - bh,
            (bw - 1.0).max(0.5)
        );
    }
    if let Some((a, b)) = clip {
        for (v, label) in [(a, "clip min"), (b, "clip max")] {
            let x = xpos(v).clamp(0.0, w as f64);
            let tx = x.clamp(50.0, w as f64 - 50.0);
            let _ = writeln!(
                h,
                "<line class=\"clip\" x1=\"{x:.1}\" y1=\"0\" x2=\"{x:.1}\" y2=\"{ht}\" stroke=\"#d9534f\" stroke-width=\"2\"/><text x=\"{tx:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{label} {v:.4}</text>",
                ht + 14
            );
        }
    }
    let _ = writeln!(
        h,
        "<text x=\"40\" y=\"{}\" font-size=\"11\">range {lo:.4} .. {hi:.4} (counts on a square-root scale)</text></svg>",
        ht + 34
    );
    h
}

/// The error analysis: one row per layer (worst first) and the input
/// histograms of the six worst layers.
fn analysis_section(h: &mut String, a: &super::analyze::Analysis) {
    let _ = write!(
        h,
        "<h2 id=\"analysis\">Where the error comes from</h2>\n<p>Each layer quantized alone, its input activation and its weight apart, scored on the model's outputs over {} samples (all layers together: cosine {:.6}, MSE {:.4e}). Worst first.</p>\n\
<table><tr><th>layer</th><th>op</th><th>activation cosine</th><th>activation MSE</th><th>weight cosine</th><th>weight MSE</th><th>clipped</th></tr>\n",
        a.samples, a.all_layers.cosine, a.all_layers.mse
    );
    let clipped = |name: &str| {
        a.histograms
            .iter()
            .find(|x| x.layer == name)
            .map_or(0.0, |x| x.clipped)
    };
    for l in &a.layers {
        let (wc, wm) = l.weight.map_or(("-".into(), "-".into()), |w| {
            (format!("{:.6}", w.cosine), format!("{:.4e}", w.mse))
        });
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{:.6}</td><td>{:.4e}</td><td>{wc}</td><td>{wm}</td><td>{:.3}%</td></tr>",
            escape(&l.name),
            l.op_type,
            l.activation.cosine,
            l.activation.mse,
            100.0 * clipped(&l.name)
        );
    }
    h.push_str("</table>\n");
    for (i, l) in a.layers.iter().take(6).enumerate() {
        if let Some(x) = a.histograms.iter().find(|x| x.layer == l.name) {
            let _ = writeln!(
                h,
                "<h3>Input of <code>{}</code> ({:.3}% clipped)</h3>",
                escape(&x.layer),
                100.0 * x.clipped
            );
            h.push_str(&histogram_svg(
                &format!("analysis-histogram-{i}"),
                x.lo,
                x.hi,
                &x.counts,
                Some(x.clip),
                (640, 140),
            ));
        }
    }
}
