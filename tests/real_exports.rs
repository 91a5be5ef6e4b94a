//! Models as other tool chains export them run on the native engine and
//! match onnxruntime: an EfficientNet-Lite in timm's TF port style (every
//! convolution's "same" padding computed from the input's shape by a
//! Shape/Gather/Cast/Ceil/…/Pad subgraph) and a YOLOv8 with Ultralytics'
//! Detect head (shapes computed by Shape/Gather/Concat, anchors by
//! Range/Expand, DFL by Reshape/Transpose/Softmax/Conv, Split, box decoding).
//! Both are written by `scripts/make_export_like.py` (small sizes) with
//! onnxruntime's outputs for three random inputs.
//!
//! Tolerance: |ours − ref| ≤ 1e-4 · (1 + |ref|): float32 sums in another
//! order over ≤ 1280 terms; a wrong pad or a misplaced value moves outputs
//! by far more.

use ascend_quant::data::read_npy;
use ascend_quant::onnx::{ModelProto, load_model};
use ascend_quant::sim::{CpuExecutor, Executor, NativeExecutor, SessionOptions};
use ascend_quant::tensor::Tensor;
use ndarray::{ArrayD, Axis};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/exports")
        .join(name)
}

fn floats(path: &Path) -> ArrayD<f32> {
    match read_npy(path).unwrap() {
        Tensor::F32(a) => a,
        other => panic!("{} holds {}", path.display(), other.dtype()),
    }
}

fn load(name: &str) -> (ModelProto, ArrayD<f32>, ArrayD<f32>) {
    (
        load_model(&fixture(&format!("{name}.onnx"))).unwrap(),
        floats(&fixture(&format!("{name}_input.npy"))),
        floats(&fixture(&format!("{name}_output.npy"))),
    )
}

fn assert_close(ours: &ArrayD<f32>, reference: &ArrayD<f32>, what: &str) {
    assert_eq!(ours.shape(), reference.shape(), "{what}: shape");
    let worst = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "{what}: worst relative difference {worst}");
}

/// Runs every sample one at a time on `executor`, then all as one batch
/// with a free batch axis, against the reference.
fn matches_onnxruntime(executor: &dyn Executor, name: &str) {
    let (model, input, reference) = load(name);
    let session = executor
        .prepare(&model, &SessionOptions::default())
        .unwrap();
    let input_name = session.inputs()[0].name.clone();
    let output_name = session.outputs()[0].name.clone();
    for (k, x) in input.axis_iter(Axis(0)).enumerate() {
        let x = Tensor::F32(x.to_owned());
        let y = session.run(&[(&input_name, &x)], &[&output_name]).unwrap();
        let y = y[0].as_f32().unwrap();
        assert_close(
            y,
            &reference.index_axis(Axis(0), k).to_owned(),
            &format!("{name} sample {k}"),
        );
    }
    let opts = SessionOptions {
        dynamic_batch: true,
        ..SessionOptions::default()
    };
    let session = executor.prepare(&model, &opts).unwrap();
    let batch = input.index_axis(Axis(1), 0).to_owned();
    let y = session
        .run(&[(&input_name, &Tensor::F32(batch))], &[&output_name])
        .unwrap();
    let want = reference.index_axis(Axis(1), 0).to_owned();
    assert_close(y[0].as_f32().unwrap(), &want, &format!("{name} batch of 3"));
}

#[test]
fn efficientnet_lite_with_computed_padding_runs_natively() {
    matches_onnxruntime(&NativeExecutor, "efficientnet_lite");
    matches_onnxruntime(&CpuExecutor, "efficientnet_lite");
}

#[test]
fn yolov8_with_its_detect_head_matches_onnxruntime() {
    matches_onnxruntime(&CpuExecutor, "yolov8");
}
