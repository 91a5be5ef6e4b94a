//! `calibrate --record`: models built from a record the user supplies.

mod common;

use ascend_quant::onnx::load_model;
use ascend_quant::onnx::to_tensor;
use ascend_quant::tensor::Tensor;
use common::{bin, calibrate_digits, digits};
use std::path::Path;

fn from_record(record: &Path, output: &Path) -> std::process::Output {
    bin()
        .arg("calibrate")
        .arg("--model")
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--record")
        .arg(record)
        .arg("--output")
        .arg(output)
        .arg("--quiet")
        .output()
        .unwrap()
}

#[test]
fn calibrate_then_record_gives_byte_identical_models() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let o = calibrate_digits(&a).arg("--quiet").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = dir.path().join("b");
    let o = from_record(&dir.path().join("a_record.txt"), &b);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for suffix in [
        "_deploy_model.onnx",
        "_fake_quant_model.onnx",
        "_record.txt",
    ] {
        let x = std::fs::read(dir.path().join(format!("a{suffix}"))).unwrap();
        let y = std::fs::read(dir.path().join(format!("b{suffix}"))).unwrap();
        assert!(x == y, "{suffix} differs");
    }
}

#[test]
fn a_hand_written_record_sets_the_weights_and_leaves_other_layers_float() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("mine.txt");
    std::fs::write(
        &record,
        "record {\n  key: \"/10/Gemm\"\n  value {\n    scale_d: 0.05\n    offset_d: -128\n    scale_w: 0.01\n    offset_w: 0\n  }\n}\n",
    )
    .unwrap();
    let out = dir.path().join("m");
    let o = from_record(&record, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deploy = load_model(&dir.path().join("m_deploy_model.onnx")).unwrap();
    let g = deploy.graph.unwrap();
    let quants: Vec<&str> = g
        .node
        .iter()
        .filter(|n| n.op_type() == "AscendQuant")
        .map(|n| n.name())
        .collect();
    assert_eq!(quants.len(), 1, "only the Gemm is quantized: {quants:?}");
    let q = &g
        .node
        .iter()
        .find(|n| n.op_type() == "AscendQuant")
        .unwrap();
    let scale = q
        .attribute
        .iter()
        .find(|a| a.name() == "scale")
        .unwrap()
        .f();
    let offset = q
        .attribute
        .iter()
        .find(|a| a.name() == "offset")
        .unwrap()
        .f();
    assert_eq!((scale, offset), (1.0 / 0.05f32, -128.0));
    // The int8 weight is round_half_even(w / 0.01) saturated, computed here from the float model.
    let float = load_model(&digits().join("digits_cnn.onnx")).unwrap();
    let fg = float.graph.unwrap();
    let gemm = fg.node.iter().find(|n| n.name() == "/10/Gemm").unwrap();
    let w_name = &gemm.input[1];
    let Tensor::F32(w) = to_tensor(
        fg.initializer
            .iter()
            .find(|t| t.name() == w_name.as_str())
            .unwrap(),
    )
    .unwrap() else {
        panic!("float weight")
    };
    let qgemm = g.node.iter().find(|n| n.name() == "/10/Gemm").unwrap();
    let Tensor::I8(wq) = to_tensor(
        g.initializer
            .iter()
            .find(|t| t.name() == qgemm.input[1])
            .unwrap(),
    )
    .unwrap() else {
        panic!("int8 weight")
    };
    let trans_b = |n: &ascend_quant::onnx::proto::NodeProto| {
        n.attribute
            .iter()
            .find(|a| a.name() == "transB")
            .map_or(0, |a| a.i())
    };
    // Preparation stores the weight as (K, N) with transB = 0, as AMCT does.
    let w = if trans_b(gemm) == 1 {
        w.t().to_owned()
    } else {
        w
    };
    assert_eq!(trans_b(qgemm), 0);
    assert_eq!(w.shape(), wq.shape());
    let mut saturated = 0;
    for (f, q) in w.iter().zip(wq.iter()) {
        let expect = (f64::from(*f) / 0.01).round().clamp(-128.0, 127.0) as i8;
        saturated += usize::from(expect == 127 || expect == -128);
        // f64 rounding agrees with float32 half-even except on exact ties, which random weights avoid.
        assert_eq!(*q, expect, "w {f}");
    }
    assert!(wq.len() > 100 && saturated < wq.len());
}

#[test]
fn records_that_do_not_fit_the_model_are_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "record { key: \"nope\" value { scale_d: 0.1 } }",
            vec!["mine.txt", "'nope'", "/0/Conv, /3/Conv, /6/Conv, /10/Gemm"],
        ),
        (
            "record { key: \"/0/Conv\" value { scale_d: 0.1 scale_w: [0.1, 0.2, 0.3] } }",
            vec!["mine.txt", "'/0/Conv'", "3 scale_w", "1 or 16"],
        ),
        (
            "record { key: \"/10/Gemm\" value { scale_d: 0.1 scale_w: [0.1, 0.2] } }",
            vec![
                "'/10/Gemm'",
                "2 scale_w",
                "allowed: 1 or 10 (one per output channel)",
            ],
        ),
        (
            "record { key: \"/0/Conv\" value { offset_d: 3 scale_w: 0.1 } }",
            vec!["cannot find scale_d", "'/0/Conv'"],
        ),
        (
            "record { key: \"/0/Conv\" value { scale_d: 0.1 offset_d: 300 scale_w: 0.1 } }",
            vec!["offset_d = 300", "int8"],
        ),
        (
            "record { key: \"/0/Conv\" value { scale_d: -1 scale_w: 0.1 } }",
            vec!["scale_d = -1", "positive"],
        ),
        (
            "record { key: \"/0/Conv\" value { scale_d: 0.1 scale_w: 0.1 offset_w: 2 } }",
            vec!["offset_w must be 0"],
        ),
        ("record { key: 3 }", vec!["mine.txt", "not a valid record"]),
    ];
    for (text, needles) in cases {
        let record = dir.path().join("mine.txt");
        std::fs::write(&record, text).unwrap();
        let o = from_record(&record, &dir.path().join("out"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{text}: {err}");
        for n in needles {
            assert!(err.contains(n), "{text}: missing {n} in {err}");
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "only the record remains: {left:?}");
    }
}
