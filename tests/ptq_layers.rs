//! Every quantizable layer kind in one small model built here: Conv + BatchNorm
//! (folded), two Convs sharing an input (one AscendQuant), grouped
//! ConvTranspose (per-channel scales across groups), AveragePool, MatMul with
//! a bias Add, and Gemm with transB=1.

mod common;

use ascend_quant::data::Dataset;
use ascend_quant::onnx::attr::attr_int;
use ascend_quant::onnx::builder::node;
use ascend_quant::onnx::proto::{AttributeProto, OperatorSetIdProto, TensorProto};
use ascend_quant::onnx::{GraphProto, ModelProto, Storage, to_proto};
use ascend_quant::quant::calibrate::{RunSettings, calibrate};
use ascend_quant::quant::config::QuantConfig;
use ascend_quant::quant::layers::discover;
use ascend_quant::quant::prepare::prepare;
use ascend_quant::sim::{CpuExecutor, Executor, SessionOptions};
use ascend_quant::tensor::Tensor;
use common::{signed_values as values, value_info};
use ndarray::{ArrayD, IxDyn};

fn init(name: &str, shape: &[usize], seed: u64, scale: f32) -> TensorProto {
    let n = shape.iter().product();
    let a = ArrayD::from_shape_vec(
        IxDyn(shape),
        values(seed, n).into_iter().map(|v| v * scale).collect(),
    )
    .unwrap();
    to_proto(name, &Tensor::F32(a), Storage::Raw)
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(7),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn model() -> ModelProto {
    let mut bn_var = init("bn_var", &[4], 5, 0.3);
    if let Some(raw) = bn_var.raw_data.as_mut() {
        for c in raw.chunks_exact_mut(4) {
            let v = f32::from_le_bytes(c.try_into().unwrap()).abs() + 0.5;
            c.copy_from_slice(&v.to_le_bytes());
        }
    }
    let nodes = vec![
        node(
            "Conv",
            "convA",
            &["x", "wA", "bA"],
            &["a"],
            vec![ints("pads", &[1, 1, 1, 1]), ints("kernel_shape", &[3, 3])],
        ),
        node(
            "BatchNormalization",
            "bn",
            &["a", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            &["a_bn"],
            vec![],
        ),
        node("Relu", "reluA", &["a_bn"], &["r1"], vec![]),
        node("Conv", "convB", &["x", "wB"], &["r2"], vec![]),
        node("Add", "add", &["r1", "r2"], &["s"], vec![]),
        node(
            "ConvTranspose",
            "deconv",
            &["s", "wT", "bT"],
            &["t"],
            vec![ints("strides", &[2, 2]), attr_int("group", 2)],
        ),
        node(
            "AveragePool",
            "pool",
            &["t"],
            &["p"],
            vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
        ),
        node("Flatten", "flat", &["p"], &["f"], vec![]),
        node("MatMul", "mm", &["f", "wM"], &["m0"], vec![]),
        node("Add", "mm_bias", &["m0", "bM"], &["m"], vec![]),
        node("Relu", "reluM", &["m"], &["mr"], vec![]),
        node(
            "Gemm",
            "fc",
            &["mr", "wG", "bG"],
            &["y"],
            vec![attr_int("transB", 1)],
        ),
    ];
    let graph = GraphProto {
        name: Some("layers".into()),
        node: nodes,
        initializer: vec![
            init("wA", &[4, 3, 3, 3], 1, 0.5),
            init("bA", &[4], 2, 0.1),
            init("bn_scale", &[4], 3, 1.0),
            init("bn_bias", &[4], 4, 0.2),
            init("bn_mean", &[4], 6, 0.1),
            bn_var,
            init("wB", &[4, 3, 1, 1], 7, 0.5),
            init("wT", &[4, 1, 2, 2], 8, 0.5),
            init("bT", &[2], 9, 0.1),
            init("wM", &[72, 8], 10, 0.2),
            init("bM", &[8], 11, 0.1),
            init("wG", &[5, 8], 12, 0.5),
            init("bG", &[5], 13, 0.1),
        ],
        input: vec![value_info("x", &[-1, 3, 6, 6])],
        output: vec![value_info("y", &[-1, 5])],
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

fn data(n: usize) -> Tensor {
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n, 3, 6, 6]), values(99, n * 108)).unwrap())
}

fn run(model: &ModelProto, x: &Tensor) -> Vec<f32> {
    let s = CpuExecutor
        .prepare(model, &SessionOptions::default())
        .unwrap();
    s.run(&[("x", x)], &["y"])
        .unwrap()
        .remove(0)
        .as_f32()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

/// The quantizable layers of `m` (name, operator), as a configuration lists them.
fn layer_names(m: &ModelProto) -> Vec<(String, String)> {
    let mut named = m.clone();
    prepare(&mut named, false, &[]).unwrap();
    let (layers, _) = discover(named.graph.as_ref().unwrap()).unwrap();
    layers
        .iter()
        .map(|l| (l.name.clone(), l.op_type.clone()))
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn batch_norm_folding_and_gemm_untransposing_keep_the_outputs() {
    let m = model();
    let mut p = m.clone();
    let done = prepare(&mut p, true, &[]).unwrap();
    assert_eq!(done.fused, vec!["convA".to_string()]);
    assert_eq!(done.transposed, vec!["fc".to_string()]);
    assert!(
        !p.graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .any(|n| n.op_type() == "BatchNormalization")
    );
    let x = data(8);
    let (a, b) = (run(&m, &x), run(&p, &x));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(u, v)| (u - v).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "{worst}");
    // skip_fusion_layers keeps the pair.
    let mut q = m.clone();
    assert!(
        prepare(&mut q, true, &["convA".into()])
            .unwrap()
            .fused
            .is_empty()
    );
}

#[test]
fn every_layer_kind_is_quantized_and_deploy_agrees_with_fake_quant() {
    let m = model();
    let names = layer_names(&m);
    assert_eq!(
        names.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        vec!["convA", "convB", "deconv", "pool", "mm", "fc"]
    );
    let mut config = QuantConfig::default_for(&names);
    config.batch_num = Some(4);
    let dataset = Dataset::from_arrays(
        vec![("x".into(), data(32))],
        &["x".into()],
        "synthetic".into(),
    )
    .unwrap();
    let run_settings = RunSettings {
        batch_size: 8,
        dynamic_batch: false,
        progress: &|_, _| {},
        similarity_samples: 32,
    };
    let out = calibrate(m.clone(), &config, &dataset, &CpuExecutor, &run_settings).unwrap();
    assert_eq!(out.factors.len(), 6);

    let (deploy, _) = out.models().unwrap();

    let g = deploy.graph.as_ref().unwrap();
    let quants: Vec<_> = g
        .node
        .iter()
        .filter(|n| n.op_type() == "AscendQuant")
        .collect();
    assert_eq!(
        quants.iter().filter(|q| q.input[0] == "x").count(),
        1,
        "convA and convB share one AscendQuant"
    );
    let convb = g.node.iter().find(|n| n.name() == "convB").unwrap();
    let conva = g.node.iter().find(|n| n.name() == "convA").unwrap();
    assert_eq!(conva.input[0], convb.input[0]);
    // Grouped ConvTranspose: one scale per output channel (2 groups x 1).
    let deconv = out
        .factors
        .iter()
        .find(|f| f.layer.name == "deconv")
        .unwrap();
    assert_eq!(deconv.scale_w.len(), 2);
    // AveragePool: scale_w = 1, no weight.
    let pool = out.factors.iter().find(|f| f.layer.name == "pool").unwrap();
    assert_eq!(pool.scale_w, vec![1.0]);
    // MatMul: the dequantization follows the bias Add, whose bias is int32.
    let add = g.node.iter().find(|n| n.name() == "mm_bias").unwrap();
    let deq = g.node.iter().find(|n| n.name() == "mm.dequant").unwrap();
    assert_eq!(deq.input[0], add.output[0]);
    assert_eq!(deq.output[0], "m");
    assert_eq!(
        g.initializer
            .iter()
            .find(|t| t.name() == add.input[1])
            .unwrap()
            .data_type(),
        6
    );
    // Gemm: weight transposed offline to (K, N) with transB = 0.
    let fc = g.node.iter().find(|n| n.name() == "fc").unwrap();
    assert!(
        fc.attribute
            .iter()
            .any(|a| a.name() == "transB" && a.i() == 0)
    );
    assert_eq!(
        g.initializer
            .iter()
            .find(|t| t.name() == fc.input[1])
            .unwrap()
            .dims,
        vec![8, 5]
    );

    let x = data(16);
    let float = run(&m, &x);
    let fake = run(&out.models().unwrap().1, &x);
    let deploy = run(&out.models().unwrap().0, &x);
    // The internal QDQ simulation (used for the report's similarity) computes what the fake-quant model computes.
    let simulated = run(
        &ascend_quant::quant::emit::simulation_model(&out.prepared, &out.factors).unwrap(),
        &x,
    );
    let range0 = fake.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    let gap = simulated
        .iter()
        .zip(&fake)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        gap <= 1e-3 * range0,
        "simulation vs fake-quant differ by {gap} (range {range0})"
    );
    let c = cosine(&float, &fake);
    assert!(c > 0.99, "fake-quant vs float cosine {c}");
    let range = float.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    let worst = deploy
        .iter()
        .zip(&fake)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // The fake-quant model computes the deploy model's integers in float:
    // measured equal to the last bit here, so only summation order may differ.
    assert!(
        worst <= 1e-5 * range,
        "deploy vs fake-quant differ by {worst} (output range {range})"
    );
    assert!(out.cosine.values().all(|&c| c > 0.98), "{:?}", out.cosine);
}

#[test]
fn a_3d_convolution_is_calibrated_and_its_deploy_model_runs() {
    let graph = GraphProto {
        name: Some("c3".into()),
        node: vec![
            node(
                "Conv",
                "conv3d",
                &["x", "w3", "b3"],
                &["y"],
                vec![ints("pads", &[1, 1, 1, 1, 1, 1])],
            ),
            node("Relu", "relu", &["y"], &["z"], vec![]),
        ],
        initializer: vec![
            init("w3", &[4, 2, 3, 3, 3], 21, 0.3),
            init("b3", &[4], 22, 0.1),
        ],
        input: vec![value_info("x", &[-1, 2, 5, 6, 7])],
        output: vec![value_info("z", &[-1, 4, 5, 6, 7])],
        ..Default::default()
    };
    let m = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(graph),
        ..Default::default()
    };
    let x =
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[8, 2, 5, 6, 7]), values(23, 8 * 420)).unwrap());
    let dataset = Dataset::from_arrays(
        vec![("x".into(), x.clone())],
        &["x".into()],
        "synthetic".into(),
    )
    .unwrap();
    let mut config = QuantConfig::default_for(&[("conv3d".into(), "Conv".into())]);
    config.batch_num = Some(2);
    let run_settings = RunSettings {
        batch_size: 4,
        dynamic_batch: false,
        progress: &|_, _| {},
        similarity_samples: 8,
    };
    let out = calibrate(m.clone(), &config, &dataset, &CpuExecutor, &run_settings).unwrap();
    assert_eq!(
        out.factors[0].scale_w.len(),
        4,
        "one weight scale per output channel"
    );
    let float = run_model(&m, &x, "z");
    let deploy = run_model(&out.models().unwrap().0, &x, "z");
    let fake = run_model(&out.models().unwrap().1, &x, "z");
    assert!(cosine(&float, &fake) > 0.999, "{}", cosine(&float, &fake));
    assert!(
        cosine(&deploy, &fake) > 0.99999,
        "{}",
        cosine(&deploy, &fake)
    );
}

fn run_model(model: &ModelProto, x: &Tensor, output: &str) -> Vec<f32> {
    let s = CpuExecutor
        .prepare(model, &SessionOptions::default())
        .unwrap();
    s.run(&[("x", x)], &[output]).unwrap()[0]
        .as_f32()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

#[test]
fn a_batch_norm_with_non_constant_parameters_does_not_stop_other_folds() {
    // bnA's scale comes from a graph input (not foldable); bnB follows convB and is foldable.
    let graph = GraphProto {
        name: Some("two_bn".into()),
        node: vec![
            node("Conv", "convA", &["x", "wA"], &["a"], vec![]),
            node(
                "BatchNormalization",
                "bnA",
                &["a", "gamma_in", "bn_bias", "bn_mean", "bn_var"],
                &["a_bn"],
                vec![],
            ),
            node("Conv", "convB", &["a_bn", "wB2"], &["b"], vec![]),
            node(
                "BatchNormalization",
                "bnB",
                &["b", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                &["y"],
                vec![],
            ),
        ],
        initializer: vec![
            init("wA", &[4, 3, 1, 1], 31, 0.5),
            init("wB2", &[4, 4, 1, 1], 32, 0.5),
            init("bn_scale", &[4], 33, 1.0),
            init("bn_bias", &[4], 34, 0.2),
            init("bn_mean", &[4], 35, 0.1),
            {
                let mut v = init("bn_var", &[4], 36, 0.3);
                if let Some(raw) = v.raw_data.as_mut() {
                    for c in raw.chunks_exact_mut(4) {
                        let x = f32::from_le_bytes(c.try_into().unwrap()).abs() + 0.5;
                        c.copy_from_slice(&x.to_le_bytes());
                    }
                }
                v
            },
        ],
        input: vec![
            value_info("x", &[-1, 3, 4, 4]),
            value_info("gamma_in", &[4]),
        ],
        output: vec![value_info("y", &[-1, 4, 4, 4])],
        ..Default::default()
    };
    let mut m = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(graph),
        ..Default::default()
    };
    let done = prepare(&mut m, true, &[]).unwrap();
    assert_eq!(done.fused, vec!["convB".to_string()]);
    let ops: Vec<&str> = m
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type())
        .collect();
    assert_eq!(ops, vec!["Conv", "BatchNormalization", "Conv"]);
}

/// conv (weight [4,3,1,1], optional bias) -> BatchNormalization with the given parameters.
fn conv_bn(bias: Option<TensorProto>, bn_len: usize) -> ModelProto {
    let mut initializer = vec![
        init("w", &[4, 3, 1, 1], 41, 0.5),
        init("bn_scale", &[bn_len], 42, 1.0),
        init("bn_bias", &[bn_len], 43, 0.2),
        init("bn_mean", &[bn_len], 44, 0.1),
        init("bn_var", &[bn_len], 0, 0.0),
    ];
    // Variance 1 everywhere.
    initializer[4].raw_data = Some(1f32.to_le_bytes().repeat(bn_len));
    let mut conv_inputs = vec!["x", "w"];
    if let Some(b) = bias {
        conv_inputs.push("b");
        initializer.push(b);
    }
    let graph = GraphProto {
        name: Some("conv_bn".into()),
        node: vec![
            node("Conv", "conv", &conv_inputs, &["a"], vec![]),
            node(
                "BatchNormalization",
                "bn",
                &["a", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                &["y"],
                vec![],
            ),
        ],
        initializer,
        input: vec![value_info("x", &[-1, 3, 4, 4])],
        output: vec![value_info("y", &[-1, 4, 4, 4])],
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

#[test]
fn batch_norm_parameters_of_the_wrong_length_are_refused_naming_the_node() {
    let mut m = conv_bn(None, 3);
    let err = prepare(&mut m, true, &[]).unwrap_err().to_string();
    assert!(
        err.contains("'bn'") && err.contains("3 values") && err.contains("4 output channels"),
        "{err}"
    );
}

#[test]
fn a_conv_bias_that_is_not_float32_keeps_its_batch_norm() {
    // An int64 bias cannot be folded into; it must not be replaced by zeros.
    let bias = TensorProto {
        name: Some("b".into()),
        data_type: Some(7),
        dims: vec![4],
        int64_data: vec![1, 2, 3, 4],
        ..Default::default()
    };
    let mut m = conv_bn(Some(bias), 4);
    let done = prepare(&mut m, true, &[]).unwrap();
    assert!(done.fused.is_empty());
    let g = m.graph.as_ref().unwrap();
    assert_eq!(g.node.len(), 2, "the pair stays");
    assert_eq!(g.node[0].input[2], "b", "the bias is untouched");
    // With a float32 bias the pair folds and the bias enters b' = (b - mean)*s + beta.
    let mut m = conv_bn(Some(init("b", &[4], 45, 0.3)), 4);
    assert_eq!(prepare(&mut m, true, &[]).unwrap().fused, vec!["conv"]);
}

/// The report's per-layer cosine is the cosine, over the first
/// `similarity_samples` samples (two whole batches and part of a third), of
/// each layer's output in the float model and in the fake-quant simulation,
/// computed here from both models' outputs in one run.
#[test]
fn per_layer_cosines_are_those_of_the_layer_outputs() {
    let m = model();
    let names = layer_names(&m);
    let mut config = QuantConfig::default_for(&names);
    config.batch_num = Some(4);
    let all = data(32);
    let dataset =
        Dataset::from_arrays(vec![("x".into(), all.clone())], &["x".into()], "t".into()).unwrap();
    let settings = RunSettings {
        batch_size: 8,
        dynamic_batch: false,
        progress: &|_, _| {},
        similarity_samples: 20,
    };
    let out = calibrate(m.clone(), &config, &dataset, &CpuExecutor, &settings).unwrap();
    let outputs: Vec<String> = out.factors.iter().map(|f| f.layer.output.clone()).collect();
    let fetch: Vec<&str> = outputs.iter().map(String::as_str).collect();
    let first20 = all.slice_axis0(0..20);
    let outputs_of = |model: &ModelProto| {
        CpuExecutor
            .prepare(
                model,
                &SessionOptions {
                    keep: outputs.clone(),
                    ..Default::default()
                },
            )
            .unwrap()
            .run(&[("x", &first20)], &fetch)
            .unwrap()
    };
    let float = outputs_of(&out.prepared);
    // The reference is the fake-quant model the user gets (AMCT's chain of
    // standard operators), not the QDQ model the report is computed on.
    let fake = outputs_of(&out.models().unwrap().1);
    assert_eq!(out.cosine.len(), out.factors.len());
    for ((f, a), b) in out.factors.iter().zip(&float).zip(&fake) {
        let (a, b) = (a.as_f32().unwrap(), b.as_f32().unwrap());
        let expected = cosine(a.as_slice().unwrap(), b.as_slice().unwrap());
        let got = out.cosine[&f.layer.name];
        assert!(
            (got - expected).abs() < 1e-6,
            "{}: {got} vs {expected}",
            f.layer.name
        );
        assert!(
            expected < 1.0 - 1e-9,
            "{}: quantization changes nothing",
            f.layer.name
        );
    }
}
