//! The simulator runs deploy models with the device's int32 accumulation:
//! a convolution and a Gemm whose sums pass 2^24 (where float32 stops holding every
//! integer) against an exact integer reference computed here; and a batch
//! larger than a model was exported for runs where a per-sample loop would.

mod common;

use ascend_quant::data::Dataset;
use ascend_quant::deploy_format::{QuantAttrs, unpack_deq_scale};
use ascend_quant::onnx::builder::node;
use ascend_quant::onnx::proto::AttributeProto;
use ascend_quant::onnx::{GraphProto, ModelProto, Storage, to_proto, to_tensor};
use ascend_quant::quant::calibrate::{RunSettings, calibrate};
use ascend_quant::quant::config::QuantConfig;
use ascend_quant::sim::{CpuExecutor, Executor, NativeExecutor, RtenExecutor, SessionOptions};
use ascend_quant::tensor::Tensor;
use common::{model_x_to_y, value_info};
use ndarray::{ArrayD, IxDyn};

fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// What the deploy model holds for its one quantized layer `layer`, after
/// calibrating `m` on `x` in one batch.
struct Deployed {
    deploy: ModelProto,
    quant: QuantAttrs,
    weight: ArrayD<i8>,
    bias: ArrayD<i32>,
    deq: Vec<u64>,
}

impl Deployed {
    fn new(m: &ModelProto, x: &ArrayD<f32>, layer: &str) -> Deployed {
        Deployed::configured(m, x, layer, |_| {})
    }

    /// As `new`, with the default configuration changed by `edit` first.
    fn configured(
        m: &ModelProto,
        x: &ArrayD<f32>,
        layer: &str,
        edit: impl Fn(&mut QuantConfig),
    ) -> Deployed {
        let layers = ascend_quant::pipeline::inputs::layer_names(m).unwrap();
        let mut config = QuantConfig::default_for(&layers);
        config.batch_num = Some(1);
        edit(&mut config);
        let data = Dataset::from_arrays(
            vec![("x".into(), Tensor::F32(x.clone()))],
            &["x".into()],
            "t".into(),
        )
        .unwrap();
        let settings = RunSettings {
            batch_size: x.shape()[0],
            dynamic_batch: false,
            progress: &|_, _| {},
            similarity_samples: 0,
        };
        let deploy = calibrate(m.clone(), &config, &data, &CpuExecutor, &settings)
            .unwrap()
            .models()
            .unwrap()
            .0;
        let g = deploy.graph.as_ref().unwrap();
        let find = |op: &str| g.node.iter().find(|n| n.op_type() == op).unwrap();
        let node = g.node.iter().find(|n| n.name() == layer).unwrap();
        let init = |name: &str| {
            to_tensor(g.initializer.iter().find(|t| t.name() == name).unwrap()).unwrap()
        };
        // A MatMul's bias is the constant of the Add after it (or none).
        let bias_add = g
            .node
            .iter()
            .find(|n| n.op_type() == "Add" && n.input.contains(&node.output[0]));
        let bias = match (node.input.get(2), bias_add) {
            (Some(b), _) => init(b),
            (None, Some(add)) => init(add.input.iter().find(|i| **i != node.output[0]).unwrap()),
            (None, None) => Tensor::I32(ArrayD::zeros(IxDyn(&[0]))),
        };
        let (Tensor::I8(weight), Tensor::I32(bias), Tensor::U64(deq)) = (
            init(&node.input[1]),
            bias,
            init(&find("AscendDequant").input[1]),
        ) else {
            panic!("deploy tensors")
        };
        Deployed {
            quant: QuantAttrs::read(find("AscendQuant")).unwrap(),
            weight,
            bias,
            deq: deq.iter().copied().collect(),
            deploy,
        }
    }

    /// The device's input levels minus the offset:
    /// `sat(round_half_even(x·scale + offset)) − offset`.
    fn levels(&self, x: &ArrayD<f32>) -> ArrayD<i64> {
        let (scale, offset) = (self.quant.scale, self.quant.offset);
        x.mapv(|v| {
            ((v * scale + offset).round_ties_even()).clamp(-128.0, 127.0) as i64 - offset as i64
        })
    }

    /// Output channel `c`'s dequantization factor.
    fn deq_scale(&self, c: usize) -> f32 {
        unpack_deq_scale(self.deq[if self.deq.len() == 1 { 0 } else { c }]).scale
    }

    /// How many outputs of the simulated deploy model differ in any bit
    /// from `want`, on each engine: the native one (integer kernels) and
    /// rten (the lowering to standard operators).
    fn differing(&self, x: ArrayD<f32>, want: &ArrayD<f32>) -> Vec<(&'static str, usize)> {
        let engines: [&dyn Executor; 2] = [&NativeExecutor, &RtenExecutor];
        engines
            .iter()
            .map(|e| {
                let s = e.prepare(&self.deploy, &SessionOptions::default()).unwrap();
                let x = Tensor::F32(x.clone());
                let Tensor::F32(got) = s.run(&[("x", &x)], &["y"]).unwrap().remove(0) else {
                    panic!("float output")
                };
                assert_eq!(got.shape(), want.shape());
                let differ = got
                    .iter()
                    .zip(want.iter())
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                (e.name(), differ)
            })
            .collect()
    }

    /// Asserts that no output differs from `want` on either engine.
    fn assert_exact(&self, x: ArrayD<f32>, want: &ArrayD<f32>) {
        for (engine, differ) in self.differing(x, want) {
            assert_eq!(
                differ,
                0,
                "{engine}: {differ} of {} outputs differ from the integer reference",
                want.len()
            );
        }
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(7),
        ints: v.to_vec(),
        ..Default::default()
    }
}

#[test]
fn a_convolution_past_two_to_the_24_accumulates_exactly() {
    let (cin, cout, hw) = (512usize, 4usize, 5usize);
    // Positive weights and inputs in [0, 1): every product adds up, sums reach ~4e7.
    let w = ArrayD::from_shape_vec(IxDyn(&[cout, cin, 3, 3]), values(1, cout * cin * 9)).unwrap();
    let b = ArrayD::from_shape_vec(IxDyn(&[cout]), vec![0.5f32, -0.25, 1.0, 0.0]).unwrap();
    let conv = node(
        "Conv",
        "conv",
        &["x", "w", "b"],
        &["y"],
        vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])],
    );
    let (cin_i, cout_i, hw_i) = (cin as i64, cout as i64, hw as i64);
    let m = model_x_to_y(
        vec![conv],
        vec![("w", w), ("b", b)],
        &[2, cin_i, hw_i, hw_i],
        &[2, cout_i, hw_i, hw_i],
    );
    let x = ArrayD::from_shape_vec(IxDyn(&[2, cin, hw, hw]), values(2, 2 * cin * hw * hw)).unwrap();
    let d = Deployed::new(&m, &x, "conv");
    // The device: acc = Σ (q − offset)·w + bias in integers, y = float32(acc)·deq.
    let q = d.levels(&x);
    let mut want = ArrayD::<f32>::zeros(IxDyn(&[2, cout, hw, hw]));
    let mut largest = 0i64;
    for n in 0..2 {
        for co in 0..cout {
            for oy in 0..hw {
                for ox in 0..hw {
                    let mut acc = i64::from(d.bias[co]);
                    for ci in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) =
                                    (oy as i64 + ky as i64 - 1, ox as i64 + kx as i64 - 1);
                                if iy < 0 || ix < 0 || iy >= hw as i64 || ix >= hw as i64 {
                                    continue;
                                }
                                acc += q[[n, ci, iy as usize, ix as usize]]
                                    * i64::from(d.weight[[co, ci, ky, kx]]);
                            }
                        }
                    }
                    largest = largest.max(acc.abs());
                    want[[n, co, oy, ox]] = acc as i32 as f32 * d.deq_scale(co);
                }
            }
        }
    }
    assert!(largest > 1 << 24, "the sums must pass 2^24: {largest}");
    d.assert_exact(x, &want);
}

/// The same for a Gemm with 4096 inputs (PyTorch's `transB = 1` layout), the
/// deploy model's integer matrix product against integers summed here.
#[test]
fn a_gemm_past_two_to_the_24_accumulates_exactly() {
    let (k, m_out, n) = (4096usize, 3usize, 4usize);
    let w = ArrayD::from_shape_vec(IxDyn(&[m_out, k]), values(11, m_out * k)).unwrap();
    let b = ArrayD::from_shape_vec(IxDyn(&[m_out]), vec![0.5f32, -2.0, 0.0]).unwrap();
    let trans_b = AttributeProto {
        name: Some("transB".into()),
        r#type: Some(2),
        i: Some(1),
        ..Default::default()
    };
    let m = model_x_to_y(
        vec![node("Gemm", "fc", &["x", "w", "b"], &["y"], vec![trans_b])],
        vec![("w", w), ("b", b)],
        &[n as i64, k as i64],
        &[n as i64, m_out as i64],
    );
    let x = ArrayD::from_shape_vec(IxDyn(&[n, k]), values(12, n * k)).unwrap();
    let d = Deployed::new(&m, &x, "fc");
    // The deploy weight is [k, m] or [m, k]: read it by its shape.
    let transposed = d.weight.shape() == [m_out, k];
    let q = d.levels(&x);
    let mut want = ArrayD::<f32>::zeros(IxDyn(&[n, m_out]));
    let mut largest = 0i64;
    for i in 0..n {
        for j in 0..m_out {
            let mut acc = i64::from(d.bias[j]);
            for t in 0..k {
                let wv = if transposed {
                    d.weight[[j, t]]
                } else {
                    d.weight[[t, j]]
                };
                acc += q[[i, t]] * i64::from(wv);
            }
            largest = largest.max(acc.abs());
            want[[i, j]] = acc as i32 as f32 * d.deq_scale(j);
        }
    }
    assert!(largest > 1 << 24, "the sums must pass 2^24: {largest}");
    d.assert_exact(x, &want);
}

/// A MatMul and its bias Add on a 3-D input (a sequence of 3 vectors of
/// 4096 values per sample), against integers summed here.
#[test]
fn a_matmul_past_two_to_the_24_accumulates_exactly() {
    matmul_past_two_to_the_24(&["mm.y", "b"]);
}

/// PyTorch exports a Linear layer's bias Add as `Add(bias, matmul)`: its
/// bias is folded into the int32 bias as well, nothing stays in float.
#[test]
fn a_bias_add_written_bias_first_is_folded_too() {
    matmul_past_two_to_the_24(&["b", "mm.y"]);
    let w = ArrayD::from_shape_vec(IxDyn(&[8, 4]), values(23, 32)).unwrap();
    let bias = ArrayD::from_shape_vec(IxDyn(&[4]), vec![0.5f32, -1.0, 0.25, 2.0]).unwrap();
    let m = model_x_to_y(
        vec![
            node("MatMul", "mm", &["x", "w"], &["mm.y"], vec![]),
            node("Add", "mm.bias", &["b", "mm.y"], &["y"], vec![]),
        ],
        vec![("w", w), ("b", bias)],
        &[2, 3, 8],
        &[2, 3, 4],
    );
    let x = ArrayD::from_shape_vec(IxDyn(&[2, 3, 8]), values(24, 48)).unwrap();
    let d = Deployed::new(&m, &x, "mm");
    let g = d.deploy.graph.as_ref().unwrap();
    let order: Vec<&str> = g.node.iter().map(|n| n.op_type()).collect();
    assert_eq!(
        order,
        ["AscendQuant", "MatMul", "Add", "AscendDequant"],
        "the Add sits between the int8 MatMul and the dequantization"
    );
}

/// `channel_wise` on a MatMul: one weight scale per output column (ARQ
/// computed here by hand from each column's extremes), the deploy model's
/// dequantization a vector of them, its bias quantized with each column's
/// scale, and both engines exact against the integer reference.
#[test]
fn a_matmul_quantized_per_column_dequantizes_each_column_exactly() {
    let (b, s, k, n) = (2usize, 3usize, 64usize, 5usize);
    // Columns of very different widths, so one scale would waste most of the grid.
    let widths = [0.01f32, 0.1, 1.0, 4.0, 0.5];
    let w = ArrayD::from_shape_fn(IxDyn(&[k, n]), |ix| {
        (values(31 + ix[1] as u64, k)[ix[0]] - 0.5) * widths[ix[1]]
    });
    let bias = ArrayD::from_shape_vec(IxDyn(&[n]), vec![0.5f32, -1.0, 0.25, 0.0, 2.0]).unwrap();
    let m = model_x_to_y(
        vec![
            node("MatMul", "mm", &["x", "w"], &["mm.y"], vec![]),
            node("Add", "mm.bias", &["b", "mm.y"], &["y"], vec![]),
        ],
        vec![("w", w.clone()), ("b", bias.clone())],
        &[b as i64, s as i64, k as i64],
        &[b as i64, s as i64, n as i64],
    );
    let x = ArrayD::from_shape_vec(IxDyn(&[b, s, k]), values(32, b * s * k)).unwrap();
    let d = Deployed::configured(&m, &x, "mm", |c| {
        c.layers.iter_mut().for_each(|(_, l)| l.channel_wise = true)
    });
    assert_eq!(d.deq.len(), n, "one dequantization factor per column");
    let scale_d = 1.0 / d.quant.scale;
    for j in 0..n {
        let col: Vec<f32> = (0..k).map(|i| w[[i, j]]).collect();
        let (lo, hi) = col
            .iter()
            .fold((0f32, 0f32), |(a, z), &v| (a.min(v), z.max(v)));
        let scale_w = if -lo > hi { -lo / 128.0 } else { hi / 127.0 };
        let deq = d.deq_scale(j);
        assert!(
            (deq - scale_w * scale_d).abs() <= 1e-6 * deq,
            "column {j}: deq {deq} vs scale_w {scale_w} x scale_d {scale_d}"
        );
        for i in 0..k {
            let want = (w[[i, j]] / scale_w).round_ties_even().clamp(-128.0, 127.0) as i8;
            assert_eq!(d.weight[[i, j]], want, "weight [{i}, {j}]");
        }
        let want_bias = (bias[j] / (scale_w * scale_d)).round_ties_even();
        assert!((d.bias[j] as f32 - want_bias).abs() <= 1.0, "bias {j}");
    }
    let q = d.levels(&x);
    let mut want = ArrayD::<f32>::zeros(IxDyn(&[b, s, n]));
    for i in 0..b {
        for t in 0..s {
            for j in 0..n {
                let mut acc = i64::from(d.bias[j]);
                for c in 0..k {
                    acc += q[[i, t, c]] * i64::from(d.weight[[c, j]]);
                }
                want[[i, t, j]] = acc as i32 as f32 * d.deq_scale(j);
            }
        }
    }
    d.assert_exact(x, &want);
}

fn matmul_past_two_to_the_24(add_inputs: &[&str]) {
    let (b, s, k, m_out) = (2usize, 3usize, 4096usize, 5usize);
    let w = ArrayD::from_shape_vec(IxDyn(&[k, m_out]), values(21, k * m_out)).unwrap();
    let bias = ArrayD::from_shape_vec(IxDyn(&[m_out]), vec![0.5f32, -1.0, 0.25, 0.0, 2.0]).unwrap();
    let m = model_x_to_y(
        vec![
            node("MatMul", "mm", &["x", "w"], &["mm.y"], vec![]),
            node("Add", "mm.bias", add_inputs, &["y"], vec![]),
        ],
        vec![("w", w), ("b", bias)],
        &[b as i64, s as i64, k as i64],
        &[b as i64, s as i64, m_out as i64],
    );
    let x = ArrayD::from_shape_vec(IxDyn(&[b, s, k]), values(22, b * s * k)).unwrap();
    let d = Deployed::new(&m, &x, "mm");
    assert_eq!(d.weight.shape(), [k, m_out]);
    assert_eq!(d.bias.len(), m_out, "the Add's bias is quantized to int32");
    let q = d.levels(&x);
    let mut want = ArrayD::<f32>::zeros(IxDyn(&[b, s, m_out]));
    let mut largest = 0i64;
    for i in 0..b {
        for t in 0..s {
            for j in 0..m_out {
                let mut acc = d.bias.get(j).map_or(0, |&v| i64::from(v));
                for c in 0..k {
                    acc += q[[i, t, c]] * i64::from(d.weight[[c, j]]);
                }
                largest = largest.max(acc.abs());
                want[[i, t, j]] = acc as i32 as f32 * d.deq_scale(j);
            }
        }
    }
    assert!(largest > 1 << 24, "the sums must pass 2^24: {largest}");
    d.assert_exact(x, &want);
}

/// A model exported for batch 1 with a `Reshape` to `[1, -1]` (as
/// EfficientNet-Lite's classifier is) runs a batch of 4 sample by sample.
#[test]
fn a_batch_one_reshape_runs_larger_batches_sample_by_sample() {
    let w = ArrayD::from_shape_vec(IxDyn(&[18, 3]), values(5, 54)).unwrap();
    let shape = ArrayD::from_shape_vec(IxDyn(&[2]), vec![1i64, -1]).unwrap();
    let m = common::model_of(GraphProto {
        name: Some("flat".into()),
        node: vec![
            node("Reshape", "flatten", &["x", "shape"], &["f"], vec![]),
            node("Gemm", "fc", &["f", "w"], &["y"], vec![]),
        ],
        initializer: vec![
            to_proto("w", &Tensor::F32(w.clone()), Storage::Raw),
            to_proto("shape", &Tensor::I64(shape), Storage::Raw),
        ],
        input: vec![value_info("x", &[1, 2, 3, 3])],
        output: vec![value_info("y", &[1, 3])],
        ..Default::default()
    });
    let x = ArrayD::from_shape_vec(IxDyn(&[4, 2, 3, 3]), values(6, 72)).unwrap();
    let s = CpuExecutor
        .prepare(
            &m,
            &SessionOptions {
                dynamic_batch: true,
                ..Default::default()
            },
        )
        .unwrap();
    let xt = Tensor::F32(x.clone());
    let Tensor::F32(y) = s.run(&[("x", &xt)], &["y"]).unwrap().remove(0) else {
        panic!("float output")
    };
    assert_eq!(y.shape(), &[4, 3]);
    for n in 0..4 {
        for j in 0..3 {
            let want: f32 = (0..18)
                .map(|k| x.as_slice().unwrap()[n * 18 + k] * w[[k, j]])
                .sum();
            assert!(
                (y[[n, j]] - want).abs() < 1e-5,
                "sample {n} output {j}: {} vs {want}",
                y[[n, j]]
            );
        }
    }
}
