//! `--texts FILE --tokenizer tokenizer.json --max-length N`: sentences
//! tokenized as Hugging Face's own library tokenizes them (its outputs are
//! committed by `scripts/make_text_fixtures.py`), fed by input name, through
//! `calibrate` end to end; bad files are errors naming the line.

mod common;

use ascend_quant::data::{Dataset, TextSource, read_npy};
use ascend_quant::onnx::builder::node;
use ascend_quant::onnx::proto::{AttributeProto, GraphProto, TensorProto, ValueInfoProto};
use ascend_quant::onnx::{Storage, save_model, to_proto};
use ascend_quant::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/texts")
}

fn source(file: PathBuf) -> TextSource {
    TextSource {
        file,
        tokenizer: fixtures().join("tokenizer.json"),
        max_length: Some(8),
    }
}

#[test]
fn the_sentences_tokenize_as_hugging_face_does() {
    for (elem_type, int32) in [(Some(7), false), (None, false), (Some(6), true)] {
        let inputs: Vec<(String, Option<i32>)> = ["input_ids", "attention_mask", "token_type_ids"]
            .iter()
            .map(|n| (n.to_string(), elem_type))
            .collect();
        let data =
            Dataset::from_texts(&source(fixtures().join("sentences.txt")), 8, &inputs).unwrap();
        assert_eq!(data.samples(), 4);
        // Two batches of 2 and 2: the rows come from the right lines.
        for b in 0..2 {
            let batch = data.batch(2, b).unwrap();
            for (name, got) in batch {
                let want = read_npy(&fixtures().join(format!("{name}.npy"))).unwrap();
                let Tensor::I64(want) = want else { panic!() };
                let rows = want
                    .slice(ndarray::s![2 * b..2 * b + 2, ..])
                    .to_owned()
                    .into_dyn();
                match got {
                    Tensor::I64(g) if !int32 => assert_eq!(g, rows, "{name} batch {b}"),
                    Tensor::I32(g) if int32 => assert_eq!(g.mapv(i64::from), rows, "{name}"),
                    other => panic!("{name}: {}", other.dtype()),
                }
            }
        }
    }
}

/// Padded to the batch's longest sentence only: Hugging Face's rows cut to
/// the most tokens any of them holds (its attention mask's largest sum).
#[test]
fn unpadded_batches_stop_at_their_longest_sentence() {
    let inputs: Vec<(String, Option<i32>)> = ["input_ids", "attention_mask"]
        .iter()
        .map(|n| (n.to_string(), None))
        .collect();
    let data = Dataset::from_texts(&source(fixtures().join("sentences.txt")), 8, &inputs).unwrap();
    let Tensor::I64(mask) = read_npy(&fixtures().join("attention_mask.npy")).unwrap() else {
        panic!()
    };
    for batch_size in [1, 3] {
        for b in 0..data.batch_count(batch_size) {
            let rows = b * batch_size..((b + 1) * batch_size).min(4);
            let longest = rows
                .clone()
                .map(|r| {
                    mask.index_axis(ndarray::Axis(0), r)
                        .iter()
                        .filter(|&&m| m != 0)
                        .count()
                })
                .max()
                .unwrap();
            for (name, got) in data.batch_unpadded(batch_size, b).unwrap() {
                let Tensor::I64(want) = read_npy(&fixtures().join(format!("{name}.npy"))).unwrap()
                else {
                    panic!()
                };
                let want = want
                    .slice(ndarray::s![rows.clone(), ..longest])
                    .to_owned()
                    .into_dyn();
                assert_eq!(got, Tensor::I64(want), "{name}, batch {b} of {batch_size}");
            }
        }
    }
}

fn value_info(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
    let mut v = common::value_info(name, dims);
    if let Some(ascend_quant::onnx::proto::type_proto::Value::TensorType(t)) =
        v.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.elem_type = Some(elem_type);
    }
    v
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(2),
        i: Some(v),
        ..Default::default()
    }
}

/// A sentence encoder in miniature: embeddings of the ids, masked and
/// summed over the tokens, then a projection (the quantized layer).
fn encoder() -> ascend_quant::onnx::ModelProto {
    let emb = ArrayD::from_shape_vec(IxDyn(&[16, 4]), common::signed_values(1, 64)).unwrap();
    let w = ArrayD::from_shape_vec(IxDyn(&[4, 3]), common::signed_values(2, 12)).unwrap();
    let i64s = |name: &str, v: Vec<i64>| -> TensorProto {
        to_proto(
            name,
            &Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).unwrap()),
            Storage::Raw,
        )
    };
    common::model_of(GraphProto {
        name: Some("encoder".into()),
        node: vec![
            node(
                "Gather",
                "embed",
                &["emb", "input_ids"],
                &["tokens"],
                vec![],
            ),
            node(
                "Cast",
                "mask.float",
                &["attention_mask"],
                &["m"],
                vec![int_attr("to", 1)],
            ),
            node(
                "Unsqueeze",
                "mask.unsqueeze",
                &["m", "last"],
                &["m3"],
                vec![],
            ),
            node("Mul", "mask.apply", &["tokens", "m3"], &["masked"], vec![]),
            node(
                "ReduceSum",
                "pool",
                &["masked", "tokens_axis"],
                &["pooled"],
                vec![int_attr("keepdims", 0)],
            ),
            node("MatMul", "project", &["pooled", "w"], &["y"], vec![]),
        ],
        initializer: vec![
            to_proto("emb", &Tensor::F32(emb), Storage::Raw),
            to_proto("w", &Tensor::F32(w), Storage::Raw),
            i64s("last", vec![-1]),
            i64s("tokens_axis", vec![1]),
        ],
        input: vec![
            value_info("input_ids", 7, &[-1, 8]),
            value_info("attention_mask", 7, &[-1, 8]),
        ],
        output: vec![common::value_info("y", &[-1, 3])],
        ..Default::default()
    })
}

fn calibrate(dir: &Path, prefix: &str, data: &[&str]) -> std::process::Output {
    let model = dir.join("encoder.onnx");
    if !model.exists() {
        save_model(&encoder(), &model).unwrap();
    }
    common::bin()
        .args(["calibrate", "--quiet", "--batch-size", "2", "--model"])
        .arg(&model)
        .args(data)
        .arg("--output")
        .arg(dir.join(prefix))
        .output()
        .unwrap()
}

#[test]
fn calibrate_takes_sentences_as_it_takes_their_token_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let texts = fixtures().join("sentences.txt");
    let tokenizer = fixtures().join("tokenizer.json");
    // The model's sequence axis is fixed (8): --max-length may be left out.
    let o = calibrate(
        dir.path(),
        "texts",
        &[
            "--texts",
            texts.to_str().unwrap(),
            "--tokenizer",
            tokenizer.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ids = format!("input_ids={}", fixtures().join("input_ids.npy").display());
    let mask = format!(
        "attention_mask={}",
        fixtures().join("attention_mask.npy").display()
    );
    let o = calibrate(dir.path(), "arrays", &["--data", &ids, "--data", &mask]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let record =
        |p: &str| std::fs::read_to_string(dir.path().join(format!("{p}_record.txt"))).unwrap();
    assert!(record("texts").contains("scale_d"));
    assert_eq!(record("texts"), record("arrays"));
}

#[test]
fn bad_text_files_are_errors_naming_the_line_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = fixtures().join("tokenizer.json");
    let cases: [(&[u8], &str); 3] = [
        (b"the model\n\nweights\n", "line 2 is empty"),
        (b"the model\nweights \xff\xfe\n", "line 2 is not UTF-8"),
        (b"", "holds no sentence"),
    ];
    for (k, (text, needle)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{k}.txt"));
        std::fs::write(&file, text).unwrap();
        let o = calibrate(
            dir.path(),
            &format!("bad{k}"),
            &[
                "--texts",
                file.to_str().unwrap(),
                "--tokenizer",
                tokenizer.to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(needle) && err.contains(&format!("bad{k}.txt")),
            "{err}"
        );
        assert!(!dir.path().join(format!("bad{k}_record.txt")).exists());
    }
    let texts = fixtures().join("sentences.txt");
    // No tokenizer; a tokenizer that is not one; a tokenizer and no sentences.
    let not_json = dir.path().join("tokenizer.json");
    std::fs::write(&not_json, "{}").unwrap();
    let runs: [(Vec<&str>, &str); 4] = [
        (
            vec![
                "--texts",
                texts.to_str().unwrap(),
                "--tokenizer",
                tokenizer.to_str().unwrap(),
                "--max-length",
                "2",
            ],
            "adds 2 special tokens to each sentence; give at least 3",
        ),
        (vec!["--texts", texts.to_str().unwrap()], "--tokenizer"),
        (
            vec![
                "--texts",
                texts.to_str().unwrap(),
                "--tokenizer",
                not_json.to_str().unwrap(),
            ],
            "not a Hugging Face tokenizer.json",
        ),
        (
            vec![
                "--data",
                "x.npy",
                "--tokenizer",
                tokenizer.to_str().unwrap(),
            ],
            "apply to --texts",
        ),
    ];
    for (args, needle) in runs {
        let o = calibrate(dir.path(), "usage", &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// `compare --texts` scores the model's float outputs sample by sample:
/// the mean cosine and the nearest-neighbour agreement, recomputed here
/// from both models' outputs on the reference token arrays.
#[test]
fn compare_scores_the_embeddings_of_sentences() {
    use ascend_quant::onnx::load_model;
    use ascend_quant::sim::{CpuExecutor, Executor, SessionOptions};
    let dir = tempfile::tempdir().unwrap();
    let texts = fixtures().join("sentences.txt");
    let tokenizer = fixtures().join("tokenizer.json");
    let text_args = [
        "--texts",
        texts.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
    ];
    let o = calibrate(dir.path(), "q", &text_args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let quant = dir.path().join("q_fake_quant_model.onnx");
    let o = common::bin()
        .args(["compare", "--json", "--float"])
        .arg(dir.path().join("encoder.onnx"))
        .arg("--quant")
        .arg(&quant)
        .args(text_args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let out = &v["outputs"][0];
    assert_eq!(out["name"], "y");
    // By hand: both models on the Hugging Face token arrays.
    let ids = read_npy(&fixtures().join("input_ids.npy")).unwrap();
    let mask = read_npy(&fixtures().join("attention_mask.npy")).unwrap();
    let outputs = |m: &Path| -> ArrayD<f32> {
        let s = CpuExecutor
            .prepare(&load_model(m).unwrap(), &SessionOptions::default())
            .unwrap();
        let Tensor::F32(y) = s
            .run(&[("input_ids", &ids), ("attention_mask", &mask)], &["y"])
            .unwrap()
            .remove(0)
        else {
            panic!("float output")
        };
        y
    };
    let (f, q) = (outputs(&dir.path().join("encoder.onnx")), outputs(&quant));
    let rows = f.shape()[0];
    let unit = |a: &ArrayD<f32>, i: usize| -> Vec<f64> {
        let r: Vec<f64> = (0..3).map(|j| f64::from(a[[i, j]])).collect();
        let n = r.iter().map(|x| x * x).sum::<f64>().sqrt();
        r.iter().map(|x| x / n).collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let cosine: f64 = (0..rows)
        .map(|i| dot(&unit(&f, i), &unit(&q, i)))
        .sum::<f64>()
        / rows as f64;
    let nearest = |a: &ArrayD<f32>, i: usize| {
        (0..rows)
            .filter(|&j| j != i)
            .max_by(|&x, &y| {
                dot(&unit(a, i), &unit(a, x)).total_cmp(&dot(&unit(a, i), &unit(a, y)))
            })
            .unwrap()
    };
    let agree = (0..rows)
        .filter(|&i| nearest(&f, i) == nearest(&q, i))
        .count() as f64
        / rows as f64;
    let got = out["cosine_mean"].as_f64().unwrap();
    assert!((got - cosine).abs() < 1e-6, "cosine {got} vs {cosine}");
    assert_eq!(out["nn_agreement"].as_f64().unwrap(), agree);
}
