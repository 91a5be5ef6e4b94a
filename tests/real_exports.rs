//! Models as other tool chains export them run on the native engine and
//! match onnxruntime: an EfficientNet-Lite in timm's TF port style (every
//! convolution's "same" padding computed from the input's shape by a
//! Shape/Gather/Cast/Ceil/…/Pad subgraph) and a YOLOv8 with Ultralytics'
//! Detect head (shapes computed by Shape/Gather/Concat, anchors by
//! Range/Expand, DFL by Reshape/Transpose/Softmax/Conv, Split, box decoding).
//! Both are written by `scripts/make_export_like.py` (small sizes) with
//! onnxruntime's outputs for three random inputs; a ViT in timm/HF's style
//! by `scripts/make_vit_like.py`.
//!
//! Tolerance: |ours − ref| ≤ 1e-4 · (1 + |ref|): float32 sums in another
//! order over ≤ 1280 terms; a wrong pad or a misplaced value moves outputs
//! by far more.

mod common;

use ascend_quant::data::read_npy;
use ascend_quant::onnx::{ModelProto, load_model};
use ascend_quant::sim::{CpuExecutor, Executor, NativeExecutor, SessionOptions, engine_plan};
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
    let plan = engine_plan(&load("efficientnet_lite").0, &SessionOptions::default()).unwrap();
    assert!(plan.declined.is_empty(), "{:?}", plan.declined);
    // 49 padding subgraphs of 14 nodes each, and the 49 Pads themselves.
    assert!(plan.folded >= 49 * 15, "{} nodes folded", plan.folded);
    matches_onnxruntime(&NativeExecutor, "efficientnet_lite");
    matches_onnxruntime(&CpuExecutor, "efficientnet_lite");
}

#[test]
fn yolov8_with_its_detect_head_runs_natively() {
    let plan = engine_plan(&load("yolov8").0, &SessionOptions::default()).unwrap();
    assert!(plan.declined.is_empty(), "{:?}", plan.declined);
    assert!(!plan.whole_on_rten && plan.folded > 30, "{plan:?}");
    matches_onnxruntime(&NativeExecutor, "yolov8");
    matches_onnxruntime(&CpuExecutor, "yolov8");
}

/// A ViT as timm/HF export it (`scripts/make_vit_like.py`, 2 blocks of
/// width 32): patch Conv, position embeddings resized bicubically from a
/// 3×3 to a 4×4 grid (pytorch_half_pixel), decomposed LayerNorms
/// (ReduceMean/Pow/Sqrt), attention's two-input MatMuls, Softmax, Erf GELU
/// and a final LayerNormalization — all native, and onnxruntime's logits.
#[test]
fn vit_with_bicubic_position_embeddings_runs_natively() {
    let plan = engine_plan(&load("vit").0, &SessionOptions::default()).unwrap();
    assert!(plan.declined.is_empty(), "{:?}", plan.declined);
    // The embeddings' Slice/Reshape/Transpose/Resize/Transpose/Reshape/Concat
    // chain reads only constants: it is computed when the model is prepared.
    assert!(!plan.whole_on_rten && plan.folded >= 7, "{plan:?}");
    // Fused away: the 9 linear layers' bias Adds (into the GEMM), the 4
    // decomposed LayerNorms' 8 extra steps each and the 2 Erf GELUs' 4 each:
    // 100 steps become 51.
    assert_eq!(plan.native, 51, "{plan:?}");
    matches_onnxruntime(&NativeExecutor, "vit");
    matches_onnxruntime(&CpuExecutor, "vit");
}

/// Conv → Sin → Conv → Flatten → TopK (values and int64 indices, both
/// graph outputs): Sin and TopK are not native operators.
fn model_with_foreign_nodes(batch: i64) -> ModelProto {
    use ascend_quant::onnx::builder::node;
    use ascend_quant::onnx::proto::{GraphProto, type_proto};
    use ascend_quant::onnx::{Storage, to_proto};
    let f32s = |name: &str, shape: &[usize], seed: u64| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0) * 0.5)
            .collect();
        to_proto(
            name,
            &Tensor::F32(ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).unwrap()),
            Storage::Raw,
        )
    };
    let info = |name: &str, dims: &[i64], elem: i32| {
        let mut v = common::value_info(name, dims);
        if let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            t.elem_type = Some(elem);
        }
        v
    };
    let pads = ascend_quant::onnx::attr::attr_ints("pads", &[1, 1, 1, 1]);
    let graph = GraphProto {
        name: Some("foreign".into()),
        node: vec![
            node(
                "Conv",
                "conv1",
                &["x", "w1", "b1"],
                &["c1"],
                vec![pads.clone()],
            ),
            node("Sin", "sin", &["c1"], &["e"], vec![]),
            node("Conv", "conv2", &["e", "w2"], &["c2"], vec![pads]),
            node("Flatten", "flat", &["c2"], &["f"], vec![]),
            node("TopK", "topk", &["f", "k"], &["values", "indices"], vec![]),
        ],
        initializer: vec![
            f32s("w1", &[4, 3, 3, 3], 1),
            f32s("b1", &[4], 2),
            f32s("w2", &[2, 4, 3, 3], 3),
            to_proto(
                "k",
                &Tensor::I64(ArrayD::from_elem(ndarray::IxDyn(&[1]), 5)),
                Storage::Raw,
            ),
        ],
        input: vec![info("x", &[batch, 3, 6, 6], 1)],
        output: vec![
            info("values", &[batch, 5], 1),
            info("indices", &[batch, 5], 7),
        ],
        ..Default::default()
    };
    ascend_quant::onnx::ModelProto {
        ir_version: Some(8),
        opset_import: vec![ascend_quant::onnx::proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(13),
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

#[test]
fn nodes_the_native_engine_does_not_run_run_alone_on_rten() {
    use ascend_quant::sim::RtenExecutor;
    let model = model_with_foreign_nodes(-1);
    let plan = engine_plan(&model, &SessionOptions::default()).unwrap();
    let declined: Vec<&str> = plan.declined.iter().map(|d| d.node.as_str()).collect();
    assert_eq!(declined, ["sin", "topk"], "{plan:?}");
    assert!(!plan.whole_on_rten);
    assert!(
        plan.declined[0].reason.contains("Sin"),
        "{}",
        plan.declined[0]
    );
    let x: Vec<f32> = (0..2 * 3 * 36)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let x = Tensor::F32(ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3, 6, 6]), x).unwrap());
    let opts = SessionOptions {
        dynamic_batch: true,
        ..SessionOptions::default()
    };
    let ours = NativeExecutor
        .prepare(&model, &opts)
        .unwrap()
        .run(&[("x", &x)], &["values", "indices"])
        .unwrap();
    // The reference: the whole model on rten, which shares no step with ours
    // but the two foreign nodes.
    let reference = RtenExecutor
        .prepare(&model, &opts)
        .unwrap()
        .run(&[("x", &x)], &["values", "indices"])
        .unwrap();
    assert_close(
        ours[0].as_f32().unwrap(),
        reference[0].as_f32().unwrap(),
        "values",
    );
    assert_eq!(ours[1].dtype(), ascend_quant::tensor::DType::I64);
    assert_eq!(ours[1].to_f64_vec(), reference[1].to_f64_vec(), "indices");
    assert_eq!(ours[1].shape(), [2, 5]);
}

/// `run` on more samples than the model declares (19: two full chunks of
/// eight and a partial one) streams them and writes every row where it
/// belongs: each row matches onnxruntime's output for that sample.
#[test]
fn run_streams_many_samples_in_order() {
    let (_, input, reference) = load("efficientnet_lite");
    let dir = tempfile::tempdir().unwrap();
    let order: Vec<usize> = (0..19).map(|k| (k * 7) % 3).collect();
    let rows: Vec<ndarray::ArrayViewD<f32>> = order
        .iter()
        .map(|&k| input.index_axis(Axis(0), k).index_axis_move(Axis(0), 0))
        .collect();
    let batch = ndarray::stack(Axis(0), &rows).unwrap();
    let data = dir.path().join("x.npy");
    ascend_quant::data::write_npy(&data, &Tensor::F32(batch.into_dyn())).unwrap();
    let out = dir.path().join("out");
    let status = common::bin()
        .args(["run", "--json", "--output-dir"])
        .arg(&out)
        .arg(fixture("efficientnet_lite.onnx"))
        .arg("--input")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        files.len(),
        1,
        "one output file and no staging folder: {files:?}"
    );
    let y = floats(&out.join(&files[0]));
    assert_eq!(y.shape(), [19, 10]);
    for (row, &k) in order.iter().enumerate() {
        let want = reference.index_axis(Axis(0), k).to_owned();
        let got = y
            .index_axis(Axis(0), row)
            .insert_axis(Axis(0))
            .to_owned()
            .into_dyn();
        assert_close(&got, &want, &format!("row {row} (sample {k})"));
    }
}
