//! `compare` on the digits model: the per-layer table for fake-quant and
//! deploy models, and the HTML page's content.

use std::path::Path;

mod common;
use common::{bin, digits};

fn compare(quant: &Path, extra: &[&str]) -> serde_json::Value {
    let o = bin()
        .args(["compare", "--json", "--batch-size", "50", "--float"])
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--quant")
        .arg(quant)
        .arg("--data")
        .arg(digits().join("test_x.npy"))
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn fake_quant_and_deploy_compare_alike_and_the_page_has_its_charts() {
    let dir = tempfile::tempdir().unwrap();
    let o = common::calibrate_digits(&dir.path().join("q"))
        .args(["--quiet", "--skip-layers", "/6/Conv"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let html = dir.path().join("report.html");
    let fake = compare(
        &dir.path().join("q_fake_quant_model.onnx"),
        &["--html", html.to_str().unwrap(), "--layer", "/3/Conv"],
    );
    let deploy = compare(&dir.path().join("q_deploy_model.onnx"), &[]);
    assert_eq!(fake["samples"], 500);
    let layers = fake["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    let cos: Vec<f64> = layers
        .iter()
        .map(|l| l["cosine"].as_f64().unwrap())
        .collect();
    assert!(cos.windows(2).all(|w| w[0] <= w[1]), "worst first: {cos:?}");
    assert!(cos.iter().all(|&c| c > 0.999), "{cos:?}");
    let quantized = |v: &serde_json::Value, name: &str| {
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()["quantized"]
            .as_bool()
            .unwrap()
    };
    assert!(!quantized(&fake, "/6/Conv") && quantized(&fake, "/3/Conv"));
    assert!(!quantized(&deploy, "/6/Conv") && quantized(&deploy, "/0/Conv"));
    // The deploy model, run with integer arithmetic, tells the same story.
    for l in layers {
        let name = l["name"].as_str().unwrap();
        let d = deploy["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap();
        assert!(
            (d["cosine"].as_f64().unwrap() - l["cosine"].as_f64().unwrap()).abs() < 1e-4,
            "{name}"
        );
    }
    // The chosen layer's histogram carries its clip range from the fake-quant constants.
    let h = &fake["histogram"];
    assert_eq!(h["layer"], "/3/Conv");
    let clip = h["clip"].as_array().unwrap();
    assert!(clip[0].as_f64().unwrap() <= 0.0 && clip[1].as_f64().unwrap() > 0.0);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.starts_with("<!DOCTYPE html>")
            && page.contains("<svg id=\"cosine\"")
            && page.contains("<svg id=\"histogram\"")
    );
    assert_eq!(page.matches("class=\"bar\"").count(), 4);
    assert_eq!(page.matches("class=\"bin\"").count(), 64);
    assert_eq!(page.matches("class=\"clip\"").count(), 2);
    // Self-contained: no scripts, no external resources.
    assert!(!page.contains("<script") && !page.contains("src=") && !page.contains("href="));
}

#[test]
fn an_unknown_layer_is_a_clear_error() {
    let o = bin()
        .args(["compare", "--float"])
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--quant")
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--data")
        .arg(digits().join("calib_x.npy"))
        .args(["--layer", "nope"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("'nope'"));
}

#[test]
fn the_analysis_finds_the_layer_that_hurts_and_its_whole_error_matches_the_fake_quant_model() {
    use ascend_quant::onnx::load_model;
    use ascend_quant::quant::record::read_record;
    let dir = tempfile::tempdir().unwrap();
    let o = common::calibrate_digits(&dir.path().join("q"))
        .arg("--quiet")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    // A record whose /3/Conv input range is cut to 2 % of what calibration chose.
    let record_path = dir.path().join("q_record.txt");
    let mut record = read_record(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    for e in &mut record.record {
        if e.key() == "/3/Conv" {
            let v = e.value.as_mut().unwrap();
            v.scale_d = Some(v.scale_d() * 0.02);
        }
    }
    let bad = dir.path().join("bad_record.txt");
    std::fs::write(
        &bad,
        ascend_quant::quant::record::write_record_text(&record),
    )
    .unwrap();
    let html = dir.path().join("analysis.html");
    let v = compare(
        &dir.path().join("q_fake_quant_model.onnx"),
        &[
            "--analyze",
            "--record",
            bad.to_str().unwrap(),
            "--analyze-samples",
            "100",
            "--html",
            html.to_str().unwrap(),
        ],
    );
    let a = &v["analysis"];
    assert_eq!(a["samples"], 100);
    let layers = a["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    assert_eq!(layers[0]["name"], "/3/Conv", "{layers:?}");
    let act = |i: usize| layers[i]["activation"]["mse"].as_f64().unwrap();
    assert!(act(0) > 10.0 * act(1), "{layers:?}");
    // Its weight is as good as calibration made it: the activation is what hurts.
    assert!(layers[0]["weight"]["mse"].as_f64().unwrap() < act(0) / 10.0);
    let hist = a["histograms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["layer"] == "/3/Conv")
        .unwrap();
    assert!(hist["clipped"].as_f64().unwrap() > 0.3, "{hist}");
    // With the calibrated record (found beside the model), the all-layers error is
    // the fake-quant model's, measured here independently on the same 100 samples.
    let v = compare(
        &dir.path().join("q_fake_quant_model.onnx"),
        &["--analyze", "--analyze-samples", "100"],
    );
    let mse = v["analysis"]["all_layers"]["mse"].as_f64().unwrap();
    let x = ascend_quant::data::read_npy(&digits().join("test_x.npy")).unwrap();
    let first = x.slice_axis0(0..100);
    let run = |m: &Path| {
        use ascend_quant::sim::{CpuExecutor, Executor, SessionOptions};
        let s = CpuExecutor
            .prepare(
                &load_model(m).unwrap(),
                &SessionOptions {
                    dynamic_batch: true,
                    ..Default::default()
                },
            )
            .unwrap();
        let out = s.run(&[("x", &first)], &["logits"]).unwrap().remove(0);
        out.as_f32().unwrap().iter().copied().collect::<Vec<f32>>()
    };
    let (f, q) = (
        run(&digits().join("digits_cnn.onnx")),
        run(&dir.path().join("q_fake_quant_model.onnx")),
    );
    let direct = f
        .iter()
        .zip(&q)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        / f.len() as f64;
    assert!(
        (mse - direct).abs() <= 0.02 * direct,
        "analysis {mse} vs fake-quant model {direct}"
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("id=\"analysis\"") && page.contains("analysis-histogram-0"));
}
