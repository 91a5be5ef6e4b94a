//! AdaRound applied to a model's layers: inputs and targets (after the
//! layer's activation) from the float model, sampled at a fixed number of
//! output positions, then [`Problem::solve`] per layer (per group for grouped
//! convolutions). Conv (2-D, explicit pads) and Gemm.
//!
//! The inputs are the float ones, not the quantized upstream's: with the
//! quantized inputs the rounding learned to fit the activations' rounding
//! noise on the samples and lost on new data (MobileNetV2, 512 held-out
//! crops: logit cosine 0.814 and top-1 agreement 0.539 against 0.976 and
//! 0.789 with float inputs; plain rounding 0.961 / 0.707).

use super::emit::LayerFactors;
use super::error::QuantError;
use super::run_settings::RunSettings;
use super::weights::adaround::{Activation, AdaSettings, Problem};
use crate::data::Dataset;
use crate::onnx::graph::{GraphIndex, initializer_f32};
use crate::onnx::{GraphProto, ModelProto};
use crate::sim::{Executor, SessionOptions};
use crate::tensor::Tensor;
use ndarray::{Array2, ArrayD};
use rayon::prelude::*;
use serde::Serialize;

/// Samples (images) AdaRound reads its inputs from.
const SAMPLES: usize = 16;
/// Output positions per layer the loss is measured on.
const POSITIONS: usize = 1024;

/// A layer is learned only when it has at least this many sampled positions
/// per weight of an output (`K`): with fewer, the rounding fits the samples
/// and not the data (measured on MobileNetV2's classifier: 8 samples for
/// 1280 inputs flipped a third of its weights and broke the model).
const POSITIONS_PER_INPUT: usize = 2;

/// What AdaRound did to one layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdaReport {
    /// The layer.
    pub layer: String,
    /// Output MSE on the sampled positions with nearest rounding, and with the learned rounding.
    pub output_mse: [f32; 2],
    /// Weights rounded the other way than nearest rounding would.
    pub flipped: usize,
    /// Seconds spent on the layer.
    pub seconds: f64,
}

/// The activation right after `output`, when it is its only reader.
fn following_activation(graph: &GraphProto, output: &str) -> Activation {
    let Ok(index) = GraphIndex::new(graph) else {
        return Activation::Identity;
    };
    let readers = index.consumers(output);
    let [r] = readers else {
        return Activation::Identity;
    };
    let n = &graph.node[*r];
    let constant = |i: usize| -> Option<f32> {
        let name = n.input.get(i).filter(|s| !s.is_empty())?;
        initializer_f32(graph, name).ok()??.iter().next().copied()
    };
    match n.op_type() {
        "Relu" => Activation::Relu,
        "Clip" => Activation::Clip(
            constant(1).unwrap_or(f32::NEG_INFINITY),
            constant(2).unwrap_or(f32::INFINITY),
        ),
        _ => Activation::Identity,
    }
}

/// Geometry of a 2-D convolution.
#[derive(Clone, Copy)]
struct ConvShape {
    cin: usize,
    group: usize,
    kh: usize,
    kw: usize,
    stride: [usize; 2],
    pad: [usize; 2],
    dil: [usize; 2],
}

fn conv_shape(graph: &GraphProto, f: &LayerFactors, dims: &[usize]) -> Option<ConvShape> {
    let n = &graph.node[f.layer.node];
    let w = crate::ops::window::Window2d::parse(n).ok()?;
    // Asymmetric padding would change the output plane: not fitted here.
    if dims.len() != 4 || w.pads[0] != w.pads[2] || w.pads[1] != w.pads[3] {
        return None;
    }
    Some(ConvShape {
        cin: dims[1] * w.group,
        group: w.group,
        kh: dims[2],
        kw: dims[3],
        stride: [w.strides.0, w.strides.1],
        pad: [w.pads[0], w.pads[1]],
        dil: [w.dilations.0, w.dilations.1],
    })
}

/// `count` distinct positions of `0..n` (all of them when `count >= n`),
/// chosen deterministically (a partial Fisher–Yates shuffle driven by
/// xorshift). Drawing with replacement kept only ~63% of the positions when
/// `count` equalled `n`, and the rounding fitted those: on a 16-sample Conv
/// whose 1024 positions were all drawn, the learned rounding's measured
/// error came out above nearest rounding's.
fn positions(n: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    let count = count.min(n);
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in 0..count {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let j = i + (s % (n - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(count);
    all.sort_unstable();
    all
}

/// A layer's learned int8 weight and its report.
type Learned = (ArrayD<i8>, AdaReport);

/// Runs AdaRound on the layers `which` (indices into `factors`) and
/// replaces their int8 weights.
pub fn adaround_layers(
    executor: &dyn Executor,
    prepared: &ModelProto,
    factors: &mut [LayerFactors],
    which: &[(usize, AdaSettings)],
    data: &Dataset,
    run: &RunSettings,
) -> Result<Vec<AdaReport>, QuantError> {
    if which.is_empty() {
        return Ok(Vec::new());
    }
    let graph = crate::onnx::graph_of(prepared, "the prepared model")?;
    // Each layer's float input and float output.
    let inputs: Vec<String> = which
        .iter()
        .map(|&(i, _)| factors[i].layer.act_input.clone())
        .collect();
    let outputs: Vec<String> = which
        .iter()
        .map(|&(i, _)| factors[i].layer.output.clone())
        .collect();
    let samples = data.samples().clamp(1, SAMPLES);
    let batch = data.batch(samples, 0)?;
    let dynamic = run.dynamic_batch || samples != run.batch_size;
    let opts = |keep: &[String]| SessionOptions {
        keep: keep.to_vec(),
        dynamic_batch: dynamic,
        optimize: true,
    };
    let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
    fn fetch(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let xs = executor
        .prepare(prepared, &opts(&inputs))?
        .run(&feeds, &fetch(&inputs))?;
    let ys = executor
        .prepare(prepared, &opts(&outputs))?
        .run(&feeds, &fetch(&outputs))?;
    let jobs: Vec<(usize, AdaSettings, ArrayD<f32>, ArrayD<f32>)> = which
        .iter()
        .zip(xs.into_iter().zip(ys))
        .filter_map(|(&(i, s), (x, y))| match (x, y) {
            (Tensor::F32(x), Tensor::F32(y)) => Some((i, s, x, y)),
            _ => None,
        })
        .collect();
    let results: Vec<(usize, Option<Learned>)> = jobs
        .into_par_iter()
        .map(|(i, settings, x, y)| {
            let started = std::time::Instant::now();
            let out =
                solve_layer(graph, &factors[i], &settings, &x, &y).map(|(q, mse, flipped)| {
                    (
                        q,
                        AdaReport {
                            layer: factors[i].layer.name.clone(),
                            output_mse: mse,
                            flipped,
                            seconds: started.elapsed().as_secs_f64(),
                        },
                    )
                });
            (i, out)
        })
        .collect();
    let mut reports = Vec::new();
    for (i, r) in results {
        if let Some((q, report)) = r {
            factors[i].weight_q = Some(q);
            reports.push(report);
        }
    }
    Ok(reports)
}

/// The learned int8 weight of one layer, its output MSE (nearest, learned)
/// and how many weights flipped; `None` for a layer AdaRound does not take.
fn solve_layer(
    graph: &GraphProto,
    f: &LayerFactors,
    settings: &AdaSettings,
    x: &ArrayD<f32>,
    y: &ArrayD<f32>,
) -> Option<(ArrayD<i8>, [f32; 2], usize)> {
    let mut w = initializer_f32(graph, f.layer.weight.as_deref()?).ok()??;
    if let (Some(s), Some(axes)) = (&f.balance, super::dmq::ChannelAxes::of(graph, &f.layer)) {
        w = super::dmq::balance_weight(&w, s, axes);
    }
    let old = f.weight_q.as_ref()?;
    let bias: Vec<f32> = f
        .layer
        .bias
        .as_deref()
        .and_then(|b| initializer_f32(graph, b).ok().flatten())
        .map(|b| b.iter().copied().collect())
        .unwrap_or_default();
    let activation = following_activation(graph, &f.layer.output);
    let dims: Vec<usize> = w.shape().to_vec();
    let rows_scale = |r: usize| f.scale_w[if f.scale_w.len() == 1 { 0 } else { r }];
    let range = (-128.0, 127.0);
    match f.layer.op_type.as_str() {
        "Gemm"
            if dims.len() == 2
                && x.ndim() == 2
                && y.ndim() == 2
                && x.shape()[0] >= POSITIONS_PER_INPUT * dims[0] =>
        {
            // Prepared Gemm weights are [K, N]: rows of the problem are the N outputs.
            let wm = w
                .clone()
                .into_dimensionality::<ndarray::Ix2>()
                .ok()?
                .t()
                .to_owned();
            let mut xm = x
                .clone()
                .into_dimensionality::<ndarray::Ix2>()
                .ok()?
                .t()
                .to_owned();
            if let Some(s) = &f.balance {
                // The balanced layer reads x / s (its weight holds s).
                for (mut row, &sk) in xm.axis_iter_mut(ndarray::Axis(0)).zip(s) {
                    row.mapv_inplace(|v| v / sk);
                }
            }
            let mut t = y
                .clone()
                .into_dimensionality::<ndarray::Ix2>()
                .ok()?
                .t()
                .to_owned();
            t.mapv_inplace(|v| activation.apply(v));
            let scale: Vec<f32> = (0..wm.nrows()).map(rows_scale).collect();
            let b = if bias.len() == wm.nrows() {
                bias
            } else {
                vec![0.0; wm.nrows()]
            };
            let p = Problem {
                w: wm.view(),
                scale: &scale,
                x: xm.view(),
                bias: &b,
                target: t.view(),
                activation,
                range,
            };
            let (q, mse) = p.solve(settings);
            let q = q.t().to_owned().into_dyn();
            let flipped = q.iter().zip(old.iter()).filter(|(a, b)| a != b).count();
            Some((q, mse, flipped))
        }
        "Conv" => {
            let cs = conv_shape(graph, f, &dims)?;
            if x.ndim() != 4 || y.ndim() != 4 || x.shape()[1] != cs.cin {
                return None;
            }
            let (n, h, wd) = (x.shape()[0], x.shape()[2], x.shape()[3]);
            let (cout, oh, ow) = (y.shape()[1], y.shape()[2], y.shape()[3]);
            let per_group_in = cs.cin / cs.group;
            let per_group_out = cout / cs.group;
            let k = per_group_in * cs.kh * cs.kw;
            let count = POSITIONS.min(n * oh * ow);
            if count < POSITIONS_PER_INPUT * k {
                return None;
            }
            let picks = positions(n * oh * ow, count, 7);
            let mut q_all = old.clone();
            let mut totals = [0.0f32; 2];
            for g in 0..cs.group {
                let mut xm = Array2::<f32>::zeros((k, picks.len()));
                let mut t = Array2::<f32>::zeros((per_group_out, picks.len()));
                for (col, &pos) in picks.iter().enumerate() {
                    let (img, rest) = (pos / (oh * ow), pos % (oh * ow));
                    let (oy, ox) = (rest / ow, rest % ow);
                    let mut row = 0;
                    for ci in 0..per_group_in {
                        let c = g * per_group_in + ci;
                        for ky in 0..cs.kh {
                            for kx in 0..cs.kw {
                                let iy = (oy * cs.stride[0] + ky * cs.dil[0]) as isize
                                    - cs.pad[0] as isize;
                                let ix = (ox * cs.stride[1] + kx * cs.dil[1]) as isize
                                    - cs.pad[1] as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                    // A balanced layer reads x / s (its weight holds s).
                                    let sc = f.balance.as_ref().map_or(1.0, |s| s[c]);
                                    xm[[row, col]] = x[[img, c, iy as usize, ix as usize]] / sc;
                                }
                                row += 1;
                            }
                        }
                    }
                    for co in 0..per_group_out {
                        let v = y[[img, g * per_group_out + co, oy, ox]];
                        t[[co, col]] = activation.apply(v);
                    }
                }
                let w3 = w.view().into_shape_with_order((cout, k)).ok()?;
                let wg = w3.slice(ndarray::s![g * per_group_out..(g + 1) * per_group_out, ..]);
                let scale: Vec<f32> = (0..per_group_out)
                    .map(|r| rows_scale(g * per_group_out + r))
                    .collect();
                let b: Vec<f32> = (0..per_group_out)
                    .map(|r| bias.get(g * per_group_out + r).copied().unwrap_or(0.0))
                    .collect();
                let p = Problem {
                    w: wg,
                    scale: &scale,
                    x: xm.view(),
                    bias: &b,
                    target: t.view(),
                    activation,
                    range,
                };
                let (q, mse) = p.solve(settings);
                totals[0] += mse[0] / cs.group as f32;
                totals[1] += mse[1] / cs.group as f32;
                let mut q_rows = q_all.view_mut().into_shape_with_order((cout, k)).ok()?;
                q_rows
                    .slice_mut(ndarray::s![g * per_group_out..(g + 1) * per_group_out, ..])
                    .assign(&q);
            }
            let flipped = q_all.iter().zip(old.iter()).filter(|(a, b)| a != b).count();
            Some((q_all, totals, flipped))
        }
        _ => None,
    }
}
