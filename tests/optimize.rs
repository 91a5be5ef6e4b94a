//! `calibrate --optimize` (DMQ balancing + bias correction) on the digits CNN:
//! at least the float model's accuracy on the held-out test images, the
//! deploy model agreeing with the fake-quant model, and `auto` taking the switch.

mod common;

use ascend_quant::onnx::load_model;
use common::{calibrate_digits, digits, digits_accuracy, digits_logits};

#[test]
fn optimize_reaches_the_float_accuracy_and_the_deploy_model_follows() {
    let dir = tempfile::tempdir().unwrap();
    let o = calibrate_digits(&dir.path().join("opt"))
        .args(["--quiet", "--optimize"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let float = digits_logits(&load_model(&digits().join("digits_cnn.onnx")).unwrap());
    let fake = digits_logits(&load_model(&dir.path().join("opt_fake_quant_model.onnx")).unwrap());
    let deploy = digits_logits(&load_model(&dir.path().join("opt_deploy_model.onnx")).unwrap());
    let (f, q, d) = (
        digits_accuracy(&float),
        digits_accuracy(&fake),
        digits_accuracy(&deploy),
    );
    eprintln!("top-1: float {f}, --optimize fake-quant {q}, deploy {d}");
    assert!(q >= f, "--optimize {q} < float {f}");
    assert!((d - q).abs() <= 0.2, "deploy {d} vs fake-quant {q}");
    let record = std::fs::read_to_string(dir.path().join("opt_record.txt")).unwrap();
    // Every layer's record block carries its balancing factors.
    let blocks: Vec<&str> = record.split("record {").skip(1).collect();
    assert_eq!(blocks.len(), 4, "{record}");
    assert!(
        blocks.iter().all(|b| b.contains("tensor_balance_factor:")),
        "{record}"
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("opt_quant_report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["bias_correction"].as_array().unwrap().len(), 4);
    // auto takes the switch and writes it into the configuration it chose.
    let o = common::bin()
        .args(["auto", "--quiet", "--optimize", "--model"])
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--data")
        .arg(digits().join("calib_x.npy"))
        .arg("--eval-data")
        .arg(digits().join("test_x.npy"))
        .arg("--labels")
        .arg(digits().join("test_y.npy"))
        .args(["--batch-size", "4", "--batch-num", "10", "--output"])
        .arg(dir.path().join("auto"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("auto_auto_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["bias_correction"], true);
    assert_eq!(config["/3/Conv"]["dmq_balancer_param"], 0.5);
    // ... and that configuration reproduces auto's models.
    let o = common::bin()
        .args(["calibrate", "--quiet", "--model"])
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--data")
        .arg(digits().join("calib_x.npy"))
        .arg("--config")
        .arg(dir.path().join("auto_auto_config.json"))
        .args(["--batch-size", "4", "--batch-num", "10", "--output"])
        .arg(dir.path().join("again"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = std::fs::read(dir.path().join("auto_deploy_model.onnx")).unwrap();
    let b = std::fs::read(dir.path().join("again_deploy_model.onnx")).unwrap();
    assert!(
        a == b,
        "calibrate --config auto_config.json differs from auto's model"
    );
}
