//! Conformance of the CPU simulator against onnxruntime: every single-operator
//! case in `tests/fixtures/node/` (written by `scripts/make_fixtures.py`) must
//! match its committed reference outputs, except the cases listed, with a
//! reason, in `tests/fixtures/known_gaps.txt`.
//!
//! Tolerance: float outputs must satisfy |ours - ref| <= 1e-5 + 1e-4 * |ref|.
//! Both engines compute in float32 but accumulate sums (Conv, Gemm, pooling,
//! Softmax) in different orders; with float32's 6e-8 unit round-off and at most
//! a few hundred terms per sum in these cases the expected gap stays below
//! 1e-5 relative, so 1e-4 leaves a margin without hiding real errors (a wrong
//! pad or rounding mode moves outputs by 1e-2 or more). Integer and boolean
//! outputs must match exactly.

mod common;

use ascend_quant::data::read_npy;
use ascend_quant::onnx::{ModelProto, Storage, load_model, to_proto};
use ascend_quant::sim::{
    CpuExecutor, Executor, NativeExecutor, Session, SessionOptions, engine_plan,
};
use ascend_quant::tensor::Tensor;
use common::value_info;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    inputs: usize,
    outputs: usize,
}

/// Compares `ours` with `reference`, returning a description of the first difference.
pub fn compare(ours: &Tensor, reference: &Tensor) -> Result<(), String> {
    if ours.shape() != reference.shape() {
        return Err(format!(
            "shape {:?} != reference {:?}",
            ours.shape(),
            reference.shape()
        ));
    }
    if ours.dtype() != reference.dtype() {
        return Err(format!(
            "dtype {} != reference {}",
            ours.dtype(),
            reference.dtype()
        ));
    }
    let float = matches!(reference, Tensor::F32(_) | Tensor::F64(_) | Tensor::F16(_));
    for (i, (a, b)) in ours
        .to_f64_vec()
        .into_iter()
        .zip(reference.to_f64_vec())
        .enumerate()
    {
        let ok = if float {
            (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-5 + 1e-4 * b.abs()
        } else {
            a == b
        };
        if !ok {
            return Err(format!("element {i}: {a} != reference {b}"));
        }
    }
    Ok(())
}

fn run_case(executor: &dyn Executor, dir: &Path, case: &Case) -> Result<(), String> {
    let model = load_model(&dir.join("model.onnx")).map_err(|e| e.to_string())?;
    run_model(executor, &model, dir, case)
}

/// The case's model with every input after the first made an initializer
/// holding the case's data: weights, biases and limits as real models
/// carry them (the reference outputs are unchanged).
/// `None` when an input is in a type our `.npy` reader does not take.
fn with_constant_inputs(dir: &Path, case: &Case) -> Option<ModelProto> {
    let mut model = load_model(&dir.join("model.onnx")).unwrap();
    let g = model.graph.as_mut().unwrap();
    let names: Vec<String> = g.input.iter().map(|v| v.name().to_string()).collect();
    for (k, name) in names.iter().enumerate().take(case.inputs).skip(1) {
        let t = read_npy(&dir.join(format!("input_{k}.npy"))).ok()?;
        g.initializer.push(to_proto(name, &t, Storage::Raw));
    }
    Some(model)
}

fn run_model(
    executor: &dyn Executor,
    model: &ModelProto,
    dir: &Path,
    case: &Case,
) -> Result<(), String> {
    let session = executor
        .prepare(model, &SessionOptions::default())
        .map_err(|e| e.to_string())?;
    let inputs: Vec<Tensor> = (0..case.inputs)
        .map(|k| read_npy(&dir.join(format!("input_{k}.npy"))).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let graph = model.graph.as_ref().unwrap();
    let names: Vec<&str> = graph.input.iter().map(|v| v.name()).collect();
    let fed: Vec<&str> = session.inputs().iter().map(|s| s.name.as_str()).collect();
    let feeds: Vec<(&str, &Tensor)> = names
        .iter()
        .copied()
        .zip(&inputs)
        .filter(|(n, _)| fed.contains(n))
        .collect();
    let outs: Vec<&str> = graph.output.iter().map(|v| v.name()).collect();
    let got = session.run(&feeds, &outs).map_err(|e| e.to_string())?;
    for k in 0..case.outputs {
        let reference =
            read_npy(&dir.join(format!("output_{k}.npy"))).map_err(|e| e.to_string())?;
        compare(&got[k], &reference).map_err(|e| format!("output {k} ({}): {e}", outs[k]))?;
    }
    Ok(())
}

fn known_gaps() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(fixtures().join("known_gaps.txt")).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, why) = l.split_once(' ').unwrap_or((l, ""));
            (name.to_string(), why.trim().to_string())
        })
        .collect()
}

#[test]
fn node_cases_match_onnxruntime_except_known_gaps() {
    let base = fixtures().join("node");
    let manifest: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(base.join("manifest.json")).unwrap())
            .unwrap();
    assert!(
        manifest.len() > 200,
        "fixtures are missing: run scripts/make_fixtures.py"
    );
    let gaps = known_gaps();
    let mut passed = 0;
    let mut unexpected = Vec::new();
    let mut fixed = Vec::new();
    for case in &manifest {
        let result = run_case(&CpuExecutor, &base.join(&case.name), case);
        match (result, gaps.contains_key(&case.name)) {
            (Ok(()), false) => passed += 1,
            (Ok(()), true) => fixed.push(case.name.clone()),
            (Err(e), false) => unexpected.push(format!("{}: {e}", case.name)),
            (Err(_), true) => {}
        }
    }
    let unknown: Vec<&String> = gaps
        .keys()
        .filter(|g| !manifest.iter().any(|c| &c.name == *g))
        .collect();
    println!(
        "conformance: {passed} of {} node cases pass, {} known engine gaps",
        manifest.len(),
        gaps.len()
    );
    assert!(
        unexpected.is_empty(),
        "cases failing that are not known gaps:\n{}",
        unexpected.join("\n")
    );
    assert!(
        fixed.is_empty(),
        "known gaps that now pass; remove them from known_gaps.txt: {fixed:?}"
    );
    assert!(
        unknown.is_empty(),
        "known_gaps.txt names cases that do not exist: {unknown:?}"
    );
}

/// Every case the native engine accepts matches onnxruntime, gaps or not.
#[test]
fn node_cases_the_native_engine_runs_match_onnxruntime() {
    let base = fixtures().join("node");
    let manifest: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(base.join("manifest.json")).unwrap())
            .unwrap();
    let mut ran = Vec::new();
    let mut failed = Vec::new();
    for case in &manifest {
        let dir = base.join(&case.name);
        let Some(model) = with_constant_inputs(&dir, case) else {
            continue;
        };
        // Natively means every node on the native engine (none alone on rten).
        let native = engine_plan(&model, &SessionOptions::default())
            .is_ok_and(|p| !p.whole_on_rten && p.declined.is_empty());
        if !native {
            continue;
        }
        ran.push(case.name.clone());
        if let Err(e) = run_model(&NativeExecutor, &model, &dir, case) {
            failed.push(format!("{}: {e}", case.name));
        }
    }
    println!(
        "native engine: {} of {} node cases run: {ran:?}",
        ran.len(),
        manifest.len()
    );
    assert!(
        failed.is_empty(),
        "native engine failures:\n{}",
        failed.join("\n")
    );
    // The operators it claims are exercised (conv, pools, arithmetic, layout, ...).
    for op in [
        "conv",
        "maxpool",
        "averagepool",
        "add",
        "mul",
        "concat",
        "reshape",
        "gemm",
        "relu",
        "clip",
        "sigmoid",
        "softmax",
        "flatten",
        "globalaveragepool",
        "transpose",
        "slice",
        "gather",
        "unsqueeze",
        "squeeze",
        "leakyrelu",
        "hardsigmoid",
        "hardswish",
        "tanh",
        "sub",
        "div",
        "constant_pad",
        "matmul",
        "resize_upsample_scales_cubic",
        "resize_tf_crop_and_resize",
        "resize_downsample_scales_linear",
        "resize_upsample_sizes_nearest",
    ] {
        assert!(
            ran.iter().any(|c| c.starts_with(op)),
            "no {op} case ran natively"
        );
    }
}

#[test]
fn digits_cnn_matches_onnxruntime_per_sample_and_batched() {
    let dir = fixtures().join("digits");
    let model = load_model(&dir.join("digits_cnn.onnx")).unwrap();
    let x = read_npy(&dir.join("ort_x16.npy")).unwrap();
    let reference = read_npy(&dir.join("ort_logits16.npy")).unwrap();
    // The model declares batch 1; a dynamic-batch session runs all 16 at once.
    let session = CpuExecutor
        .prepare(
            &model,
            &SessionOptions {
                dynamic_batch: true,
                ..Default::default()
            },
        )
        .unwrap();
    let got = session.run(&[("x", &x)], &["logits"]).unwrap();
    compare(&got[0], &reference).unwrap();
    // And one sample through the model exactly as declared.
    let fixed = CpuExecutor
        .prepare(&model, &SessionOptions::default())
        .unwrap();
    let one = Tensor::F32(
        x.as_f32()
            .unwrap()
            .slice(ndarray::s![0..1, .., .., ..])
            .to_owned()
            .into_dyn(),
    );
    let got = fixed.run(&[("x", &one)], &["logits"]).unwrap();
    let ref0 = Tensor::F32(
        reference
            .as_f32()
            .unwrap()
            .slice(ndarray::s![0..1, ..])
            .to_owned()
            .into_dyn(),
    );
    compare(&got[0], &ref0).unwrap();
}

/// The digits model prepared by `executor` keeping its first Relu's output,
/// that output's name, and sample 0's input, Relu output and logits as
/// onnxruntime computed them.
fn digits_first_sample(
    executor: &dyn Executor,
) -> (Box<dyn Session>, String, Tensor, Tensor, Tensor) {
    let dir = fixtures().join("digits");
    let model = load_model(&dir.join("digits_cnn.onnx")).unwrap();
    let tap = std::fs::read_to_string(dir.join("first_relu_name.txt")).unwrap();
    let session = executor
        .prepare(
            &model,
            &SessionOptions {
                keep: vec![tap.clone()],
                ..Default::default()
            },
        )
        .unwrap();
    let first = |t: &Tensor| {
        let a = t.as_f32().unwrap();
        Tensor::F32(a.slice_axis(ndarray::Axis(0), (0..1).into()).to_owned())
    };
    let x0 = first(&read_npy(&dir.join("ort_x16.npy")).unwrap());
    let reference_tap = read_npy(&dir.join("ort_first_relu_x0.npy")).unwrap();
    let logits0 = first(&read_npy(&dir.join("ort_logits16.npy")).unwrap());
    (session, tap, x0, reference_tap, logits0)
}

#[test]
fn digits_tap_and_replay_of_an_intermediate_value() {
    let (session, tap, x0, reference_tap, logits0) = digits_first_sample(&CpuExecutor);
    let got = session
        .run(&[("x", &x0)], &[tap.as_str(), "logits"])
        .unwrap();
    compare(&got[0], &reference_tap).unwrap();
    compare(&got[1], &logits0).unwrap();
    // Feeding the tapped value alone reproduces the logits: the layers before it are skipped.
    let replay = session
        .run(&[(tap.as_str(), &reference_tap)], &["logits"])
        .unwrap();
    compare(&replay[0], &logits0).unwrap();
}

/// `run_visiting` hands every fetched value over once per mention, with the
/// values onnxruntime computes, whether it is computed (an intermediate value
/// the later layers still need, the graph output) or fed, and fetched twice.
#[test]
fn digits_visiting_run_hands_over_onnxruntime_values() {
    let (session, tap, x0, reference_tap, logits0) = digits_first_sample(&NativeExecutor);
    let fetch = [tap.as_str(), "logits", tap.as_str()];
    let expected = [&reference_tap, &logits0, &reference_tap];
    // Computed from the input, then fed the kept value (the layers before it skipped).
    for feed in [("x", &x0), (tap.as_str(), &reference_tap)] {
        let mut seen = [0; 3];
        let mut failures = Vec::new();
        session
            .run_visiting(&[feed], &fetch, &mut |k, value| {
                seen[k] += 1;
                if let Err(e) = compare(value, expected[k]) {
                    failures.push(format!("{}: {e}", fetch[k]));
                }
            })
            .unwrap();
        assert_eq!(seen, [1; 3], "fed {}", feed.0);
        assert!(failures.is_empty(), "fed {}: {failures:?}", feed.0);
    }
}

/// A Relu is folded into the Conv before it only when nothing else needs the
/// Conv's own output: keeping that output must give the values before the Relu.
#[test]
fn a_kept_convolution_output_is_not_fused_with_its_relu() {
    use ascend_quant::onnx::builder::node;
    use ascend_quant::onnx::proto::GraphProto;
    let w = Tensor::F32(
        ndarray::ArrayD::from_shape_vec(
            ndarray::IxDyn(&[2, 1, 3, 3]),
            (0..18).map(|i| (i as f32 - 8.5) / 9.0).collect(),
        )
        .unwrap(),
    );
    let model = common::model_of(GraphProto {
        node: vec![
            node("Conv", "conv", &["x", "w"], &["c"], vec![]),
            node("Relu", "relu", &["c"], &["y"], vec![]),
        ],
        initializer: vec![to_proto("w", &w, Storage::Raw)],
        input: vec![value_info("x", &[1, 1, 5, 5])],
        output: vec![value_info("y", &[1, 2, 3, 3])],
        ..Default::default()
    });
    let x = Tensor::F32(
        ndarray::ArrayD::from_shape_vec(
            ndarray::IxDyn(&[1, 1, 5, 5]),
            (0..25).map(|i| ((i * 7) % 11) as f32 - 5.0).collect(),
        )
        .unwrap(),
    );
    for keep in [vec![], vec!["c".to_string()]] {
        let session = NativeExecutor
            .prepare(
                &model,
                &SessionOptions {
                    keep: keep.clone(),
                    ..Default::default()
                },
            )
            .unwrap();
        let y = session.run(&[("x", &x)], &["y"]).unwrap().remove(0);
        let y = y.as_f32().unwrap().clone();
        assert!(y.iter().all(|v| *v >= 0.0) && y.iter().any(|v| *v > 0.0));
        if keep.is_empty() {
            continue;
        }
        let c = session.run(&[("x", &x)], &["c"]).unwrap().remove(0);
        let c = c.as_f32().unwrap().clone();
        assert!(
            c.iter().any(|v| *v < 0.0),
            "the kept value lost its negatives"
        );
        for (a, b) in c.iter().zip(&y) {
            assert_eq!(a.max(0.0), *b);
        }
        // Feeding the kept value replays only the Relu.
        let replay = session
            .run(&[("c", &Tensor::F32(c.clone()))], &["y"])
            .unwrap();
        assert_eq!(replay[0].as_f32().unwrap(), &y);
    }
}

/// The two quantization chains the models we write hold — the fake-quant
/// chain `Mul(1/s) → Round → Add(o) → Clip → Sub(o)` and a per-tensor
/// `QuantizeLinear → DequantizeLinear` pair — run natively (each folded
/// into one pass) and give ONNX's arithmetic, written out here, bit for bit.
#[test]
fn quantization_chains_run_natively_with_onnx_arithmetic() {
    use ascend_quant::onnx::builder::{constant, constant_f32, node};
    use ascend_quant::onnx::proto::GraphProto;
    let (inv, offset, scale, zp) = (1.0f32 / 0.0437, -3.0f32, 0.0437f32, -3i8);
    let nodes = vec![
        constant_f32("c0", "inv", &[], vec![inv]),
        constant_f32("c1", "off", &[], vec![offset]),
        constant_f32("c2", "lo", &[], vec![-128.0]),
        constant_f32("c3", "hi", &[], vec![127.0]),
        constant_f32("c4", "s", &[], vec![scale]),
        constant(
            "c5",
            "z",
            &Tensor::I8(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), zp)),
        ),
        node("Mul", "m", &["x", "inv"], &["m.out"], vec![]),
        node("Round", "r", &["m.out"], &["r.out"], vec![]),
        node("Add", "a", &["r.out", "off"], &["a.out"], vec![]),
        node("Clip", "c", &["a.out", "lo", "hi"], &["c.out"], vec![]),
        node("Sub", "d", &["c.out", "off"], &["fake"], vec![]),
        node("QuantizeLinear", "q", &["x", "s", "z"], &["q.out"], vec![]),
        node(
            "DequantizeLinear",
            "dq",
            &["q.out", "s", "z"],
            &["qdq"],
            vec![],
        ),
    ];
    let model = common::model_of(GraphProto {
        node: nodes,
        input: vec![value_info("x", &[2, 500])],
        output: vec![value_info("fake", &[2, 500]), value_info("qdq", &[2, 500])],
        ..Default::default()
    });
    // Values across and beyond the grid, and exact halves of a step.
    let xs: Vec<f32> = (0..1000)
        .map(|i| (i as f32 - 500.0) * 0.0137 + if i % 7 == 0 { 0.5 * scale } else { 0.0 })
        .collect();
    let x = Tensor::F32(
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 500]), xs.clone()).unwrap(),
    );
    let session = NativeExecutor
        .prepare(&model, &SessionOptions::default())
        .unwrap();
    let got = session.run(&[("x", &x)], &["fake", "qdq"]).unwrap();
    let (fake, qdq) = (got[0].as_f32().unwrap(), got[1].as_f32().unwrap());
    for (k, &v) in xs.iter().enumerate() {
        let f = ((v * inv).round_ties_even() + offset).clamp(-128.0, 127.0) - offset;
        let q = ((v / scale).round_ties_even() + f32::from(zp)).clamp(-128.0, 127.0);
        let d = (q - f32::from(zp)) * scale;
        assert_eq!(fake.as_slice().unwrap()[k], f, "fake-quant at {v}");
        assert_eq!(qdq.as_slice().unwrap()[k], d, "QDQ at {v}");
    }
}

/// The native engine adds a residual inside the Conv before the Add
/// (`Add(conv, r)` when nothing else reads `conv`). Checked against the
/// definition computed here in f64: a pointwise Conv plus the block input
/// (same shape, added in the kernel), a 3×3 Conv plus a per-channel constant
/// (broadcast: added as the Add would) and plus its input (added after the
/// GEMM), a Conv whose residual is computed after it in node order, and a
/// Conv output also read elsewhere (not fused).
#[test]
fn residual_adds_fused_into_convolutions_match_the_definition() {
    use ascend_quant::onnx::builder::node;
    use ascend_quant::onnx::proto::GraphProto;
    let (c, h, w) = (24usize, 7usize, 9usize);
    let tensor = |dims: &[usize], v: Vec<f32>| {
        Tensor::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(dims), v).unwrap())
    };
    // Weights scaled so that every layer's outputs stay near 1 (the check
    // is relative to them).
    let scaled = |v: Vec<f32>, fan_in: usize| -> Vec<f32> {
        v.iter().map(|x| x * 2.0 / (fan_in as f32).sqrt()).collect()
    };
    let w1 = scaled(common::signed_values(1, c * c), c);
    let b1 = common::signed_values(2, c);
    let w3 = scaled(common::signed_values(3, c * c * 9), c * 9);
    let k = common::signed_values(4, c);
    let pads = ascend_quant::onnx::attr::attr_ints("pads", &[1, 1, 1, 1]);
    let model = common::model_of(GraphProto {
        node: vec![
            node("Conv", "pw", &["x", "w1", "b1"], &["p"], vec![]),
            node("Add", "add_x", &["x", "p"], &["s"], vec![]),
            node("Conv", "c3", &["s", "w3"], &["t"], vec![pads.clone()]),
            node("Add", "add_k", &["t", "k"], &["u"], vec![]),
            node("Conv", "pw2", &["u", "w1"], &["v"], vec![]),
            node("Relu", "later", &["u"], &["r"], vec![]),
            node("Add", "add_r", &["v", "r"], &["y"], vec![]),
            node("Conv", "c3b", &["y", "w3"], &["q0"], vec![pads.clone()]),
            node("Add", "add_q", &["q0", "y"], &["q"], vec![]),
            node("Conv", "pw3", &["q", "w1"], &["z0"], vec![]),
            node("Add", "add_z", &["z0", "q"], &["z"], vec![]),
        ],
        initializer: vec![
            to_proto("w1", &tensor(&[c, c, 1, 1], w1.clone()), Storage::Raw),
            to_proto("b1", &tensor(&[c], b1.clone()), Storage::Raw),
            to_proto("w3", &tensor(&[c, c, 3, 3], w3.clone()), Storage::Raw),
            to_proto("k", &tensor(&[c, 1, 1], k.clone()), Storage::Raw),
        ],
        input: vec![value_info("x", &[2, c as i64, h as i64, w as i64])],
        output: vec![
            value_info("z", &[2, c as i64, h as i64, w as i64]),
            value_info("z0", &[2, c as i64, h as i64, w as i64]),
        ],
        ..Default::default()
    });
    let x = common::signed_values(5, 2 * c * h * w);
    // The definition: NCHW convolution (zero padding `pad`), in f64.
    let conv = |x: &[f64], wt: &[f32], bias: Option<&[f32]>, kk: usize, pad: usize| {
        let mut out = vec![0f64; 2 * c * h * w];
        for n in 0..2 {
            for o in 0..c {
                for y in 0..h {
                    for xx in 0..w {
                        let mut acc = bias.map_or(0.0, |b| f64::from(b[o]));
                        for i in 0..c {
                            for ky in 0..kk {
                                for kx in 0..kk {
                                    let (iy, ix) = (y + ky, xx + kx);
                                    if iy < pad || ix < pad || iy - pad >= h || ix - pad >= w {
                                        continue;
                                    }
                                    acc += f64::from(wt[((o * c + i) * kk + ky) * kk + kx])
                                        * x[((n * c + i) * h + iy - pad) * w + ix - pad];
                                }
                            }
                        }
                        out[((n * c + o) * h + y) * w + xx] = acc;
                    }
                }
            }
        }
        out
    };
    let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let add = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a + b).collect::<Vec<_>>();
    let s = add(&conv(&xd, &w1, Some(&b1), 1, 0), &xd);
    let t = conv(&s, &w3, None, 3, 1);
    let u: Vec<f64> = t
        .iter()
        .enumerate()
        .map(|(i, v)| v + f64::from(k[i / (h * w) % c]))
        .collect();
    let r: Vec<f64> = u.iter().map(|v| v.max(0.0)).collect();
    let y = add(&conv(&u, &w1, None, 1, 0), &r);
    let q = add(&conv(&y, &w3, None, 3, 1), &y);
    let z0 = conv(&q, &w1, None, 1, 0);
    let z = add(&z0, &q);
    let session = NativeExecutor
        .prepare(&model, &SessionOptions::default())
        .unwrap();
    let xt = tensor(&[2, c, h, w], x);
    let got = session.run(&[("x", &xt)], &["z", "z0"]).unwrap();
    for (name, got, want) in [("z", &got[0], &z), ("z0", &got[1], &z0)] {
        let got = got.as_f32().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, e)) in got.iter().zip(want.iter()).enumerate() {
            assert!(
                (f64::from(*g) - e).abs() <= 1e-4 * (1.0 + e.abs()),
                "{name}[{i}]: {g} vs {e}"
            );
        }
    }
}
