//! Bias correction on the digits CNN: only the int32 biases change, and the
//! mean error of every output, measured here on the held-out test images,
//! shrinks.

mod common;

use ascend_quant::onnx::{ModelProto, load_model, to_tensor};
use ascend_quant::tensor::Tensor;
use common::{calibrate_digits, digits, digits_logits};

fn initializers(m: &ModelProto, dtype_i8: bool) -> Vec<(String, Tensor)> {
    m.graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .map(|t| (t.name().to_string(), to_tensor(t).unwrap()))
        .filter(|(_, t)| matches!(t, Tensor::I8(_)) == dtype_i8 && !matches!(t, Tensor::U64(_)))
        .collect()
}

#[test]
fn corrected_biases_shrink_the_mean_output_error_on_held_out_data() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [("plain", vec![]), ("bc", vec!["--bias-correction"])] {
        let o = calibrate_digits(&dir.path().join(name))
            .arg("--quiet")
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let load = |p: &str| load_model(&dir.path().join(p)).unwrap();
    let (plain, bc) = (
        load("plain_deploy_model.onnx"),
        load("bc_deploy_model.onnx"),
    );
    // Same int8 weights; the int32 biases moved, by a few steps.
    assert_eq!(initializers(&plain, true), initializers(&bc, true));
    let biases = |m: &ModelProto| -> Vec<i32> {
        initializers(m, false)
            .into_iter()
            .filter_map(|(_, t)| match t {
                Tensor::I32(a) => Some(a.iter().copied().collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect()
    };
    let (b0, b1) = (biases(&plain), biases(&bc));
    assert_eq!(b0.len(), b1.len());
    assert!(b0 != b1, "no bias changed");
    // Mean error per logit over the 500 test images (not seen by calibration).
    let float = digits_logits(&load_model(&digits().join("digits_cnn.onnx")).unwrap());
    let mean_error = |p: &str| -> f64 {
        let q = digits_logits(&load(p));
        let (n, c) = (q.shape()[0], q.shape()[1]);
        (0..c)
            .map(|j| {
                ((0..n)
                    .map(|i| f64::from(q[[i, j]] - float[[i, j]]))
                    .sum::<f64>()
                    / n as f64)
                    .abs()
            })
            .sum::<f64>()
            / c as f64
    };
    let (before, after) = (
        mean_error("plain_fake_quant_model.onnx"),
        mean_error("bc_fake_quant_model.onnx"),
    );
    eprintln!("mean |error| per logit: {before:.5} -> {after:.5}");
    assert!(after < 0.7 * before, "{before} -> {after}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("bc_quant_report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["bias_correction"].as_array().unwrap().len(), 4);
}
