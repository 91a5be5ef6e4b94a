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

/// A transformer's projection pair in the way LayerNorm leaves it: one input
/// channel forty times wider than the others, columns of the weights of very
/// different widths. `--optimize` quantizes the MatMul weights per output
/// column and chooses each layer's DMQ strength from its data; the
/// fake-quant output must then be at least four times closer (squared error)
/// to the float product computed here than plain calibration's.
#[test]
fn optimize_quantizes_matmuls_per_column_with_searched_balancing() {
    use ascend_quant::onnx::builder::node;
    use ascend_quant::pipeline::inputs::{apply_optimize, layer_names};
    use ascend_quant::quant::config::QuantConfig;
    use ndarray::{Array2, ArrayD, IxDyn};
    let (s, k, h, n) = (16usize, 32usize, 24usize, 8usize);
    let column = |j: usize| [0.02f32, 0.3, 1.0, 0.05][j % 4];
    let w1 = ArrayD::from_shape_vec(IxDyn(&[k, h]), common::signed_values(1, k * h))
        .unwrap()
        .mapv(|v| v * 0.2);
    let w1 = ArrayD::from_shape_fn(IxDyn(&[k, h]), |ix| w1[[ix[0], ix[1]]] * column(ix[1]));
    let w2 = ArrayD::from_shape_vec(IxDyn(&[h, n]), common::signed_values(2, h * n)).unwrap();
    let b1 = ArrayD::from_shape_vec(IxDyn(&[h]), common::signed_values(3, h)).unwrap();
    let m = common::model_x_to_y(
        vec![
            node("MatMul", "q", &["x", "w1"], &["q.y"], vec![]),
            node("Add", "q.bias", &["b1", "q.y"], &["h"], vec![]),
            node("MatMul", "o", &["h", "w2"], &["y"], vec![]),
        ],
        vec![("w1", w1.clone()), ("w2", w2.clone()), ("b1", b1.clone())],
        &[-1, s as i64, k as i64],
        &[-1, s as i64, n as i64],
    );
    let data = |seed: u64, samples: usize| {
        let v = common::signed_values(seed, samples * s * k);
        ArrayD::from_shape_fn(IxDyn(&[samples, s, k]), |ix| {
            let x = v[(ix[0] * s + ix[1]) * k + ix[2]];
            if ix[2] == 5 { 40.0 * x } else { x }
        })
    };
    let (calib, eval) = (data(10, 32), data(11, 16));
    // The float product, by hand.
    let x2 = Array2::from_shape_vec((16 * s, k), eval.iter().copied().collect()).unwrap();
    let w1m = w1.clone().into_dimensionality::<ndarray::Ix2>().unwrap();
    let w2m = w2.clone().into_dimensionality::<ndarray::Ix2>().unwrap();
    let b1v = b1.clone().into_dimensionality::<ndarray::Ix1>().unwrap();
    let want = (x2.dot(&w1m) + &b1v).dot(&w2m);
    let layers = layer_names(&m).unwrap();
    let error = |config: &QuantConfig| {
        let outcome = common::calibrate_with(&m, config, calib.clone());
        let fake = outcome.models().unwrap().1;
        let got = common::run_x_to_y(&fake, &eval);
        let scales: Vec<usize> = outcome.factors.iter().map(|f| f.scale_w.len()).collect();
        let balanced = outcome.factors.iter().all(|f| f.balance.is_some());
        let e: f64 = got
            .iter()
            .zip(want.iter())
            .map(|(&a, &b)| f64::from(a - b).powi(2))
            .sum();
        (e, scales, balanced)
    };
    let plain = QuantConfig::default_for(&layers);
    let mut optimized = plain.clone();
    apply_optimize(&mut optimized, &layers);
    assert!(
        optimized
            .layers
            .iter()
            .all(|(_, l)| l.dmq_search && l.channel_wise)
    );
    let (e_plain, scales_plain, _) = error(&plain);
    let (e_opt, scales_opt, balanced) = error(&optimized);
    eprintln!("squared error: plain {e_plain:.4e}, --optimize {e_opt:.4e}");
    assert_eq!(
        scales_plain,
        vec![1, 1],
        "AMCT's default: MatMul per tensor"
    );
    assert_eq!(
        scales_opt,
        vec![h, n],
        "--optimize: one scale per output column"
    );
    assert!(balanced, "the outlier channel is worth balancing");
    assert!(
        e_opt * 4.0 < e_plain,
        "plain {e_plain} vs --optimize {e_opt}"
    );
}
