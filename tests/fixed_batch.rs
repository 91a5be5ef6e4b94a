//! Models exported for batch 1 whose graph only holds for batch 1 (input
//! fixed at `[1, 3, 8, 8]`, a `Reshape` to the constant `[1, -1]` before the
//! classifier, as EfficientNet-Lite's TF export has): every command and
//! every pass that runs the model must run it as it was made to, sample by
//! sample, and compute what it computes on a twin exported with a free
//! batch (`[N, 3, 8, 8]`, `Reshape [-1, 1536]`), which is the reference.

mod common;

use ascend_quant::data::write_npy;
use ascend_quant::onnx::builder::node;
use ascend_quant::onnx::proto::AttributeProto;
use ascend_quant::onnx::{GraphProto, ModelProto, Storage, save_model, to_proto};
use ascend_quant::tensor::Tensor;
use common::{bin, model_of, signed_values, value_info};
use ndarray::{ArrayD, IxDyn};
use std::path::PathBuf;
use std::process::Output;

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    ascend_quant::onnx::attr::attr_ints(name, v)
}

fn f32s(name: &str, shape: &[usize], seed: u64, scale: f32) -> ascend_quant::onnx::TensorProto {
    let n = shape.iter().product();
    let v = signed_values(seed, n).iter().map(|x| x * scale).collect();
    to_proto(
        name,
        &Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()),
        Storage::Raw,
    )
}

/// Conv 3→8 (3×3) + Relu, Conv 8→24 (1×1) + Relu, Reshape, Gemm 1536→20:
/// more channels than a pass's batch of 16 samples.
/// `batch`: the declared batch (`None`: symbolic) and the Reshape's shape.
fn model(batch: Option<i64>) -> ModelProto {
    let shape = match batch {
        Some(b) => vec![b, -1],
        None => vec![-1, 1536],
    };
    let n = batch.unwrap_or(-1);
    model_of(GraphProto {
        name: Some("fixed".into()),
        node: vec![
            node(
                "Conv",
                "/stem/Conv",
                &["x", "w1", "b1"],
                &["c1"],
                vec![ints("pads", &[1, 1, 1, 1])],
            ),
            node("Relu", "/stem/Relu", &["c1"], &["r1"], vec![]),
            node("Conv", "/head/Conv", &["r1", "w2", "b2"], &["c2"], vec![]),
            node("Relu", "/head/Relu", &["c2"], &["r2"], vec![]),
            node("Reshape", "/Reshape", &["r2", "shape"], &["f"], vec![]),
            node(
                "Gemm",
                "/_fc/Gemm",
                &["f", "wf", "bf"],
                &["y"],
                vec![ascend_quant::onnx::attr::attr_int("transB", 1)],
            ),
        ],
        initializer: vec![
            f32s("w1", &[8, 3, 3, 3], 1, 0.4),
            f32s("b1", &[8], 2, 0.1),
            f32s("w2", &[24, 8, 1, 1], 3, 0.5),
            f32s("b2", &[24], 4, 0.1),
            f32s("wf", &[20, 1536], 5, 0.05),
            f32s("bf", &[20], 6, 0.1),
            to_proto(
                "shape",
                &Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), shape).unwrap()),
                Storage::Raw,
            ),
        ],
        input: vec![value_info("x", &[n, 3, 8, 8])],
        output: vec![value_info("y", &[n, 20])],
        ..Default::default()
    })
}

/// The fixed-batch model, its free-batch twin, 40 calibration samples and labels.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        save_model(&model(Some(1)), &dir.path().join("fixed.onnx")).unwrap();
        save_model(&model(None), &dir.path().join("free.onnx")).unwrap();
        let x = ArrayD::from_shape_vec(IxDyn(&[40, 3, 8, 8]), signed_values(7, 40 * 192)).unwrap();
        write_npy(&dir.path().join("x.npy"), &Tensor::F32(x)).unwrap();
        let y = ArrayD::from_shape_vec(IxDyn(&[40]), (0..40).map(|i| i % 10).collect()).unwrap();
        write_npy(&dir.path().join("y.npy"), &Tensor::I64(y)).unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `args` (with `{model}` and `{dir}` substituted) on both models;
    /// each must succeed. Returns the two outputs, fixed first.
    fn both(&self, args: &[&str]) -> [Output; 2] {
        ["fixed", "free"].map(|which| {
            let model = self.path(&format!("{which}.onnx"));
            let out = self.dir.path().join(which);
            std::fs::create_dir_all(&out).unwrap();
            let args: Vec<String> = args
                .iter()
                .map(|a| {
                    a.replace("{model}", model.to_str().unwrap())
                        .replace("{out}", out.to_str().unwrap())
                        .replace("{dir}", self.dir.path().to_str().unwrap())
                })
                .collect();
            let o = bin().args(&args).output().unwrap();
            assert!(
                o.status.success(),
                "{which}: {args:?} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            o
        })
    }

    /// The record both runs wrote, as numbers: they must agree to `tol` relative.
    fn same_records(&self, tol: f64) {
        let read = |which: &str| {
            std::fs::read_to_string(self.dir.path().join(which).join("q_record.txt")).unwrap()
        };
        assert_same_numbers(&read("fixed"), &read("free"), tol, "record");
    }
}

/// Every number in `a` and `b`, in order, within `tol` relative of each other.
fn assert_same_numbers(a: &str, b: &str, tol: f64, what: &str) {
    let numbers = |t: &str| -> Vec<f64> {
        t.split(|c: char| !(c.is_ascii_digit() || "-+.eE".contains(c)))
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    let (x, y) = (numbers(a), numbers(b));
    assert_eq!(x.len(), y.len(), "{what}: {a}\n---\n{b}");
    assert!(x.len() > 20, "{what}: too few numbers to compare: {a}");
    for (p, q) in x.iter().zip(&y) {
        assert!(
            (p - q).abs() <= tol * p.abs().max(q.abs()).max(1e-6),
            "{what}: {p} vs {q}\n{a}\n---\n{b}"
        );
    }
}

fn report(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn bias_correction_and_the_accuracy_recipe_run_sample_by_sample() {
    let f = Fixture::new();
    for extra in [&["--bias-correction"][..], &["--optimize"]] {
        let mut args = vec![
            "calibrate",
            "--model",
            "{model}",
            "--data",
            "{dir}/x.npy",
            "--json",
            "--quiet",
            "--output",
            "{out}/q",
        ];
        args.extend(extra);
        let [fixed, free] = f.both(&args);
        f.same_records(1e-5);
        // The per-layer cosines (float vs fake-quant on the first samples) agree too.
        let cosines = |o: &Output| {
            report(o)["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["cosine"].as_f64().unwrap())
                .collect::<Vec<_>>()
        };
        let (a, b) = (cosines(&fixed), cosines(&free));
        assert_eq!(a.len(), 3, "{a:?}");
        for (p, q) in a.iter().zip(&b) {
            assert!(
                p.is_finite() && (p - q).abs() < 1e-5,
                "{extra:?}: {a:?} vs {b:?}"
            );
        }
    }
}

#[test]
fn adaround_reads_the_classifier_inputs_of_every_sample() {
    let f = Fixture::new();
    let config = f.path("ada.json");
    std::fs::write(
        &config,
        r#"{"batch_num": 40, "/_fc/Gemm": {"weight_quant_params": {"wts_algo": "ada_quantize"}},
            "/head/Conv": {"weight_quant_params": {"wts_algo": "ada_quantize"}}}"#,
    )
    .unwrap();
    f.both(&[
        "calibrate",
        "--model",
        "{model}",
        "--data",
        "{dir}/x.npy",
        "--config",
        config.to_str().unwrap(),
        "--quiet",
        "--output",
        "{out}/q",
    ]);
    f.same_records(1e-5);
    let weights = |which: &str| {
        let m =
            ascend_quant::onnx::load_model(&f.dir.path().join(which).join("q_deploy_model.onnx"))
                .unwrap();
        let g = m.graph.unwrap();
        let t = g
            .initializer
            .iter()
            .find(|t| t.dims == [1536, 20])
            .unwrap()
            .clone();
        ascend_quant::onnx::to_tensor(&t).unwrap()
    };
    assert_eq!(
        weights("fixed"),
        weights("free"),
        "the learned rounding differs"
    );
}

#[test]
fn auto_compare_and_qat_run_a_fixed_batch_model() {
    let f = Fixture::new();
    let [fixed, free] = f.both(&[
        "auto",
        "--model",
        "{model}",
        "--data",
        "{dir}/x.npy",
        "--eval-data",
        "{dir}/x.npy",
        "--metric",
        "cosine",
        "--max-drop",
        "100",
        "--json",
        "--quiet",
        "--output",
        "{out}/q",
    ]);
    let score = |o: &Output| report(o)["final_metric"].as_f64().unwrap();
    assert!(
        (score(&fixed) - score(&free)).abs() < 1e-6,
        "{} vs {}",
        score(&fixed),
        score(&free)
    );

    let [fixed, free] = f.both(&[
        "compare",
        "--float",
        "{model}",
        "--quant",
        "{out}/q_fake_quant_model.onnx",
        "--data",
        "{dir}/x.npy",
        "--batch-size",
        "16",
        "--json",
    ]);
    assert_same_numbers(
        &String::from_utf8_lossy(&fixed.stdout),
        &String::from_utf8_lossy(&free.stdout),
        1e-3,
        "compare",
    );

    for labels in [&["--labels", "{dir}/y.npy"][..], &[]] {
        let mut args = vec![
            "qat",
            "--model",
            "{model}",
            "--data",
            "{dir}/x.npy",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--quiet",
            "--json",
            "--output",
            "{out}/q",
        ];
        args.extend(labels);
        f.both(&args);
        f.same_records(1e-4);
    }
}

#[test]
fn the_fixture_models_differ_only_in_their_batch() {
    // The twin is a fair reference: one sample gives the same output on both.
    let x = ArrayD::from_shape_vec(IxDyn(&[1, 3, 8, 8]), signed_values(9, 192)).unwrap();
    let a = common::run_x_to_y(&model(Some(1)), &x);
    let b = common::run_x_to_y(&model(None), &x);
    assert_eq!(a, b);
}
