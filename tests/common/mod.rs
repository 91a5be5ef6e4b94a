//! Helpers shared by the integration tests: fixture paths and the command.
#![allow(dead_code)]

use ascend_quant::onnx::proto;
use ascend_quant::sim::Executor;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Records that part of a test could not run here: on stderr and in
/// `target/skipped-tests.txt`, which `.ci/run` prints after the tests.
pub fn record_skip(test: &str, why: &str) {
    let line = format!("{test}: skipped, {why}\n");
    eprint!("{line}");
    let log = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/skipped-tests.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = std::io::Write::write_all(&mut f, line.as_bytes());
    }
}

/// The digits fixtures folder.
pub fn digits() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/digits")
}

/// The `ascend-quant` binary, with the stub runtime's knobs and CANN's
/// environment cleared so nothing leaks in from the caller.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ascend-quant"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ASCEND_") {
            c.env_remove(key);
        }
    }
    c
}

/// `calibrate --model digits_cnn.onnx --data calib_x.npy --output OUT` (add more arguments after).
pub fn calibrate_digits(output: &Path) -> Command {
    let mut c = bin();
    c.arg("calibrate")
        .arg("--model")
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--data")
        .arg(digits().join("calib_x.npy"))
        .arg("--output")
        .arg(output);
    c
}

/// A float32 graph input or output of these dims (negative: a symbolic `n`).
pub fn value_info(name: &str, dims: &[i64]) -> proto::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| proto::tensor_shape_proto::Dimension {
            value: Some(if d < 0 {
                proto::tensor_shape_proto::dimension::Value::DimParam("n".into())
            } else {
                proto::tensor_shape_proto::dimension::Value::DimValue(d)
            }),
            denotation: None,
        })
        .collect();
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(proto::TensorShapeProto { dim }),
                },
            )),
            denotation: None,
        }),
        ..Default::default()
    }
}

/// The logits of `model` for all 500 digits test images (one batch).
pub fn digits_logits(model: &ascend_quant::onnx::ModelProto) -> ndarray::ArrayD<f32> {
    use ascend_quant::sim::{CpuExecutor, Executor, SessionOptions};
    let x = ascend_quant::data::read_npy(&digits().join("test_x.npy")).unwrap();
    let s = CpuExecutor
        .prepare(
            model,
            &SessionOptions {
                dynamic_batch: true,
                ..Default::default()
            },
        )
        .unwrap();
    match s.run(&[("x", &x)], &["logits"]).unwrap().remove(0) {
        ascend_quant::tensor::Tensor::F32(a) => a,
        other => panic!("{other:?}"),
    }
}

/// Top-1 accuracy in percent of digits test logits against the labels.
pub fn digits_accuracy(l: &ndarray::ArrayD<f32>) -> f64 {
    let y = match ascend_quant::data::read_npy(&digits().join("test_y.npy")).unwrap() {
        ascend_quant::tensor::Tensor::I64(a) => a,
        other => panic!("{other:?}"),
    };
    let rows = l.shape()[0];
    let correct = (0..rows)
        .filter(|&i| {
            let best = (0..l.shape()[1])
                .max_by(|&a, &b| l[[i, a]].total_cmp(&l[[i, b]]))
                .unwrap();
            best as i64 == y[i]
        })
        .count();
    100.0 * correct as f64 / rows as f64
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift), the same for a seed on every run.
pub fn signed_values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Calibrates `m` (input `x`) as `config` says on `data` (input `x`), in batches of 8.
pub fn calibrate_with(
    m: &ascend_quant::onnx::ModelProto,
    config: &ascend_quant::quant::config::QuantConfig,
    data: ndarray::ArrayD<f32>,
) -> ascend_quant::quant::calibrate::Outcome {
    let dataset = ascend_quant::data::Dataset::from_arrays(
        vec![("x".into(), ascend_quant::tensor::Tensor::F32(data))],
        &["x".into()],
        "t".into(),
    )
    .unwrap();
    let settings = ascend_quant::quant::calibrate::RunSettings {
        batch_size: 8,
        dynamic_batch: false,
        progress: &|_, _| {},
        similarity_samples: 0,
    };
    ascend_quant::quant::calibrate::calibrate(
        m.clone(),
        config,
        &dataset,
        &ascend_quant::sim::CpuExecutor,
        &settings,
    )
    .unwrap()
}

/// Runs `m` (input `x`, output `y`) on `x`, any batch size.
pub fn run_x_to_y(
    m: &ascend_quant::onnx::ModelProto,
    x: &ndarray::ArrayD<f32>,
) -> ndarray::ArrayD<f32> {
    let s = ascend_quant::sim::CpuExecutor
        .prepare(
            m,
            &ascend_quant::sim::SessionOptions {
                dynamic_batch: true,
                ..Default::default()
            },
        )
        .unwrap();
    let x = ascend_quant::tensor::Tensor::F32(x.clone());
    match s.run(&[("x", &x)], &["y"]).unwrap().remove(0) {
        ascend_quant::tensor::Tensor::F32(a) => a,
        other => panic!("{other:?}"),
    }
}

/// A model from `nodes` with float initializers `inits`, one input `x` and
/// one output `y` of the given dimensions (negative: symbolic), opset 13.
pub fn model_x_to_y(
    nodes: Vec<proto::NodeProto>,
    inits: Vec<(&str, ndarray::ArrayD<f32>)>,
    x: &[i64],
    y: &[i64],
) -> ascend_quant::onnx::ModelProto {
    use ascend_quant::onnx::{Storage, to_proto};
    model_of(proto::GraphProto {
        name: Some("test".into()),
        node: nodes,
        initializer: inits
            .into_iter()
            .map(|(n, a)| to_proto(n, &ascend_quant::tensor::Tensor::F32(a), Storage::Raw))
            .collect(),
        input: vec![value_info("x", x)],
        output: vec![value_info("y", y)],
        ..Default::default()
    })
}

/// A model of IR version 8 and opset 13 around `graph`.
pub fn model_of(graph: proto::GraphProto) -> ascend_quant::onnx::ModelProto {
    ascend_quant::onnx::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(13),
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

/// An `.npz` holding `entries` (name, tensor), written as numpy does: a zip
/// of `.npy` files.
pub fn write_npz(path: &Path, entries: &[(&str, &ascend_quant::tensor::Tensor)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (name, t) in entries {
        let npy = dir.path().join(format!("{name}.npy"));
        ascend_quant::data::write_npy(&npy, t).unwrap();
        zip.start_file(
            format!("{name}.npy"),
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored),
        )
        .unwrap();
        std::io::Write::write_all(&mut zip, &std::fs::read(&npy).unwrap()).unwrap();
    }
    zip.finish().unwrap();
}
