//! The training graph: its forward pass against the CPU simulator (another
//! engine), and its backward pass against finite differences of its own
//! forward pass, on the digits CNN and on a small model with every other
//! operator it supports.

use ascend_quant::data::read_npy;
use ascend_quant::onnx::attr::{attr_int, attr_ints, attr_string};
use ascend_quant::onnx::builder::node;
use ascend_quant::onnx::proto::{GraphProto, OperatorSetIdProto, ValueInfoProto};
use ascend_quant::onnx::{ModelProto, Storage, load_model, to_proto};
use ascend_quant::sim::{CpuExecutor, Executor, SessionOptions};
use ascend_quant::tensor::Tensor;
use ascend_quant::train::graph::TrainGraph;
use ndarray::{ArrayD, IxDyn};

mod common;

fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * scale
        })
        .collect()
}

/// A float initializer of `shape` with `values(seed, …, scale)`.
fn f32s(name: &str, shape: &[usize], seed: u64, scale: f32) -> ascend_quant::onnx::TensorProto {
    let n = shape.iter().product();
    to_proto(
        name,
        &Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), values(seed, n, scale)).unwrap()),
        Storage::Raw,
    )
}

fn digits_input(n: usize) -> ArrayD<f32> {
    let Tensor::F32(x) = read_npy(&common::digits().join("test_x.npy")).unwrap() else {
        panic!("float images")
    };
    x.slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..n))
        .to_owned()
}

#[test]
fn forward_matches_the_simulator_on_digits() {
    let model = load_model(&common::digits().join("digits_cnn.onnx")).unwrap();
    let g = TrainGraph::new(&model).unwrap();
    let x = digits_input(16);
    let acts = g.forward(&[("x", &x)]).unwrap();
    let ours = acts.get(&g, "logits").unwrap();
    let s = CpuExecutor
        .prepare(
            &model,
            &SessionOptions {
                dynamic_batch: true,
                ..Default::default()
            },
        )
        .unwrap();
    let theirs = s
        .run(&[("x", &Tensor::F32(x.clone()))], &["logits"])
        .unwrap();
    let theirs = theirs[0].as_f32().unwrap();
    assert_eq!(ours.shape(), theirs.shape());
    for (a, b) in ours.iter().zip(theirs.iter()) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

/// Checks ∂L/∂`name` for L = Σ c·output against central differences of the
/// graph's own forward pass, at `probes` elements.
fn check_gradient(
    g: &TrainGraph,
    feeds: &[(&str, ArrayD<f32>)],
    output: &str,
    name: &str,
    probes: usize,
) {
    let refs: Vec<(&str, &ArrayD<f32>)> = feeds.iter().map(|(n, a)| (*n, a)).collect();
    let acts = g.forward(&refs).unwrap();
    let y = acts.get(g, output).unwrap();
    let c = ArrayD::from_shape_vec(y.raw_dim(), values(99, y.len(), 2.0)).unwrap();
    let grads = g.backward(&acts, &[(output, c.clone())]).unwrap();
    let analytic = grads
        .get(g, name)
        .unwrap_or_else(|| panic!("no gradient for {name}"));
    let loss = |g: &TrainGraph, feeds: &[(&str, ArrayD<f32>)]| -> f64 {
        let refs: Vec<(&str, &ArrayD<f32>)> = feeds.iter().map(|(n, a)| (*n, a)).collect();
        let y = g.forward(&refs).unwrap();
        y.get(g, output)
            .unwrap()
            .iter()
            .zip(c.iter())
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    };
    let h = 1e-3f32;
    // What float32 rounding alone can move the difference quotient by: a
    // few ulps of every term of the loss, divided by the step.
    let magnitude: f64 = y
        .iter()
        .zip(c.iter())
        .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
        .sum();
    let noise = 8.0 * f64::from(f32::EPSILON) * magnitude / f64::from(h);
    let len = analytic.len();
    for k in (0..len).step_by((len / probes).max(1)) {
        let perturbed = |delta: f32| -> f64 {
            let mut g2 = g.clone();
            let mut f2: Vec<(&str, ArrayD<f32>)> = feeds.to_vec();
            match g2.constant_mut(name) {
                Some(p) => p.as_slice_mut().unwrap()[k] += delta,
                None => {
                    let f = f2.iter_mut().find(|(n, _)| *n == name).unwrap();
                    f.1.as_slice_mut().unwrap()[k] += delta;
                }
            }
            loss(&g2, &f2)
        };
        let fd = (perturbed(h) - perturbed(-h)) / (2.0 * f64::from(h));
        let a = f64::from(analytic.as_slice().unwrap()[k]);
        assert!(
            (a - fd).abs() <= 2e-3 * fd.abs() + noise,
            "{name}[{k}]: backward {a}, finite difference {fd} (rounding noise {noise})"
        );
    }
}

/// Checks ⟨∂L/∂`name`, d⟩ against the central difference of L along a
/// random direction d of the whole tensor: on a deep float32 model single
/// elements are either too noisy (small steps) or cross ReLU/max-pool kinks
/// (large steps); a directional derivative over all elements is neither.
fn check_directional(g: &TrainGraph, feeds: &[(&str, ArrayD<f32>)], output: &str, name: &str) {
    let refs: Vec<(&str, &ArrayD<f32>)> = feeds.iter().map(|(n, a)| (*n, a)).collect();
    let acts = g.forward(&refs).unwrap();
    let y = acts.get(g, output).unwrap();
    let c = ArrayD::from_shape_vec(y.raw_dim(), values(99, y.len(), 2.0)).unwrap();
    let grads = g.backward(&acts, &[(output, c.clone())]).unwrap();
    let analytic = grads.get(g, name).unwrap();
    // Three random directions: one could miss a wrong gradient component.
    for seed in [42, 43, 44] {
        check_one_direction(g, feeds, output, name, analytic, &c, seed);
    }
}

fn check_one_direction(
    g: &TrainGraph,
    feeds: &[(&str, ArrayD<f32>)],
    output: &str,
    name: &str,
    analytic: &ArrayD<f32>,
    c: &ArrayD<f32>,
    seed: u64,
) {
    let d = values(seed, analytic.len(), 2.0);
    let along: f64 = analytic
        .iter()
        .zip(&d)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let loss_at = |t: f32| -> f64 {
        let mut g2 = g.clone();
        let mut f2: Vec<(&str, ArrayD<f32>)> = feeds.to_vec();
        let target = match g2.constant_mut(name) {
            Some(p) => p,
            None => &mut f2.iter_mut().find(|(n, _)| *n == name).unwrap().1,
        };
        for (v, dv) in target.iter_mut().zip(&d) {
            *v += t * dv;
        }
        let refs: Vec<(&str, &ArrayD<f32>)> = f2.iter().map(|(n, a)| (*n, a)).collect();
        let y = g2.forward(&refs).unwrap();
        y.get(&g2, output)
            .unwrap()
            .iter()
            .zip(c.iter())
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    };
    // Measured on /6/Conv's weight (backward 5.506): the difference quotient
    // is 5.33 at h = 1e-3, 5.43 at 3e-4, 5.41 at 3e-5 — ReLU and max-pool
    // kinks pull it away at large steps, float32 rounding (about 0.03 in
    // absolute terms) at small ones. A wrong backward pass is off by far more.
    let h = 3e-4f32;
    let fd = (loss_at(h) - loss_at(-h)) / (2.0 * f64::from(h));
    assert!(
        (along - fd).abs() <= 0.05 + 0.03 * fd.abs(),
        "{name} (direction {seed}): backward along d {along}, finite difference {fd}"
    );
}

#[test]
fn backward_matches_finite_differences_on_digits() {
    let model = load_model(&common::digits().join("digits_cnn.onnx")).unwrap();
    let g = TrainGraph::new(&model).unwrap();
    let feeds = [("x", digits_input(4))];
    let inits: Vec<String> = model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    for name in inits.iter().map(String::as_str).chain(["x"]) {
        check_directional(&g, &feeds, "logits", name);
    }
}

/// x → dense Conv (stride 2, pads) → Clip(0, 6) → depthwise Conv → Add(skip
/// through AveragePool... ) — every operator the digits model lacks.
fn small_model() -> ModelProto {
    let vi = |n: &str| ValueInfoProto {
        name: Some(n.into()),
        ..Default::default()
    };
    let mut conv = node("Conv", "conv", &["x", "w1", "b1"], &["c1"], vec![]);
    conv.attribute = vec![
        attr_ints("strides", &[2, 2]),
        attr_ints("pads", &[1, 0, 1, 1]),
        attr_ints("kernel_shape", &[3, 3]),
    ];
    let mut dw = node("Conv", "dw", &["r1", "w2", "b2"], &["c2"], vec![]);
    dw.attribute = vec![attr_ints("pads", &[1, 1, 1, 1]), attr_int("group", 4)];
    let mut ct = node("ConvTranspose", "up", &["r1", "wt", "bt"], &["ct"], vec![]);
    ct.attribute = vec![
        attr_ints("strides", &[2, 2]),
        attr_ints("pads", &[1, 0, 1, 1]),
        attr_ints("output_padding", &[1, 0]),
    ];
    let mut avg = node("AveragePool", "avg", &["c2"], &["p"], vec![]);
    avg.attribute = vec![
        attr_ints("kernel_shape", &[2, 2]),
        attr_ints("strides", &[1, 1]),
    ];
    let mut avg2 = node("AveragePool", "avg2", &["r1"], &["p2"], vec![]);
    avg2.attribute = vec![
        attr_ints("kernel_shape", &[2, 2]),
        attr_ints("strides", &[1, 1]),
    ];
    let graph = GraphProto {
        name: Some("small".into()),
        node: vec![
            conv,
            node("Clip", "clip", &["c1", "lo", "hi"], &["r1"], vec![]),
            dw,
            avg,
            avg2,
            node("Add", "add", &["p", "p2"], &["s"], vec![]),
            node("Reshape", "reshape", &["s", "shape"], &["flat"], vec![]),
            node(
                "Gemm",
                "fc",
                &["flat", "w3", "b3"],
                &["y"],
                vec![attr_int("transB", 1)],
            ),
            ct,
        ],
        initializer: vec![
            f32s("w1", &[4, 2, 3, 3], 1, 1.0),
            f32s("b1", &[4], 2, 1.0),
            f32s("lo", &[], 0, 0.0),
            to_proto(
                "hi",
                &Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 0.6)),
                Storage::Raw,
            ),
            f32s("w2", &[4, 1, 3, 3], 3, 1.0),
            f32s("b2", &[4], 4, 1.0),
            to_proto(
                "shape",
                &Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![0, -1]).unwrap()),
                Storage::Raw,
            ),
            f32s("w3", &[3, 4 * 3 * 3], 5, 1.0),
            f32s("b3", &[3], 6, 1.0),
            f32s("wt", &[4, 3, 3, 2], 8, 1.0),
            f32s("bt", &[3], 9, 1.0),
        ],
        input: vec![vi("x")],
        output: vec![vi("y"), vi("ct")],
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
fn every_operator_trains_on_a_small_model() {
    let model = small_model();
    let g = TrainGraph::new(&model).unwrap();
    let x = ArrayD::from_shape_vec(IxDyn(&[2, 2, 7, 8]), values(7, 2 * 2 * 7 * 8, 2.0)).unwrap();
    // The forward pass agrees with the simulator.
    let acts = g.forward(&[("x", &x)]).unwrap();
    let s = CpuExecutor
        .prepare(&model, &SessionOptions::default())
        .unwrap();
    let theirs = s
        .run(&[("x", &Tensor::F32(x.clone()))], &["y", "ct"])
        .unwrap();
    for (name, t) in ["y", "ct"].iter().zip(&theirs) {
        let ours = acts.get(&g, name).unwrap();
        let t = t.as_f32().unwrap();
        assert_eq!(ours.shape(), t.shape(), "{name}");
        for (a, b) in ours.iter().zip(t.iter()) {
            assert!((a - b).abs() < 1e-4, "{name}: {a} vs {b}");
        }
    }
    let feeds = [("x", x)];
    for name in ["w1", "b1", "w2", "b2", "w3", "b3", "x"] {
        check_gradient(&g, &feeds, "y", name, 10);
    }
    for name in ["wt", "bt", "x"] {
        check_gradient(&g, &feeds, "ct", name, 10);
    }
    // ConvTranspose layers fake-quantize too (per output channel = weight axis 1):
    // with 8 bits the output moves a little, and the clips get gradients.
    let mut q = g.clone();
    q.set_quant(
        "up",
        ascend_quant::train::graph::LayerQuant {
            clip_min: 0.0,
            clip_max: 0.6,
            fixed_min: true,
            channel_wise: true,
            ..Default::default()
        },
    )
    .unwrap();
    let refs = [("x", &feeds[0].1)];
    let qa = q.forward(&refs).unwrap();
    let fa = g.forward(&refs).unwrap();
    let (qc, fc) = (qa.get(&q, "ct").unwrap(), fa.get(&g, "ct").unwrap());
    let range = fc.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = qc
        .iter()
        .zip(fc.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff > 0.0 && diff < 0.05 * range, "{diff} of {range}");
    // What the quantized layer must compute, by hand: its input r1 on the
    // grid of [0, 0.6] (step 0.6/255, levels 0..255), its weight on a
    // symmetric grid per output channel (axis 1 of a ConvTranspose weight:
    // max|w|/127, or /128 when the negative side dominates), then the float
    // ConvTranspose on the simulator.
    let r1 = fa.get(&g, "r1").unwrap();
    let step = 0.6f32 / 255.0;
    let r1q = r1.mapv(|v| (v / step).round_ties_even().clamp(0.0, 255.0) * step);
    let wt = model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name() == "wt")
        .unwrap();
    let Tensor::F32(w) = ascend_quant::onnx::to_tensor(wt).unwrap() else {
        panic!("float weight")
    };
    let mut wq = w.clone();
    for c in 0..w.shape()[1] {
        let lane = w.index_axis(ndarray::Axis(1), c);
        let (lo, hi) = lane
            .iter()
            .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        let scale = if -lo > hi { -lo / 128.0 } else { hi / 127.0 };
        wq.index_axis_mut(ndarray::Axis(1), c)
            .mapv_inplace(|v| (v / scale).round_ties_even().clamp(-128.0, 127.0) * scale);
    }
    let mut by_hand = model.clone();
    let t = by_hand
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name() == "wt")
        .unwrap();
    *t = ascend_quant::onnx::to_proto("wt", &Tensor::F32(wq), ascend_quant::onnx::Storage::Raw);
    let s = CpuExecutor
        .prepare(
            &by_hand,
            &SessionOptions {
                keep: vec!["r1".into()],
                ..Default::default()
            },
        )
        .unwrap();
    let want = s
        .run(&[("r1", &Tensor::F32(r1q))], &["ct"])
        .unwrap()
        .remove(0);
    let want = want.as_f32().unwrap();
    for (a, b) in qc.iter().zip(want.iter()) {
        assert!(
            (a - b).abs() <= 1e-5 * range,
            "trained forward {a} vs by hand {b}"
        );
    }
    let seed = ArrayD::from_elem(IxDyn(qc.shape()), 1.0f32);
    let grads = q.backward(&qa, &[("ct", seed)]).unwrap();
    assert!(grads.clips("up").is_some());
}

#[test]
fn an_operator_that_cannot_train_is_named() {
    let mut model = small_model();
    model.graph.as_mut().unwrap().node[1].op_type = Some("Einsum".into());
    let e = TrainGraph::new(&model).unwrap_err().to_string();
    assert!(
        e.contains("node 'clip' (Einsum)") && e.contains("cannot be trained"),
        "{e}"
    );
}

/// With every layer fake-quantized, the training forward pass computes what
/// the exported fake-quant model computes (built by the same emitter as
/// `calibrate` from the clips and the ARQ factors), up to the bias, which
/// training keeps in float and the export rounds to the int32 grid.
#[test]
fn the_quantized_forward_pass_matches_the_exported_fake_quant_model() {
    use ascend_quant::quant::emit::{LayerFactors, fake_quant_model};
    use ascend_quant::quant::layers::discover;
    use ascend_quant::quant::params::ActParams;
    use ascend_quant::quant::weights::{ChannelLayout, arq_scales, quantize_bias, quantize_weight};
    use ascend_quant::train::fake_quant::ulq_grid;
    use ascend_quant::train::graph::LayerQuant;
    let model = load_model(&common::digits().join("digits_cnn.onnx")).unwrap();
    let graph = model.graph.as_ref().unwrap();
    let (layers, _) = discover(graph).unwrap();
    let mut g = TrainGraph::new(&model).unwrap();
    let mut factors = Vec::new();
    for (k, l) in layers.iter().enumerate() {
        let (clip_min, clip_max) = if k == 0 {
            (0.0, 1.0)
        } else {
            (-0.5, 1.5 + k as f32)
        };
        let channel_wise = l.op_type == "Conv";
        g.set_quant(
            &l.name,
            LayerQuant {
                clip_min,
                clip_max,
                fixed_min: false,
                channel_wise,
                ..Default::default()
            },
        )
        .unwrap();
        let grid = ulq_grid(clip_min, clip_max, 8).unwrap();
        let w = g
            .constant_mut(l.weight.as_deref().unwrap())
            .unwrap()
            .clone();
        let layout = if channel_wise {
            l.channel_layout
        } else {
            ChannelLayout::PerTensor
        };
        let scale_w = arq_scales(&l.name, &w, layout, 8).unwrap();
        let bias = l.bias.as_deref().map(|b| {
            g.constant_mut(b)
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<f32>>()
        });
        factors.push(LayerFactors {
            layer: l.clone(),
            act: ActParams {
                scale: grid.scale,
                offset: grid.offset,
            },
            weight_q: Some(quantize_weight(&w, &scale_w, layout, 8)),
            bias_q: bias.map(|b| quantize_bias(&l.name, &b, &scale_w, grid.scale).unwrap()),
            scale_w,
            nuq: None,
            balance: None,
        });
    }
    let x = digits_input(16);
    let acts = g.forward(&[("x", &x)]).unwrap();
    let ours = acts.get(&g, "logits").unwrap();
    let fake = fake_quant_model(&model, &factors).unwrap();
    let s = CpuExecutor
        .prepare(
            &fake,
            &SessionOptions {
                dynamic_batch: true,
                ..Default::default()
            },
        )
        .unwrap();
    let theirs = s.run(&[("x", &Tensor::F32(x))], &["logits"]).unwrap();
    let theirs = theirs[0].as_f32().unwrap();
    let range = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = ours
        .iter()
        .zip(theirs.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // Measured: 0.015 of a range of 14.6 (the bias rounding).
    assert!(
        worst <= 0.003 * range,
        "max |diff| {worst} of range {range}"
    );
    // And the float model differs from both by far more: the check has teeth.
    let float = TrainGraph::new(&model).unwrap();
    let f = float.forward(&[("x", &digits_input(16))]).unwrap();
    let float_diff = f
        .get(&float, "logits")
        .unwrap()
        .iter()
        .zip(theirs.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("quantized vs export: {worst} (range {range}); float vs export: {float_diff}");
    assert!(
        float_diff > 5.0 * worst,
        "float {float_diff} vs quantized {worst}"
    );
    // Clip gradients exist for every quantized layer after a backward pass.
    let seed = ArrayD::from_elem(IxDyn(&[16, 10]), 1.0f32);
    let grads = g.backward(&acts, &[("logits", seed)]).unwrap();
    for l in &layers {
        assert!(grads.clips(&l.name).is_some(), "{}", l.name);
    }
}

/// x → Sigmoid, Mul (SiLU), HardSwish, HardSigmoid, Concat, Transpose,
/// MatMul by a weight, Softmax: the element-wise and layout operators.
fn activation_model() -> ModelProto {
    let vi = |n: &str| ValueInfoProto {
        name: Some(n.into()),
        ..Default::default()
    };
    let graph = GraphProto {
        name: Some("activations".into()),
        node: vec![
            node("Sigmoid", "sig", &["x"], &["s"], vec![]),
            node("Mul", "silu", &["x", "s"], &["m"], vec![]),
            node("HardSwish", "hswish", &["m"], &["hs"], vec![]),
            node("HardSigmoid", "hsig", &["hs"], &["hg"], vec![]),
            node(
                "Concat",
                "cat",
                &["hs", "hg"],
                &["c"],
                vec![attr_int("axis", 1)],
            ),
            node(
                "Transpose",
                "tr",
                &["c"],
                &["t"],
                vec![attr_ints("perm", &[0, 2, 3, 1])],
            ),
            node("MatMul", "mm", &["t", "w"], &["mmo"], vec![]),
            node(
                "Softmax",
                "sm",
                &["mmo"],
                &["y"],
                vec![attr_int("axis", -1)],
            ),
            node(
                "Resize",
                "resize_a",
                &["x", "roi", "scales"],
                &["up"],
                vec![
                    attr_string("mode", "nearest"),
                    attr_string("coordinate_transformation_mode", "asymmetric"),
                    attr_string("nearest_mode", "floor"),
                ],
            ),
            node(
                "Resize",
                "resize_b",
                &["x", "roi", "scales2"],
                &["up2"],
                vec![attr_string("mode", "nearest")],
            ),
        ],
        initializer: vec![
            to_proto(
                "w",
                &Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[6, 3]), values(11, 18, 2.0)).unwrap()),
                Storage::Raw,
            ),
            to_proto(
                "roi",
                &Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[0]), vec![]).unwrap()),
                Storage::Raw,
            ),
            to_proto(
                "scales",
                &Tensor::F32(
                    ArrayD::from_shape_vec(IxDyn(&[4]), vec![1.0, 1.0, 2.0, 2.0]).unwrap(),
                ),
                Storage::Raw,
            ),
            to_proto(
                "scales2",
                &Tensor::F32(
                    ArrayD::from_shape_vec(IxDyn(&[4]), vec![1.0, 1.0, 1.5, 0.6]).unwrap(),
                ),
                Storage::Raw,
            ),
        ],
        input: vec![vi("x")],
        output: vec![vi("y"), vi("up"), vi("up2")],
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
fn activation_and_layout_operators_train() {
    let model = activation_model();
    let g = TrainGraph::new(&model).unwrap();
    let x = ArrayD::from_shape_vec(IxDyn(&[2, 3, 4, 5]), values(12, 120, 10.0)).unwrap();
    let acts = g.forward(&[("x", &x)]).unwrap();
    let s = CpuExecutor
        .prepare(&model, &SessionOptions::default())
        .unwrap();
    let outputs = ["y", "up", "up2"];
    let theirs = s.run(&[("x", &Tensor::F32(x.clone()))], &outputs).unwrap();
    for (name, t) in outputs.iter().zip(&theirs) {
        let ours = acts.get(&g, name).unwrap();
        let t = t.as_f32().unwrap();
        assert_eq!(ours.shape(), t.shape(), "{name}");
        for (a, b) in ours.iter().zip(t.iter()) {
            assert!((a - b).abs() < 1e-5, "{name}: {a} vs {b}");
        }
    }
    // Nearest ×2 with asymmetric coordinates and floor: out[i, j] = in[i / 2, j / 2].
    let up = acts.get(&g, "up").unwrap();
    assert_eq!(up.shape(), &[2, 3, 8, 10]);
    for ((n, c, i, j), v) in up
        .view()
        .into_dimensionality::<ndarray::Ix4>()
        .unwrap()
        .indexed_iter()
    {
        assert_eq!(*v, x[[n, c, i / 2, j / 2]]);
    }
    let feeds = [("x", x)];
    for name in ["w", "x"] {
        check_gradient(&g, &feeds, "y", name, 30);
    }
    for output in ["up", "up2"] {
        check_gradient(&g, &feeds, output, "x", 30);
    }
}

#[test]
fn a_diverging_run_stops_naming_the_step() {
    use ascend_quant::data::Dataset;
    use ascend_quant::train::graph::TrainError;
    use ascend_quant::train::qat::{LossKind, QatSettings, train};
    let mut model = small_model();
    // A weight at float32's limit: the output overflows to infinity.
    let g = model.graph.as_mut().unwrap();
    let w3 = g.initializer.iter_mut().find(|t| t.name() == "w3").unwrap();
    *w3 = to_proto(
        "w3",
        &Tensor::F32(ArrayD::from_elem(IxDyn(&[3, 36]), f32::MAX)),
        Storage::Raw,
    );
    let mut student = TrainGraph::new(&model).unwrap();
    let x = ArrayD::from_shape_vec(IxDyn(&[4, 2, 7, 8]), values(3, 4 * 2 * 7 * 8, 2.0)).unwrap();
    let data = Dataset::from_arrays(
        vec![("x".into(), Tensor::F32(x))],
        &["x".to_string()],
        "memory".into(),
    )
    .unwrap();
    let settings = QatSettings {
        steps: 3,
        batch_size: 2,
        lr: 1e-3,
        clip_lr: 1e-3,
        loss: LossKind::CrossEntropy,
        seed: 0,
        output: None,
    };
    let saved = std::cell::Cell::new(0);
    let e = train(
        &mut student,
        None,
        &[],
        &["w3".to_string()],
        &data,
        Some(&[0, 1, 2, 0]),
        &settings,
        None,
        &mut |_, _| {
            saved.set(saved.get() + 1);
            Ok(())
        },
        &|_, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, TrainError::Diverged(_)), "{e}");
    assert!(e.to_string().contains("at step 1"), "{e}");
    assert_eq!(saved.get(), 0, "no checkpoint of a diverged state");
}

/// A pointwise (1×1, stride 1, unpadded) convolution takes the columns-free
/// path in the backward pass: its gradients against finite differences,
/// batch of 3, with a Relu so the loss is not linear in the input.
#[test]
fn pointwise_convolution_gradients_match_finite_differences() {
    let model = common::model_of(GraphProto {
        name: Some("pointwise".into()),
        node: vec![
            node("Conv", "pw1", &["x", "w1", "b1"], &["c1"], vec![]),
            node("Relu", "relu", &["c1"], &["r1"], vec![]),
            node("Conv", "pw2", &["r1", "w2"], &["y"], vec![]),
        ],
        initializer: vec![
            f32s("w1", &[6, 4, 1, 1], 11, 1.0),
            f32s("b1", &[6], 12, 0.5),
            f32s("w2", &[3, 6, 1, 1], 13, 1.0),
        ],
        input: vec![common::value_info("x", &[3, 4, 5, 5])],
        output: vec![common::value_info("y", &[3, 3, 5, 5])],
        ..Default::default()
    });
    let g = TrainGraph::new(&model).unwrap();
    let x = ArrayD::from_shape_vec(IxDyn(&[3, 4, 5, 5]), values(14, 300, 2.0)).unwrap();
    let feeds = [("x", x)];
    for name in ["w1", "b1", "w2", "x"] {
        check_directional(&g, &feeds, "y", name);
    }
}

/// x → Conv(w) → Pad(pads computed from the input's shape, value 0) →
/// Split in two along the channels → Mul of the halves → Slice: gradients
/// through the evaluated layout operators against finite differences (a
/// smooth model, so single elements are checked, as `check_gradient` does).
#[test]
fn gradients_pass_through_pad_split_and_slice() {
    let i64s = |name: &str, v: &[i64]| {
        to_proto(
            name,
            &Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap()),
            Storage::Raw,
        )
    };
    let mut conv = node("Conv", "conv", &["x", "w"], &["c"], vec![]);
    conv.attribute = vec![attr_ints("kernel_shape", &[3, 3])];
    let nodes = vec![
        conv,
        node("Shape", "shape", &["c"], &["sh"], vec![]),
        node("Slice", "hw", &["sh", "two", "four"], &["hw"], vec![]),
        node("Div", "half", &["hw", "hw"], &["ones"], vec![]),
        node(
            "Concat",
            "pads",
            &["zeros2", "ones", "zeros2", "ones"],
            &["pads"],
            vec![attr_int("axis", 0)],
        ),
        node("Pad", "pad", &["c", "pads", "pad_value"], &["p"], vec![]),
        node(
            "Split",
            "split",
            &["p"],
            &["a", "b"],
            vec![attr_int("axis", 1)],
        ),
        node("Mul", "mul", &["a", "b"], &["m"], vec![]),
        node(
            "Slice",
            "crop",
            &["m", "one1", "big", "ax3"],
            &["y"],
            vec![],
        ),
    ];
    let graph = GraphProto {
        node: nodes,
        input: vec![common::value_info("x", &[1, 2, 6, 6])],
        output: vec![common::value_info("y", &[1, 2, 6, 5])],
        initializer: vec![
            f32s("w", &[4, 2, 3, 3], 3, 1.0),
            i64s("two", &[2]),
            i64s("four", &[4]),
            i64s("zeros2", &[0, 0]),
            i64s("one1", &[1]),
            i64s("big", &[100]),
            i64s("ax3", &[3]),
            to_proto(
                "pad_value",
                &Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 0.0)),
                Storage::Raw,
            ),
        ],
        ..Default::default()
    };
    let model = common::model_of(graph);
    let g = TrainGraph::new(&model).unwrap();
    let x = ArrayD::from_shape_vec(IxDyn(&[1, 2, 6, 6]), values(8, 72, 2.0)).unwrap();
    check_gradient(&g, &[("x", x)], "y", "w", 36);
}

/// Real exports train: a YOLOv8 head's Splits, EfficientNet-Lite's
/// computed Pads and a ViT's bicubic position-embedding Resize build, and
/// the first convolution's weight gets a finite, non-zero gradient
/// (`tests/fixtures/exports`).
#[test]
fn exports_with_split_pad_and_cubic_resize_train() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/exports");
    for (name, input, output, weight) in [
        ("yolov8", "images", "concat_571", "w_2"),
        ("efficientnet_lite", "images", "gemm_3446", "w_67"),
        ("vit", "pixel_values", "logits", "/patch_w_1"),
    ] {
        let model = load_model(&dir.join(format!("{name}.onnx"))).unwrap();
        let mut g = TrainGraph::new(&model).unwrap_or_else(|e| panic!("{name}: {e}"));
        // As `qat` trains: the layers' weights, not the position embeddings.
        g.train_only(&[weight.to_string()]);
        let x: ArrayD<f32> = ndarray_npy::read_npy(dir.join(format!("{name}_input.npy"))).unwrap();
        let first = x.index_axis(ndarray::Axis(0), 0).to_owned();
        let acts = g.forward(&[(input, &first)]).unwrap();
        let y = acts.get(&g, output).unwrap();
        let seed = ArrayD::from_shape_vec(y.raw_dim(), values(5, y.len(), 2.0)).unwrap();
        let grads = g.backward(&acts, &[(output, seed)]).unwrap();
        let gw = grads
            .get(&g, weight)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(
            gw.iter().all(|v| v.is_finite()) && gw.iter().any(|v| *v != 0.0),
            "{name}"
        );
    }
}
