//! `convert-qat` on QDQ models that onnxruntime's quantize_static made from
//! the digits CNN (`scripts/make_qdq_fixtures.py`): the deploy model, run on
//! the simulator, against onnxruntime's outputs of the QDQ model; the factors
//! against the QDQ model's own; and the refusals.

mod common;

use ascend_quant::data::read_npy;
use ascend_quant::onnx::{ModelProto, Storage, load_model, save_model, to_proto, to_tensor};
use ascend_quant::quant::record::read_record;
use ascend_quant::sim::{CpuExecutor, Executor, SessionOptions};
use ascend_quant::tensor::Tensor;
use common::{bin, digits};
use ndarray::ArrayD;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qdq")
        .join(name)
}

fn convert(model: &Path, out: &Path) -> std::process::Output {
    bin()
        .arg("convert-qat")
        .arg("--model")
        .arg(model)
        .arg("--output")
        .arg(out)
        .arg("--quiet")
        .output()
        .unwrap()
}

fn f32s(t: Tensor) -> ArrayD<f32> {
    match t {
        Tensor::F32(a) => a,
        other => panic!("{other:?}"),
    }
}

fn init(model: &ModelProto, name: &str) -> Tensor {
    let g = model.graph.as_ref().unwrap();
    to_tensor(g.initializer.iter().find(|t| t.name() == name).unwrap()).unwrap()
}

/// Fractions of logits within one output step of onnxruntime's, the
/// largest difference in steps, and top-1 agreement.
fn agreement(qdq: &str, logits: &str, dir: &Path) -> (f64, f32, f64) {
    let out = dir.join("c");
    let o = convert(&fixture(qdq), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deploy = load_model(&dir.join("c_deploy_model.onnx")).unwrap();
    let x = read_npy(&digits().join("test_x.npy")).unwrap();
    let s = CpuExecutor
        .prepare(
            &deploy,
            &SessionOptions {
                dynamic_batch: true,
                ..Default::default()
            },
        )
        .unwrap();
    let ours = f32s(s.run(&[("x", &x)], &["logits"]).unwrap().remove(0));
    let theirs = f32s(read_npy(&fixture(logits)).unwrap());
    let step = f32s(init(&load_model(&fixture(qdq)).unwrap(), "logits_scale"))
        .iter()
        .copied()
        .next()
        .unwrap();
    let diffs: Vec<f32> = ours
        .iter()
        .zip(theirs.iter())
        .map(|(a, b)| (a - b).abs())
        .collect();
    let within = diffs.iter().filter(|&&d| d <= step).count() as f64 / diffs.len() as f64;
    let worst = diffs.iter().copied().fold(0.0f32, f32::max) / step;
    let rows = ours.shape()[0];
    let argmax = |a: &ArrayD<f32>, i: usize| {
        (0..10)
            .max_by(|&p, &q| a[[i, p]].total_cmp(&a[[i, q]]))
            .unwrap()
    };
    let agree = (0..rows)
        .filter(|&i| argmax(&ours, i) == argmax(&theirs, i))
        .count() as f64
        / rows as f64;
    (within, worst, agree)
}

#[test]
fn per_channel_uint8_model_matches_onnxruntime_within_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let (within, worst, agree) =
        agreement("digits_qdq_pc.onnx", "digits_qdq_pc_logits.npy", dir.path());
    eprintln!("per-channel: {within} within one step, worst {worst} steps, top-1 {agree}");
    assert_eq!(within, 1.0, "worst {worst} steps");
    assert!(agree >= 0.99, "{agree}");
    // The factors are the QDQ model's: uint8 zero points become zp - 128.
    let qdq = load_model(&fixture("digits_qdq_pc.onnx")).unwrap();
    let record =
        read_record(&std::fs::read_to_string(dir.path().join("c_record.txt")).unwrap()).unwrap();
    let entry = |k: &str| {
        record
            .record
            .iter()
            .find(|e| e.key() == k)
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let conv = entry("/0/Conv");
    let x_scale = f32s(init(&qdq, "x_scale")).iter().copied().next().unwrap();
    let Tensor::U8(zp) = init(&qdq, "x_zero_point") else {
        panic!("uint8 zero point")
    };
    assert_eq!(conv.scale_d(), x_scale);
    assert_eq!(
        conv.offset_d(),
        i32::from(zp.iter().copied().next().unwrap()) - 128
    );
    let w_scale: Vec<f32> = f32s(init(&qdq, "onnx::Conv_26_scale"))
        .iter()
        .copied()
        .collect();
    assert_eq!(conv.scale_w, w_scale);
    let pool = entry("/5/MaxPool:0");
    assert!(pool.is_tensor_quantize());
    // The deploy weights are the QDQ model's int8 weights, unchanged.
    let deploy = load_model(&dir.path().join("c_deploy_model.onnx")).unwrap();
    let conv_node = deploy
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .find(|n| n.name() == "/3/Conv")
        .unwrap()
        .clone();
    let (Tensor::I8(ours), Tensor::I8(theirs)) = (
        init(&deploy, &conv_node.input[1]),
        init(&qdq, "3.weight_quantized"),
    ) else {
        panic!("int8 weights")
    };
    assert_eq!(ours, theirs);
    // Gemm has per-channel weights, which Ascend does not take: it runs in float, reported.
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("c_quant_report.json")).unwrap(),
    )
    .unwrap();
    let floats = report["float_ops"].as_array().unwrap();
    assert!(
        floats.iter().any(
            |f| f["node"] == "/10/Gemm" && f["reason"].as_str().unwrap().contains("per tensor")
        ),
        "{floats:?}"
    );
    assert_eq!(report["layers"].as_array().unwrap().len(), 3);
}

#[test]
fn per_tensor_int8_model_matches_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let (within, worst, agree) =
        agreement("digits_qdq_pt.onnx", "digits_qdq_pt_logits.npy", dir.path());
    eprintln!("per-tensor: {within} within one step, worst {worst} steps, top-1 {agree}");
    // This model also rounds each Conv output before its Relu (a pair Ascend
    // has no place for: the Relu runs in float), so a few logits move by more
    // than one output step.
    assert!(within >= 0.99, "{within}");
    assert!(worst <= 1.5, "{worst}");
    assert!(agree >= 0.99, "{agree}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("c_quant_report.json")).unwrap(),
    )
    .unwrap();
    let layers: Vec<&str> = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(layers, ["/0/Conv", "/3/Conv", "/6/Conv", "/10/Gemm"]);
}

fn altered(dir: &Path, name: &str, alter: impl FnOnce(&mut ModelProto)) -> PathBuf {
    let mut m = load_model(&fixture("digits_qdq_pt.onnx")).unwrap();
    alter(&mut m);
    let p = dir.join(name);
    save_model(&m, &p).unwrap();
    p
}

fn set_init(m: &mut ModelProto, name: &str, value: Tensor) {
    let g = m.graph.as_mut().unwrap();
    let t = g.initializer.iter_mut().find(|t| t.name() == name).unwrap();
    *t = to_proto(name, &value, Storage::Raw);
}

#[test]
fn what_ascend_cannot_represent_is_refused_naming_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(PathBuf, Vec<&str>)> = vec![
        (
            altered(dir.path(), "asym.onnx", |m| {
                let zp = ArrayD::from_elem(ndarray::IxDyn(&[]), 3i8);
                set_init(m, "3.weight_zero_point", Tensor::I8(zp));
            }),
            vec!["3.weight_DequantizeLinear", "asymmetric weights", "/3/Conv"],
        ),
        (
            altered(dir.path(), "int32.onnx", |m| {
                let zp = ArrayD::from_elem(ndarray::IxDyn(&[]), 0i32);
                set_init(m, "x_zero_point", Tensor::I32(zp));
            }),
            vec!["x_QuantizeLinear", "int32", "int8"],
        ),
        (
            altered(dir.path(), "per_channel.onnx", |m| {
                let scale = ArrayD::from_elem(ndarray::IxDyn(&[16]), 0.05f32);
                let zp = ArrayD::from_elem(ndarray::IxDyn(&[16]), 0i8);
                set_init(m, "/2/Relu_output_0_scale", Tensor::F32(scale));
                set_init(m, "/2/Relu_output_0_zero_point", Tensor::I8(zp));
            }),
            vec![
                "/2/Relu_output_0_QuantizeLinear",
                "per channel",
                "one scale per activation",
            ],
        ),
        (
            digits().join("digits_cnn.onnx"),
            vec!["not a QDQ model", "calibrate"],
        ),
    ];
    for (model, needles) in cases {
        let out = dir.path().join("out");
        let o = convert(&model, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        for n in needles {
            assert!(err.contains(n), "missing '{n}' in: {err}");
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("out"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
