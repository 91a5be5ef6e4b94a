//! AMCT's two-input MatMul (attention's `QKᵀ` and `softmax·V`): both
//! operands quantized int8 symmetric, an int8 × int8 MatMul, and one
//! AscendDequant with the product of the two scales
//! (`docs/deploy-format.md`, two-input MatMul). Checked against scales and
//! integer sums computed here, on both engines, through the record and the
//! configuration.

mod common;

use ascend_quant::data::Dataset;
use ascend_quant::deploy_format::{QuantAttrs, unpack_deq_scale};
use ascend_quant::onnx::builder::node;
use ascend_quant::onnx::proto::GraphProto;
use ascend_quant::onnx::{ModelProto, to_tensor};
use ascend_quant::quant::calibrate::{Outcome, RunSettings, calibrate};
use ascend_quant::quant::config::QuantConfig;
use ascend_quant::quant::observe::ActAlgo;
use ascend_quant::sim::{Executor, NativeExecutor, RtenExecutor, SessionOptions};
use ascend_quant::tensor::Tensor;
use common::{signed_values, value_info};
use ndarray::{ArrayD, IxDyn};

const A: [usize; 4] = [2, 3, 4, 8];
const B: [usize; 4] = [2, 3, 8, 5];

/// `y = MatMul(a, b)` of two graph inputs, batched over two axes.
fn model() -> ModelProto {
    let dims = |s: [usize; 4]| s.map(|d| d as i64);
    common::model_of(GraphProto {
        name: Some("attention_product".into()),
        node: vec![node("MatMul", "scores", &["a", "b"], &["y"], vec![])],
        input: vec![value_info("a", &dims(A)), value_info("b", &dims(B))],
        output: vec![value_info("y", &[2, 3, 4, 5])],
        ..Default::default()
    })
}

fn operands(seed: u64) -> (ArrayD<f32>, ArrayD<f32>) {
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    let a = ArrayD::from_shape_vec(IxDyn(&A), signed_values(seed, n(A))).unwrap();
    // The second operand on another scale (and mostly negative), so a mixed-up scale shows.
    let b = ArrayD::from_shape_vec(IxDyn(&B), signed_values(seed + 1, n(B)))
        .unwrap()
        .mapv(|v| 3.0 * v - 1.0);
    (a, b)
}

fn calibrated(m: &ModelProto, config: &QuantConfig, a: &ArrayD<f32>, b: &ArrayD<f32>) -> Outcome {
    let names = ["a".to_string(), "b".to_string()];
    let data = Dataset::from_arrays(
        vec![
            ("a".into(), Tensor::F32(a.clone())),
            ("b".into(), Tensor::F32(b.clone())),
        ],
        &names,
        "t".into(),
    )
    .unwrap();
    let settings = RunSettings {
        batch_size: 2,
        dynamic_batch: false,
        progress: &|_, _| {},
        similarity_samples: 0,
    };
    calibrate(
        m.clone(),
        config,
        &data,
        &ascend_quant::sim::CpuExecutor,
        &settings,
    )
    .unwrap()
}

fn minmax_config(m: &ModelProto) -> QuantConfig {
    let layers = ascend_quant::pipeline::inputs::layer_names(m).unwrap();
    let mut config = QuantConfig::default_for(&layers);
    config.layers[0].1.act_algo = ActAlgo::Minmax;
    config
}

/// Symmetric min-max scale of `x`, by hand: the larger magnitude over 127,
/// or over 128 when the negative side is the larger.
fn symmetric_scale(x: &ArrayD<f32>) -> f32 {
    let (lo, hi) = x
        .iter()
        .fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
    if -lo > hi { -lo / 128.0 } else { hi / 127.0 }
}

#[test]
fn both_operands_are_quantized_symmetric_and_the_sums_are_exact() {
    let m = model();
    let (a, b) = operands(1);
    // Asymmetric activations are asked for everywhere: this layer stays symmetric.
    let mut config = minmax_config(&m);
    config.activation_offset = true;
    let outcome = calibrated(&m, &config, &a, &b);
    let f = &outcome.factors[0];
    assert_eq!(f.layer.second_input.as_deref(), Some("b"));
    assert!(f.weight_q.is_none() && f.bias_q.is_none());
    let (sa, sb) = (symmetric_scale(&a), symmetric_scale(&b));
    assert_eq!(f.act.offset, 0, "symmetric first operand");
    assert!(
        (f.act.scale - sa).abs() <= 1e-6 * sa,
        "{} vs {sa}",
        f.act.scale
    );
    assert_eq!(f.scale_w.len(), 1);
    assert!(
        (f.scale_w[0] - sb).abs() <= 1e-6 * sb,
        "{} vs {sb}",
        f.scale_w[0]
    );

    let (deploy, fake) = outcome.models().unwrap();
    let g = deploy.graph.as_ref().unwrap();
    let mm = g.node.iter().find(|n| n.op_type() == "MatMul").unwrap();
    let producer = |v: &str| {
        g.node
            .iter()
            .find(|n| n.output.iter().any(|o| o == v))
            .unwrap()
    };
    let quants: Vec<QuantAttrs> = mm
        .input
        .iter()
        .map(|v| {
            let q = producer(v);
            assert_eq!(q.op_type(), "AscendQuant", "input {v}");
            QuantAttrs::read(q).unwrap()
        })
        .collect();
    assert_eq!(quants.len(), 2);
    assert!(quants.iter().all(|q| q.offset == 0.0));
    let dq = g
        .node
        .iter()
        .find(|n| n.op_type() == "AscendDequant")
        .unwrap();
    let Tensor::U64(packed) = to_tensor(
        g.initializer
            .iter()
            .find(|t| t.name() == dq.input[1])
            .unwrap(),
    )
    .unwrap() else {
        panic!("uint64 deq_scale")
    };
    assert_eq!(packed.len(), 1);
    let deq = unpack_deq_scale(packed[[0]]).scale;
    assert!(
        (deq - sa * sb).abs() <= 1e-6 * deq,
        "deq {deq} vs {}",
        sa * sb
    );

    // The device: sat(round(x·scale)) per operand, Σ qa·qb in integers, × deq.
    let level =
        |x: f32, q: &QuantAttrs| (x * q.scale).round_ties_even().clamp(-128.0, 127.0) as i64;
    let (ea, eb) = operands(7);
    let mut want = ArrayD::<f32>::zeros(IxDyn(&[2, 3, 4, 5]));
    for i in 0..2 {
        for h in 0..3 {
            for r in 0..4 {
                for c in 0..5 {
                    let acc: i64 = (0..8)
                        .map(|k| {
                            level(ea[[i, h, r, k]], &quants[0])
                                * level(eb[[i, h, k, c]], &quants[1])
                        })
                        .sum();
                    want[[i, h, r, c]] = acc as i32 as f32 * deq;
                }
            }
        }
    }
    let feeds = [("a", Tensor::F32(ea)), ("b", Tensor::F32(eb))];
    let feeds: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (*n, t)).collect();
    let engines: [&dyn Executor; 2] = [&NativeExecutor, &RtenExecutor];
    for e in engines {
        let s = e.prepare(&deploy, &SessionOptions::default()).unwrap();
        let Tensor::F32(got) = s.run(&feeds, &["y"]).unwrap().remove(0) else {
            panic!("float output")
        };
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(differ, 0, "{}: {differ} outputs differ", e.name());
    }
    // The fake-quant model computes the same in standard operators.
    let s = RtenExecutor
        .prepare(&fake, &SessionOptions::default())
        .unwrap();
    let Tensor::F32(got) = s.run(&feeds, &["y"]).unwrap().remove(0) else {
        panic!("float output")
    };
    let worst = got
        .iter()
        .zip(&want)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "fake-quant vs integer reference: {worst}");
}

/// The record carries the second operand's scale as `scale_w` and reads
/// back to the same deploy model; an asymmetric record is refused; a layer
/// switched off in the configuration (as `auto` rolls one back) stays float.
#[test]
fn the_record_and_the_configuration_carry_the_layer() {
    let m = model();
    let (a, b) = operands(3);
    let outcome = calibrated(&m, &minmax_config(&m), &a, &b);
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("m.onnx");
    ascend_quant::onnx::save_model(&m, &model_path).unwrap();
    let prefix = dir.path().join("q");
    let calib = dir.path().join("calib.npz");
    let (ta, tb) = (Tensor::F32(a.clone()), Tensor::F32(b.clone()));
    common::write_npz(&calib, &[("a", &ta), ("b", &tb)]);
    let config_path = dir.path().join("c.json");
    std::fs::write(
        &config_path,
        serde_json::to_string(&minmax_config(&m).to_json()).unwrap(),
    )
    .unwrap();
    let run = |extra: &[&str], output: &std::path::Path| {
        common::bin()
            .args(["calibrate", "--quiet", "--model"])
            .arg(&model_path)
            .arg("--data")
            .arg(&calib)
            .args(["--batch-size", "2"])
            .args(extra)
            .arg("--output")
            .arg(output)
            .output()
            .unwrap()
    };
    let o = run(&["--config", config_path.to_str().unwrap()], &prefix);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let record = std::fs::read_to_string(dir.path().join("q_record.txt")).unwrap();
    let value = |key: &str| -> f32 {
        let line = record
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap();
        line.split(':').nth(1).unwrap().trim().parse().unwrap()
    };
    let f = &outcome.factors[0];
    assert_eq!(value("offset_d"), 0.0);
    assert!((value("scale_d") - f.act.scale).abs() <= 1e-6 * f.act.scale);
    assert!((value("scale_w") - f.scale_w[0]).abs() <= 1e-6 * f.scale_w[0]);
    // compare --analyze names the layer and both inputs it quantizes.
    let o = common::bin()
        .args(["compare", "--json", "--analyze", "--float"])
        .arg(&model_path)
        .arg("--quant")
        .arg(dir.path().join("q_fake_quant_model.onnx"))
        .arg("--data")
        .arg(&calib)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let layer = &v["analysis"]["layers"][0];
    assert_eq!(layer["name"], "scores");
    assert_eq!(layer["op_type"], "MatMul");
    assert_eq!(layer["inputs"], serde_json::json!(["a", "b"]));
    // Read back: the same deploy model.
    let record_path = dir.path().join("q_record.txt");
    let o = run(
        &["--record", record_path.to_str().unwrap()],
        &dir.path().join("r"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(dir.path().join("r_deploy_model.onnx")).unwrap(),
        std::fs::read(dir.path().join("q_deploy_model.onnx")).unwrap()
    );
    // An asymmetric record is refused, naming the layer, and writes nothing.
    let bad = dir.path().join("bad_record.txt");
    std::fs::write(&bad, record.replace("offset_d: 0", "offset_d: 5")).unwrap();
    let o = run(
        &["--record", bad.to_str().unwrap()],
        &dir.path().join("bad"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("'scores'") && err.contains("offset_d 0"),
        "{err}"
    );
    assert!(!dir.path().join("bad_deploy_model.onnx").exists());
    // Switched off in the configuration: no quantization at all.
    let mut off = minmax_config(&m);
    off.layers[0].1.quant_enable = false;
    std::fs::write(&config_path, serde_json::to_string(&off.to_json()).unwrap()).unwrap();
    let o = run(
        &["--config", config_path.to_str().unwrap()],
        &dir.path().join("off"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = ascend_quant::onnx::load_model(&dir.path().join("off_deploy_model.onnx")).unwrap();
    let ops: Vec<String> = d
        .graph
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type().to_string())
        .collect();
    assert_eq!(ops, ["MatMul"], "the layer stays float");
}

/// `auto` ranks and rolls back a two-input MatMul like any layer (its
/// sensitivity replays it on both float inputs), scoring the output it is
/// told to with the nearest-neighbour agreement.
#[test]
fn auto_ranks_the_layer_and_scores_nearest_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("m.onnx");
    ascend_quant::onnx::save_model(&model(), &model_path).unwrap();
    // 16 samples: 8 batches of the model's batch of 2.
    let stack = |seed: u64| {
        let parts: Vec<(ArrayD<f32>, ArrayD<f32>)> =
            (0..8).map(|k| operands(seed + 2 * k)).collect();
        let a: Vec<_> = parts.iter().map(|p| p.0.view()).collect();
        let b: Vec<_> = parts.iter().map(|p| p.1.view()).collect();
        (
            ndarray::concatenate(ndarray::Axis(0), &a).unwrap(),
            ndarray::concatenate(ndarray::Axis(0), &b).unwrap(),
        )
    };
    let write = |name: &str, t: &ArrayD<f32>| {
        let p = dir.path().join(name);
        ascend_quant::data::write_npy(&p, &Tensor::F32(t.clone())).unwrap();
        p
    };
    let (ca, cb) = stack(100);
    let (ea, eb) = stack(200);
    let arg = |input: &str, p: std::path::PathBuf| format!("{input}={}", p.display());
    let o = common::bin()
        .args(["auto", "--quiet", "--model"])
        .arg(&model_path)
        .args(["--data", &arg("a", write("ca.npy", &ca))])
        .args(["--data", &arg("b", write("cb.npy", &cb))])
        .args(["--eval-data", &arg("a", write("ea.npy", &ea))])
        .args(["--eval-data", &arg("b", write("eb.npy", &eb))])
        .args([
            "--metric",
            "nn-agreement",
            "--metric-output",
            "y",
            "--max-drop",
            "50",
        ])
        .arg("--output")
        .arg(dir.path().join("auto"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let ranking: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("auto_auto_ranking.json")).unwrap(),
    )
    .unwrap();
    let text = ranking.to_string();
    assert!(text.contains("\"scores\""), "{text}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("auto_quant_report.json")).unwrap(),
    )
    .unwrap();
    let r = report.to_string();
    assert!(r.contains("nn-agreement"), "{r}");
    // An output the model does not have is named in the error.
    let o = common::bin()
        .args(["auto", "--quiet", "--model"])
        .arg(&model_path)
        .args(["--data", &arg("a", dir.path().join("ca.npy"))])
        .args(["--data", &arg("b", dir.path().join("cb.npy"))])
        .args(["--eval-data", &arg("a", dir.path().join("ea.npy"))])
        .args(["--eval-data", &arg("b", dir.path().join("eb.npy"))])
        .args(["--metric-output", "nope"])
        .arg("--output")
        .arg(dir.path().join("auto2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("'nope' is not an output") && err.contains("outputs are y"),
        "{err}"
    );
}
