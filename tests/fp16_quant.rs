//! AMCT's `fakequant_precision_mode: FORCE_FP16_QUANT` on a one-weight
//! Gemm whose factors come from a record: an input chosen so that the quant
//! scale at fp16 precision gives another int8 code than at float32. The
//! record stays as given, the deploy model says how it was made and its
//! simulation (and `run --fp16-quant` on an unmarked copy) computes the
//! fp16 code, the fake-quant model too, and dequantization uses AMCT's S19
//! factor; every expectation is worked out here.

mod common;

use ascend_quant::data::{read_npy, write_npy};
use ascend_quant::deploy_format::unpack_deq_scale;
use ascend_quant::onnx::builder::node;
use ascend_quant::onnx::{load_model, save_model, to_tensor};
use ascend_quant::tensor::Tensor;
use common::{bin, model_x_to_y};
use ndarray::{ArrayD, IxDyn};
use std::path::Path;

const SCALE_D: f32 = 0.303_030_3;
const SCALE_W: f32 = 1.0 / 127.0;

fn record() -> String {
    format!(
        "record {{\n  key: \"fc\"\n  value {{\n    scale_d: {SCALE_D}\n    offset_d: 0\n    scale_w: {SCALE_W}\n    offset_w: 0\n  }}\n}}\n"
    )
}

/// The Gemm's single output for input `x` when the quant operator
/// multiplies by `scale`: the level, times the int8 weight 127, times `deq`.
fn expected(x: f32, scale: f32, deq: f32) -> (f32, f32) {
    let level = (x * scale).round_ties_even().clamp(-128.0, 127.0);
    (level, level * 127.0 * deq)
}

fn run_model(model: &Path, x: &Path, out: &Path, extra: &[&str]) -> f32 {
    let o = bin()
        .arg("run")
        .arg(model)
        .arg("-i")
        .arg(x)
        .arg("--output-dir")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let Tensor::F32(y) = read_npy(&out.join("y.npy")).unwrap() else {
        panic!("float output")
    };
    y[[0, 0]]
}

#[test]
fn force_fp16_quant_changes_the_code_where_fp16_rounding_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = ArrayD::from_shape_vec(IxDyn(&[1, 1]), vec![1.0f32]).unwrap();
    let m = model_x_to_y(
        vec![node("Gemm", "fc", &["x", "w"], &["y"], vec![])],
        vec![("w", w)],
        &[1, 1],
        &[1, 1],
    );
    save_model(&m, &d.join("m.onnx")).unwrap();
    std::fs::write(d.join("in_record.txt"), record()).unwrap();

    // The quant scale at float32 and at fp16 (1/0.30303 = 3.3000002 and
    // 3.30078125), and an input halfway between their .5 crossings.
    let s32 = 1.0f32 / SCALE_D;
    let s16 = half::f16::from_f32(s32).to_f32();
    assert!(s16 != s32);
    let x = 100.5 / ((s32 + s16) / 2.0);
    let deq32 = SCALE_W * SCALE_D;
    let deq19 = f32::from_bits(deq32.to_bits() & 0xFFFF_E000);
    let (code32, y32) = expected(x, s32, deq32);
    let (code16, y16) = expected(x, s16, deq19);
    assert_eq!(
        (code32, code16),
        (100.0, 101.0),
        "the input must split the codes"
    );
    let input = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[1, 1]), vec![x]).unwrap());
    write_npy(&d.join("x.npy"), &input).unwrap();

    for (prefix, extra) in [
        ("plain", &[][..]),
        ("fp16", &["--fakequant-precision-mode", "FORCE_FP16_QUANT"]),
    ] {
        let o = bin()
            .args(["calibrate", "--quiet", "--model"])
            .arg(d.join("m.onnx"))
            .arg("--record")
            .arg(d.join("in_record.txt"))
            .args(extra)
            .arg("--output")
            .arg(d.join(prefix))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // The record is the same either way.
    let rec = |p: &str| std::fs::read(d.join(format!("{p}_record.txt"))).unwrap();
    assert!(rec("plain") == rec("fp16"), "the record must not change");

    // The deploy model keeps AMCT's quant attribute (1/scale_d in float32)
    // and carries S19 dequantization factors and the mark.
    let deploy = load_model(&d.join("fp16_deploy_model.onnx")).unwrap();
    let g = deploy.graph.as_ref().unwrap();
    let quant = g
        .node
        .iter()
        .find(|n| n.op_type() == "AscendQuant")
        .unwrap();
    let scale_attr = quant
        .attribute
        .iter()
        .find(|a| a.name() == "scale")
        .unwrap()
        .f();
    assert_eq!(scale_attr, s32);
    let dequant = g
        .node
        .iter()
        .find(|n| n.op_type() == "AscendDequant")
        .unwrap();
    let param = g
        .initializer
        .iter()
        .find(|t| t.name() == dequant.input[1])
        .unwrap();
    let Tensor::U64(packed) = to_tensor(param).unwrap() else {
        panic!("uint64 deq_scale")
    };
    assert_eq!(unpack_deq_scale(packed[0]).scale, deq19);
    assert!(
        deploy
            .metadata_props
            .iter()
            .any(|p| p.value() == "FORCE_FP16_QUANT")
    );

    // Simulated: the fp16 code, in the deploy and the fake-quant model; the
    // float32 code without the mode.
    let out = d.join("out");
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs();
    for model in ["fp16_deploy_model.onnx", "fp16_fake_quant_model.onnx"] {
        let y = run_model(&d.join(model), &d.join("x.npy"), &out, &[]);
        assert!(
            close(y, y16),
            "{model}: {y}, want {y16} (code 101), not {y32}"
        );
    }
    let y = run_model(
        &d.join("plain_deploy_model.onnx"),
        &d.join("x.npy"),
        &out,
        &[],
    );
    assert!(close(y, y32), "plain: {y} vs {y32}");

    // A deploy model made elsewhere in that mode carries no mark: --fp16-quant
    // asks for the fp16 arithmetic.
    let mut unmarked = deploy.clone();
    unmarked.metadata_props.clear();
    save_model(&unmarked, &d.join("unmarked.onnx")).unwrap();
    let y = run_model(&d.join("unmarked.onnx"), &d.join("x.npy"), &out, &[]);
    assert!(close(y, 100.0 * 127.0 * deq19), "unmarked: {y}");
    let y = run_model(
        &d.join("unmarked.onnx"),
        &d.join("x.npy"),
        &out,
        &["--fp16-quant"],
    );
    assert!(close(y, y16), "unmarked with --fp16-quant: {y} vs {y16}");
}

#[test]
fn the_mode_is_read_from_both_config_files() {
    use ascend_quant::quant::config::QuantConfig;
    let layers = vec![("fc".to_string(), "Gemm".to_string())];
    let json = QuantConfig::from_json_str(
        r#"{"fakequant_precision_mode": "FORCE_FP16_QUANT"}"#,
        "c.json",
        &layers,
    )
    .unwrap();
    assert!(json.fp16_quant);
    // Written back, it reads the same.
    let again = QuantConfig::from_json_str(&json.to_json().to_string(), "c.json", &layers).unwrap();
    assert!(again.fp16_quant);
    let e =
        QuantConfig::from_json_str(r#"{"fakequant_precision_mode": "FP16"}"#, "c.json", &layers)
            .unwrap_err()
            .to_string();
    assert!(e.contains("FORCE_FP16_QUANT"), "{e}");
    let simple = ascend_quant::quant::simple_config::from_simple_config_str(
        "fakequant_precision_mode: FORCE_FP16_QUANT\n",
        "q.cfg",
        &layers,
    )
    .unwrap();
    assert!(simple.fp16_quant);
    let plain = ascend_quant::quant::simple_config::from_simple_config_str(
        "batch_num: 2\n",
        "q.cfg",
        &layers,
    )
    .unwrap();
    assert!(!plain.fp16_quant);
}

/// `qat` takes the mode from its retrain config: the trained deploy model is
/// marked and every dequantization factor has AMCT's S19 form (the low 13
/// bits clear); without the key, neither.
#[test]
fn qat_writes_fp16_quant_models_when_its_config_asks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("retrain.json");
    std::fs::write(
        &cfg,
        r#"{"version": 1, "batch_num": 1, "fakequant_precision_mode": "FORCE_FP16_QUANT"}"#,
    )
    .unwrap();
    let plain = d.join("plain.json");
    std::fs::write(&plain, r#"{"version": 1, "batch_num": 1}"#).unwrap();
    for (prefix, config) in [("fp16", &cfg), ("plain", &plain)] {
        let o = bin()
            .args(["qat", "--quiet", "--model"])
            .arg(common::digits().join("digits_cnn.onnx"))
            .arg("--data")
            .arg(common::digits().join("calib_x.npy"))
            .args(["--steps", "1", "--batch-size", "10", "--config"])
            .arg(config)
            .arg("--output")
            .arg(d.join(prefix))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let factors = |prefix: &str| {
        let m = load_model(&d.join(format!("{prefix}_deploy_model.onnx"))).unwrap();
        let g = m.graph.as_ref().unwrap();
        let bits: Vec<u32> = g
            .node
            .iter()
            .filter(|n| n.op_type() == "AscendDequant")
            .flat_map(|n| {
                let t = g
                    .initializer
                    .iter()
                    .find(|t| t.name() == n.input[1])
                    .unwrap();
                let Tensor::U64(p) = to_tensor(t).unwrap() else {
                    panic!("uint64 deq_scale")
                };
                p.iter()
                    .map(|&v| unpack_deq_scale(v).scale.to_bits())
                    .collect::<Vec<_>>()
            })
            .collect();
        let marked = m
            .metadata_props
            .iter()
            .any(|p| p.value() == "FORCE_FP16_QUANT");
        (bits, marked)
    };
    let (fp16, marked) = factors("fp16");
    assert!(marked && fp16.len() >= 4, "{marked} {}", fp16.len());
    assert!(fp16.iter().all(|b| b & 0x1FFF == 0), "not S19: {fp16:x?}");
    let (plain, marked) = factors("plain");
    assert!(!marked);
    assert!(
        plain.iter().any(|b| b & 0x1FFF != 0),
        "float32 factors have low bits"
    );
}
