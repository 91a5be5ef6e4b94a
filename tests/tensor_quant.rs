//! Tensor quantization (`tensor_quantize`): inputs of Add and MaxPool
//! quantized on their own, checked against a hand computation on a model
//! built here, the deploy model on the simulator, the record and the CLI.

mod common;

use ascend_quant::data::Dataset;
use ascend_quant::onnx::builder::node;
use ascend_quant::onnx::proto::{AttributeProto, OperatorSetIdProto};
use ascend_quant::onnx::{GraphProto, ModelProto, load_model};
use ascend_quant::quant::calibrate::{RunSettings, calibrate};
use ascend_quant::quant::config::{QuantConfig, TensorQuantConfig};
use ascend_quant::quant::params::ActParams;
use ascend_quant::sim::{CpuExecutor, Executor, SessionOptions};
use ascend_quant::tensor::Tensor;
use common::value_info;
use ndarray::{ArrayD, IxDyn};

/// `y = MaxPool2x2(Relu(a) + b)`: nothing for layer quantization, two Add inputs and a MaxPool input for tensor quantization.
fn model() -> ModelProto {
    let ints = |name: &str, v: &[i64]| AttributeProto {
        name: Some(name.into()),
        r#type: Some(7),
        ints: v.to_vec(),
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(13),
        }],
        graph: Some(GraphProto {
            name: Some("tq".into()),
            node: vec![
                node("Relu", "relu", &["a"], &["r"], vec![]),
                node("Add", "add", &["r", "b"], &["s"], vec![]),
                node(
                    "MaxPool",
                    "pool",
                    &["s"],
                    &["y"],
                    vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
                ),
            ],
            input: vec![
                value_info("a", &[4, 3, 4, 4]),
                value_info("b", &[4, 3, 4, 4]),
            ],
            output: vec![value_info("y", &[4, 3, 2, 2])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn data(seed: u64, n: usize) -> ArrayD<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v = (0..n * 48)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 1.5
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(&[n, 3, 4, 4]), v).unwrap()
}

/// AMCT's fake quantization: `(clip(round(x · (1/s)) + o) − o) · s`.
fn fq(x: f32, p: ActParams) -> f32 {
    let inv = 1.0 / p.scale;
    let q = ((x * inv).round_ties_even() + p.offset as f32).clamp(-128.0, 127.0);
    (q - p.offset as f32) * p.scale
}

fn run(model: &ModelProto, a: &ArrayD<f32>, b: &ArrayD<f32>) -> ArrayD<f32> {
    let s = CpuExecutor
        .prepare(model, &SessionOptions::default())
        .unwrap();
    let (a, b) = (Tensor::F32(a.clone()), Tensor::F32(b.clone()));
    let Tensor::F32(y) = s.run(&[("a", &a), ("b", &b)], &["y"]).unwrap().remove(0) else {
        panic!("float output")
    };
    y
}

#[test]
fn add_and_maxpool_inputs_round_trip_through_int8_as_computed_by_hand() {
    let m = model();
    let target = |name: &str, i: usize, asymmetric: bool| TensorQuantConfig {
        layer_name: name.into(),
        input_index: i,
        act_algo: Default::default(),
        asymmetric: Some(asymmetric),
    };
    let mut config = QuantConfig::default_for(&[]);
    config.batch_num = Some(2);
    config.tensor_quantize = vec![
        target("add", 0, true),
        target("add", 1, false),
        target("pool", 0, true),
    ];
    let dataset = Dataset::from_arrays(
        vec![
            ("a".into(), Tensor::F32(data(1, 8))),
            ("b".into(), Tensor::F32(data(2, 8))),
        ],
        &["a".into(), "b".into()],
        "synthetic".into(),
    )
    .unwrap();
    let settings = RunSettings {
        batch_size: 4,
        dynamic_batch: false,
        progress: &|_, _| {},
        similarity_samples: 0,
    };
    let out = calibrate(m.clone(), &config, &dataset, &CpuExecutor, &settings).unwrap();
    let keys: Vec<&str> = out.tensors.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys, ["add:0", "add:1", "pool:0"]);
    let [pa, pb, ps] = [0, 1, 2].map(|i| out.tensors[i].act);
    assert!(pa.offset != 0 && pb.offset == 0, "{pa:?} {pb:?}");
    // Hand computation on fresh data.
    let (a, b) = (data(7, 4), data(8, 4));
    let mut want = ArrayD::<f32>::zeros(IxDyn(&[4, 3, 2, 2]));
    for n in 0..4 {
        for c in 0..3 {
            for i in 0..2 {
                for j in 0..2 {
                    let mut best = f32::NEG_INFINITY;
                    for (di, dj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let at = [n, c, 2 * i + di, 2 * j + dj];
                        let s = fq(a[at].max(0.0), pa) + fq(b[at], pb);
                        best = best.max(fq(s, ps));
                    }
                    want[[n, c, i, j]] = best;
                }
            }
        }
    }
    let fake = run(&out.models().unwrap().1, &a, &b);
    let deploy = run(&out.models().unwrap().0, &a, &b);
    let float = run(&m, &a, &b);
    let worst = |x: &ArrayD<f32>| {
        x.iter()
            .zip(want.iter())
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(worst(&fake) < 1e-5, "fake-quant vs hand: {}", worst(&fake));
    // The device rounds after adding the offset: equal but for exact ties.
    assert!(
        worst(&deploy) <= ps.scale * 1.001,
        "deploy vs hand: {}",
        worst(&deploy)
    );
    assert!(worst(&float) > 1e-4, "the quantization is visible");
    // Deploy nodes and attributes.
    let (deploy, _) = out.models().unwrap();
    let g = deploy.graph.as_ref().unwrap();
    let anti = g
        .node
        .iter()
        .find(|n| n.name() == "pool.input0.anti_quant")
        .unwrap();
    assert_eq!(anti.op_type(), "AscendAntiQuant");
    let f = |n: &ascend_quant::onnx::NodeProto, k: &str| {
        n.attribute.iter().find(|a| a.name() == k).unwrap().f()
    };
    assert_eq!(
        (f(anti, "scale"), f(anti, "offset")),
        (ps.scale, ps.offset as f32)
    );
    let quant = g
        .node
        .iter()
        .find(|n| n.name() == "pool.input0.quant")
        .unwrap();
    assert_eq!(quant.op_type(), "AscendQuant");
    assert_eq!(f(quant, "scale"), 1.0 / ps.scale);
    let pool = g.node.iter().find(|n| n.name() == "pool").unwrap();
    assert_eq!(pool.input[0], anti.output[0]);
    assert_eq!(anti.input[0], quant.output[0]);
}

#[test]
fn the_cli_flag_the_configs_and_the_record_agree() {
    let dir = tempfile::tempdir().unwrap();
    let o = common::calibrate_digits(&dir.path().join("cli"))
        .args(["--quiet", "--tensor-quantize", "/5/MaxPool"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The default JSON config (every layer) plus the tensor quantization.
    let json = dir.path().join("c.json");
    let o = common::bin()
        .arg("config")
        .arg("--model")
        .arg(common::digits().join("digits_cnn.onnx"))
        .arg("--output")
        .arg(&json)
        .output()
        .unwrap();
    assert!(o.status.success());
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    v["tensor_quantize"] = serde_json::json!([{"layer_name": "/5/MaxPool", "input_index": 0,
        "activation_quant_params": {"act_algo": "ifmr"}}]);
    std::fs::write(&json, v.to_string()).unwrap();
    let cfg = dir.path().join("c.cfg");
    std::fs::write(
        &cfg,
        "tensor_quantize { layer_name: \"/5/MaxPool\" input_index: 0 ifmr_quantize { } }\n",
    )
    .unwrap();
    for (name, flag, file) in [
        ("json", "--config", &json),
        ("simple", "--simple-config", &cfg),
    ] {
        let o = common::calibrate_digits(&dir.path().join(name))
            .args(["--quiet", "--batch-num", "100", flag])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        for suffix in ["_deploy_model.onnx", "_record.txt"] {
            let a = std::fs::read(dir.path().join(format!("cli{suffix}"))).unwrap();
            let b = std::fs::read(dir.path().join(format!("{name}{suffix}"))).unwrap();
            assert!(
                a == b,
                "{name}{suffix} differs from the --tensor-quantize run"
            );
        }
    }
    let record = std::fs::read_to_string(dir.path().join("cli_record.txt")).unwrap();
    assert!(
        record.contains("key: \"/5/MaxPool:0\"") && record.contains("is_tensor_quantize: true"),
        "{record}"
    );
    // The record rebuilds the same models.
    let o = common::bin()
        .arg("calibrate")
        .arg("--model")
        .arg(common::digits().join("digits_cnn.onnx"))
        .arg("--record")
        .arg(dir.path().join("cli_record.txt"))
        .arg("--output")
        .arg(dir.path().join("again"))
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for suffix in ["_deploy_model.onnx", "_fake_quant_model.onnx"] {
        let a = std::fs::read(dir.path().join(format!("cli{suffix}"))).unwrap();
        let b = std::fs::read(dir.path().join(format!("again{suffix}"))).unwrap();
        assert!(a == b, "{suffix} from the record differs");
    }
    let deploy = load_model(&dir.path().join("cli_deploy_model.onnx")).unwrap();
    let ops: Vec<&str> = deploy
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type())
        .collect();
    assert_eq!(ops.iter().filter(|o| **o == "AscendAntiQuant").count(), 1);
    // Mistakes are named.
    for (spec, needle) in [
        ("/0/Conv", "only the inputs of MaxPool and Add"),
        ("/5/MaxPool:3", "input_index 3 does not exist"),
        ("nope", "its MaxPool and Add nodes are: /5/MaxPool"),
    ] {
        let o = common::calibrate_digits(&dir.path().join("bad"))
            .args(["--quiet", "--tensor-quantize", spec])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{spec}: {err}");
        assert!(err.contains(needle), "{spec}: {err}");
    }
}

#[test]
fn auto_keeps_the_tensor_quantization_in_what_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let o = common::bin()
        .args(["auto", "--quiet", "--model"])
        .arg(common::digits().join("digits_cnn.onnx"))
        .arg("--data")
        .arg(common::digits().join("calib_x.npy"))
        .arg("--eval-data")
        .arg(common::digits().join("test_x.npy"))
        .arg("--labels")
        .arg(common::digits().join("test_y.npy"))
        .args([
            "--batch-size",
            "4",
            "--batch-num",
            "10",
            "--tensor-quantize",
            "/5/MaxPool",
        ])
        .arg("--output")
        .arg(dir.path().join("a"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let record = std::fs::read_to_string(dir.path().join("a_record.txt")).unwrap();
    assert!(record.contains("/5/MaxPool:0"), "{record}");
    for m in ["a_deploy_model.onnx", "a_fake_quant_model.onnx"] {
        let model = load_model(&dir.path().join(m)).unwrap();
        let g = model.graph.unwrap();
        let pool = g.node.iter().find(|n| n.name() == "/5/MaxPool").unwrap();
        assert!(
            pool.input[0].contains("anti_quant"),
            "{m}: {:?}",
            pool.input
        );
    }
}
