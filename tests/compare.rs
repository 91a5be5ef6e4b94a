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
