//! The trainer on a transformer laid out as PyTorch exports Hugging Face
//! models (`scripts/make_transformer_fixture.py`: int64 ids and mask,
//! embeddings by Gather, computed Reshape shapes, LayerNormalization and its
//! decomposed form, attention's two-input MatMuls, masks by Add and Where,
//! Erf GELU, mean pooling): forward against onnxruntime's committed outputs,
//! gradients against finite differences, attention's fake quantization
//! against a hand computation, and `qat` end to end.

mod common;

use ascend_quant::onnx::{ModelProto, load_model};
use ascend_quant::sim::{Executor, SessionOptions};
use ascend_quant::tensor::Tensor;
use ascend_quant::train::graph::{LayerQuant, TrainGraph};
use ndarray::{ArrayD, Axis};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transformer")
}

fn model() -> ModelProto {
    load_model(&fixtures().join("tiny_bert.onnx")).unwrap()
}

fn sentences() -> Vec<(String, Tensor)> {
    let mut npz =
        ndarray_npy::NpzReader::new(std::fs::File::open(fixtures().join("sentences.npz")).unwrap())
            .unwrap();
    ["input_ids", "attention_mask"]
        .iter()
        .map(|n| {
            let a: ArrayD<i64> = npz.by_name(&format!("{n}.npy")).unwrap();
            (n.to_string(), Tensor::I64(a))
        })
        .collect()
}

fn ort(name: &str) -> ArrayD<f32> {
    ndarray_npy::read_npy(fixtures().join(name)).unwrap()
}

fn feeds(s: &[(String, Tensor)]) -> Vec<(&str, &Tensor)> {
    s.iter().map(|(n, t)| (n.as_str(), t)).collect()
}

fn max_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn the_forward_pass_matches_onnxruntime() {
    let g = TrainGraph::new(&model()).unwrap();
    let s = sentences();
    let acts = g.forward_tensors(&feeds(&s)).unwrap();
    for (name, file) in [("pooled", "ort_pooled.npy"), ("tokens", "ort_tokens.npy")] {
        let d = max_diff(acts.get(&g, name).unwrap(), &ort(file));
        assert!(d < 2e-5, "{name}: {d}");
    }
}

/// ⟨∂L/∂`name`, d⟩ against the central difference of L = Σ c·pooled along
/// random directions d of the whole tensor.
fn check_directional(g: &TrainGraph, name: &str) {
    let s = sentences();
    let acts = g.forward_tensors(&feeds(&s)).unwrap();
    let y = acts.get(g, "pooled").unwrap();
    let c = ArrayD::from_shape_vec(y.raw_dim(), common::signed_values(5, y.len())).unwrap();
    let grads = g.backward(&acts, &[("pooled", c.clone())]).unwrap();
    let analytic = grads
        .get(g, name)
        .unwrap_or_else(|| panic!("no gradient for {name}"));
    for seed in [11, 12] {
        let d = common::signed_values(seed, analytic.len());
        let along: f64 = analytic
            .iter()
            .zip(&d)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let loss_at = |t: f32| -> f64 {
            let mut g2 = g.clone();
            for (v, dv) in g2.constant_mut(name).unwrap().iter_mut().zip(&d) {
                *v += t * dv;
            }
            let a = g2.forward_tensors(&feeds(&s)).unwrap();
            a.get(&g2, "pooled")
                .unwrap()
                .iter()
                .zip(c.iter())
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        };
        let h = 1e-3f32;
        let fd = (loss_at(h) - loss_at(-h)) / (2.0 * f64::from(h));
        assert!(
            (along - fd).abs() <= 2e-3 + 1e-2 * fd.abs(),
            "{name} (direction {seed}): backward {along}, finite difference {fd}"
        );
    }
}

#[test]
fn gradients_match_finite_differences_through_every_transformer_operator() {
    let g = TrainGraph::new(&model()).unwrap();
    for name in [
        "attn.query.weight",   // two-input MatMul, mask, Where, Softmax, computed Reshape
        "attn.value.weight",   // softmax·V, Transpose, Reshape by Slice'd shape
        "attn.output.bias",    // decomposed LayerNorm (ReduceMean, Pow, Sqrt, Div)
        "ffn.in.weight",       // Erf GELU
        "ln0.g",               // LayerNormalization's scale
        "ln2.b",               // its bias, mean pooling
        "word_embeddings",     // Gather by token ids
        "position_embeddings", // Gather by ids Sliced from a buffer
    ] {
        check_directional(&g, name);
    }
}

#[test]
fn frozen_constants_get_no_gradient() {
    let mut g = TrainGraph::new(&model()).unwrap();
    g.train_only(&["ffn.in.weight".to_string()]);
    let s = sentences();
    let acts = g.forward_tensors(&feeds(&s)).unwrap();
    let y = acts.get(&g, "pooled").unwrap().clone();
    let grads = g.backward(&acts, &[("pooled", y)]).unwrap();
    assert!(grads.get(&g, "ffn.in.weight").is_some());
    assert!(grads.get(&g, "word_embeddings").is_none());
    assert!(grads.get(&g, "attn.query.weight").is_none());
}

/// Round half to even onto the symmetric int8 grid of step `s`.
fn fake_int8(x: f32, s: f32) -> f32 {
    (x / s).round_ties_even().clamp(-128.0, 127.0) * s
}

#[test]
fn attention_matmul_is_fake_quantized_on_both_inputs() {
    let mut g = TrainGraph::new(&model()).unwrap();
    let (s0, s1) = (0.02f32, 0.015f32);
    g.set_quant(
        "attn/MatMul_qk",
        LayerQuant {
            clip_min: -128.0 * s0,
            clip_max: 127.0 * s0,
            fixed_min: false,
            channel_wise: false,
            second: Some((-128.0 * s1, 127.0 * s1)),
            ..Default::default()
        },
    )
    .unwrap();
    let s = sentences();
    let acts = g.forward_tensors(&feeds(&s)).unwrap();
    let q = acts.get(&g, "q/Transpose").unwrap(); // [b, heads, s, d]
    let k = acts.get(&g, "k/Transpose").unwrap(); // [b, heads, d, s]
    let ours = acts.get(&g, "attn/MatMul_qk").unwrap();
    let sh = q.shape().to_vec();
    let mut expected = ArrayD::<f32>::zeros(ours.raw_dim());
    for b in 0..sh[0] {
        for h in 0..sh[1] {
            for i in 0..sh[2] {
                for j in 0..sh[2] {
                    let mut sum = 0f64;
                    for d in 0..sh[3] {
                        let a = fake_int8(q[[b, h, i, d]], s0);
                        let c = fake_int8(k[[b, h, d, j]], s1);
                        sum += f64::from(a) * f64::from(c);
                    }
                    expected[[b, h, i, j]] = sum as f32;
                }
            }
        }
    }
    assert!(max_diff(ours, &expected) < 1e-4);
    // Gradients pass straight through inside the ranges to the weights.
    let y = acts.get(&g, "pooled").unwrap().clone();
    let grads = g.backward(&acts, &[("pooled", y)]).unwrap();
    assert!(
        grads
            .get(&g, "attn.key.weight")
            .is_some_and(|w| w.iter().any(|v| *v != 0.0))
    );
}

/// The mean cosine of each row of `a` with the same row of `b`.
fn mean_cosine(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    let rows: Vec<f64> = a
        .axis_iter(Axis(0))
        .zip(b.axis_iter(Axis(0)))
        .map(|(x, y)| {
            let dot: f64 = x
                .iter()
                .zip(&y)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            let n = |v: &ndarray::ArrayViewD<f32>| {
                v.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt()
            };
            dot / (n(&x) * n(&y))
        })
        .collect();
    rows.iter().sum::<f64>() / rows.len() as f64
}

/// The pooled output of a written model on the sentences, by the simulator.
fn pooled_of(path: &std::path::Path) -> ArrayD<f32> {
    let m = load_model(path).unwrap();
    let session = Executor::prepare(
        &ascend_quant::sim::CpuExecutor,
        &m,
        &SessionOptions {
            dynamic_batch: true,
            ..Default::default()
        },
    )
    .unwrap();
    let s = sentences();
    match session.run(&feeds(&s), &["pooled"]).unwrap().remove(0) {
        Tensor::F32(a) => a,
        other => panic!("pooled is {}", other.dtype()),
    }
}

#[test]
fn qat_by_distillation_brings_the_embeddings_closer_to_float() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixtures().join("sentences.npz");
    let run = |steps: &str, prefix: &str| {
        let out = common::bin()
            .args(["qat", "--model"])
            .arg(fixtures().join("tiny_bert.onnx"))
            .arg("--data")
            .arg(&data)
            .args(["--steps", steps, "--batch-size", "4", "--lr", "3e-3"])
            .args(["--loss", "cosine", "--distill-output", "pooled", "--quiet"])
            .arg("--output")
            .arg(dir.path().join(prefix))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("{prefix}_qat_report.json"))).unwrap(),
        )
        .unwrap();
        let cos = mean_cosine(
            &pooled_of(&dir.path().join(format!("{prefix}_fake_quant_model.onnx"))),
            &ort("ort_pooled.npy"),
        );
        (report, cos)
    };
    let (_, before) = run("0", "start");
    let (report, after) = run("40", "trained");
    let losses: Vec<f64> = report["loss_per_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    assert!(
        1.0 - after < 0.8 * (1.0 - before),
        "cosine to float {before} -> {after}"
    );
    assert_eq!(report["loss"], "cosine");
    assert_eq!(report["distill_output"], "pooled");
    assert_eq!(report["optimize"], false);
}

#[test]
fn qat_names_an_output_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::bin()
        .args(["qat", "--model"])
        .arg(fixtures().join("tiny_bert.onnx"))
        .arg("--data")
        .arg(fixtures().join("sentences.npz"))
        .args(["--steps", "1", "--distill-output", "nope", "--quiet"])
        .arg("--output")
        .arg(dir.path().join("q"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--distill-output 'nope'") && err.contains("pooled, tokens"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// A DMQ-balanced layer trains on ULQ(x / s) · ARQ(W · s), by hand; its
/// weight's gradient is the balanced weight's, times s row by row.
#[test]
fn a_balanced_layer_quantizes_the_balanced_operands() {
    use ascend_quant::quant::dmq::ChannelAxes;
    use ascend_quant::train::fake_quant::{arq_retrain_forward, ulq_forward, ulq_grid};
    use ascend_quant::train::graph::Balance;
    let layer = "ffn.in/MatMul";
    let plain = TrainGraph::new(&model()).unwrap();
    let s = sentences();
    let x = plain
        .forward_tensors(&feeds(&s))
        .unwrap()
        .get(&plain, "ln1/Add")
        .unwrap()
        .clone(); // [b, seq, 16]
    let factors: Vec<f32> = (0..16).map(|j| 0.5 + 0.1 * j as f32).collect();
    let (lo, hi) = (-3.0f32, 3.5f32);
    let mut g = plain.clone();
    g.train_only(&["ffn.in.weight".to_string()]);
    g.set_quant(
        layer,
        LayerQuant {
            clip_min: lo,
            clip_max: hi,
            balance: Some(Balance {
                factors: factors.clone(),
                axes: ChannelAxes::LastAxis { k: 16 },
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let acts = g.forward_tensors(&feeds(&s)).unwrap();
    // By hand: x / s on the ULQ grid, W · s with one ARQ scale.
    let w = g.constant_mut("ffn.in.weight").unwrap().clone(); // [16, 32]
    let xb: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| v / factors[i % 16])
        .collect();
    let mut xq = vec![0f32; xb.len()];
    ulq_forward(&xb, &ulq_grid(lo, hi, 8).unwrap(), 8, &mut xq);
    let wb: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, v)| v * factors[i / 32])
        .collect();
    let mut wq = vec![0f32; wb.len()];
    arq_retrain_forward(&wb, 8, &mut wq);
    let ours = acts.get(&g, layer).unwrap();
    let rows = xq.len() / 16;
    let mut worst = 0f32;
    for r in 0..rows {
        for c in 0..32 {
            let v: f32 = (0..16).map(|k| xq[r * 16 + k] * wq[k * 32 + c]).sum();
            worst = worst.max((v - ours.as_slice().unwrap()[r * 32 + c]).abs());
        }
    }
    assert!(worst < 1e-4, "{worst}");
    // ∂L/∂W = s ⊙ (x_qᵀ · ∂L/∂y) with ∂L/∂y = 1 everywhere.
    let gy = ArrayD::from_elem(ours.raw_dim(), 1.0f32);
    let grads = g.backward(&acts, &[(layer, gy)]).unwrap();
    let gw = grads.get(&g, "ffn.in.weight").unwrap();
    for k in 0..16 {
        let col_sum: f32 = (0..rows).map(|r| xq[r * 16 + k]).sum();
        let expected = factors[k] * col_sum;
        let got = gw.as_slice().unwrap()[k * 32];
        assert!(
            (got - expected).abs() < 1e-3 * (1.0 + expected.abs()),
            "row {k}: {got} vs {expected}"
        );
    }
}

/// `qat --optimize` trains DMQ-balanced layers: its deploy model (exact
/// int32 simulation) agrees with its fake-quant model, which needs the
/// balanced int8 weights to match the Mul the export puts in front.
#[test]
fn qat_from_the_optimized_start_writes_a_consistent_deploy_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::bin()
        .args(["qat", "--model"])
        .arg(fixtures().join("tiny_bert.onnx"))
        .arg("--data")
        .arg(fixtures().join("sentences.npz"))
        .args([
            "--steps",
            "8",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--optimize",
        ])
        .args(["--loss", "cosine", "--distill-output", "pooled", "--quiet"])
        .arg("--output")
        .arg(dir.path().join("q"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fake = pooled_of(&dir.path().join("q_fake_quant_model.onnx"));
    let deploy = pooled_of(&dir.path().join("q_deploy_model.onnx"));
    let agreement = mean_cosine(&fake, &deploy);
    assert!(
        agreement > 0.9995,
        "deploy vs fake-quant cosine {agreement}"
    );
    let fq = load_model(&dir.path().join("q_fake_quant_model.onnx")).unwrap();
    let muls = fq
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter(|n| n.op_type() == "Mul" && n.name().ends_with("/MatMul.mul"))
        .count();
    assert!(muls > 0, "no balancing Mul in the fake-quant model");
    let cos = mean_cosine(&fake, &ort("ort_pooled.npy"));
    assert!(cos > 0.99, "fake-quant vs float {cos}");
}

/// A model exported for batch 1 (a ViT whose class token is a [1, 1, D]
/// constant) trained at batch 2: the error names the node and the fix, and
/// nothing is written.
#[test]
fn qat_at_another_batch_than_the_export_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let exports = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/exports");
    let x: ArrayD<f32> = ndarray_npy::read_npy(exports.join("vit_input.npy")).unwrap();
    let three = x
        .into_shape_with_order(ndarray::IxDyn(&[3, 3, 32, 32]))
        .unwrap();
    // Two full batches of 2: whichever the step draws, it holds 2 images.
    let images = three
        .slice_axis(Axis(0), ndarray::Slice::from(0..2))
        .to_owned();
    let images = ndarray::concatenate(Axis(0), &[images.view(), images.view()]).unwrap();
    let data = dir.path().join("x.npy");
    ndarray_npy::write_npy(&data, &images).unwrap();
    let out = common::bin()
        .args(["qat", "--model"])
        .arg(exports.join("vit.onnx"))
        .arg("--data")
        .arg(&data)
        .args([
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--loss",
            "mse",
            "--quiet",
        ])
        .arg("--output")
        .arg(dir.path().join("q"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("/concat_8")
            && err.contains("exported for batch 1: train with --batch-size 1"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("x.npy")]);
}

/// `auto`'s evaluator runs sentences padded only to their batch's longest
/// when that leaves the float model's scored output unchanged: a pooled
/// embedding, not token embeddings (whose shape follows the padding).
#[test]
fn the_evaluator_trims_padding_only_where_it_is_inert() {
    use ascend_quant::auto::evaluator::{Evaluator, InternalEvaluator};
    use ascend_quant::data::{Dataset, TextSource};
    use ascend_quant::report::metric::Metric;
    let texts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/texts");
    let source = TextSource {
        file: texts.join("sentences.txt"),
        tokenizer: texts.join("tokenizer.json"),
        max_length: Some(8),
    };
    let inputs: Vec<(String, Option<i32>)> = ["input_ids", "attention_mask"]
        .iter()
        .map(|n| (n.to_string(), Some(7)))
        .collect();
    let data = Dataset::from_texts(&source, 8, &inputs).unwrap();
    let m = model();
    for (output, trims) in [("pooled", true), ("tokens", false)] {
        let mut e = InternalEvaluator::new(
            &ascend_quant::sim::CpuExecutor,
            &data,
            1,
            true,
            Metric::Cosine,
        )
        .scoring(Some(output.to_string()));
        let score = e.float_score(&m).unwrap();
        assert!((score - 100.0).abs() < 1e-6, "{output}: {score}");
        assert_eq!(e.unpadded(), trims, "{output}");
    }
}
