//! Activation ranges that respect the model, on a Clip(0, 6) → Conv model
//! built here: IFMR's extended search finds the clip a brute-force search
//! finds when it lies below AMCT's 0.7 × max, and no grid reaches past the
//! bounds the Clip puts on the layer input.

mod common;

use ascend_quant::onnx::ModelProto;
use ascend_quant::onnx::builder::node;
use ascend_quant::quant::calibrate::Outcome;
use ascend_quant::quant::config::QuantConfig;
use ascend_quant::quant::observe::ActAlgo;
use common::{calibrate_with, model_x_to_y, run_x_to_y as output};
use ndarray::{ArrayD, IxDyn};

const C: usize = 4;

/// `y = Conv1x1(Clip(x, 0, 6))`, or without the Clip.
fn model(with_clip: bool) -> ModelProto {
    let w: Vec<f32> = (0..C * C)
        .map(|i| [0.9, -0.4, 0.3, 0.7, -0.2][i % 5])
        .collect();
    let scalar = |v: f32| ArrayD::from_elem(IxDyn(&[]), v);
    let mut inits = vec![
        (
            "w",
            ArrayD::from_shape_vec(IxDyn(&[C, C, 1, 1]), w).unwrap(),
        ),
        ("b", ArrayD::from_elem(IxDyn(&[C]), 0.1)),
    ];
    let mut nodes = vec![];
    let conv_input = if with_clip {
        inits.extend([("lo", scalar(0.0)), ("hi", scalar(6.0))]);
        nodes.push(node("Clip", "relu6", &["x", "lo", "hi"], &["r"], vec![]));
        "r"
    } else {
        "x"
    };
    nodes.push(node(
        "Conv",
        "conv",
        &[conv_input, "w", "b"],
        &["y"],
        vec![],
    ));
    let dims = [8, C as i64, -1, -1];
    model_x_to_y(nodes, inits, &dims, &dims)
}

fn uniform(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        })
        .collect()
}

/// ReLU6-like data piled up near zero: exponential with mean 0.25 over
/// 64 × 4 × 64 × 64 values (about a million, as a few images give), one of
/// them saturated at 6.
fn piled_near_zero(seed: u64) -> ArrayD<f32> {
    let shape = [64, C, 64, 64];
    let v: Vec<f32> = uniform(seed, shape.iter().product())
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            if i == 7 {
                6.0
            } else {
                (-0.25 * u.ln()).min(6.0) as f32
            }
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap()
}

fn calibrate_on(m: &ModelProto, data: &ArrayD<f32>, extend: bool, asymmetric: bool) -> Outcome {
    let layers = ascend_quant::pipeline::inputs::layer_names(m).unwrap();
    let mut config = QuantConfig::default_for(&layers);
    config.batch_num = Some(data.shape()[0] / 8);
    config.activation_offset = asymmetric;
    for (_, l) in &mut config.layers {
        if let ActAlgo::Ifmr(s) = &mut l.act_algo {
            s.extend_below = extend;
            // The search starts from the true maximum (AMCT's default
            // percentile would skip the one saturated value of a million).
            s.max_percentile = 1.0;
        }
    }
    calibrate_with(m, &config, data.clone())
}

/// Mean squared error of an asymmetric int8 grid over [0, clip] on `x`
/// (written out here: clamp, divide, round half to even, multiply).
fn grid_mse(x: &[f32], clip: f64) -> f64 {
    let scale = clip / 255.0;
    x.iter()
        .map(|&v| {
            let v = f64::from(v);
            let q = (v.clamp(0.0, clip) / scale).round_ties_even() * scale;
            (q - v).powi(2)
        })
        .sum::<f64>()
        / x.len() as f64
}

#[test]
fn the_extended_search_finds_the_brute_force_clip_below_the_range() {
    let m = model(true);
    let calib = piled_near_zero(1);
    let x: Vec<f32> = calib.iter().map(|v| v.clamp(0.0, 6.0)).collect();
    // Brute force over clips 0.01 × 6 ... 1.30 × 6.
    let (best_mse, best_clip) = (1..=130)
        .map(|k| {
            let c = 6.0 * k as f64 / 100.0;
            (grid_mse(&x, c), c)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap();
    assert!(
        best_clip < 0.7 * 6.0,
        "premise: the optimum is below the range ({best_clip})"
    );
    let amct = calibrate_on(&m, &calib, false, true);
    let extended = calibrate_on(&m, &calib, true, true);
    let clip_of = |o: &Outcome| f64::from(o.factors[0].act.scale) * 255.0;
    let (c_amct, c_ext) = (clip_of(&amct), clip_of(&extended));
    assert_eq!(amct.factors[0].act.offset, -128);
    assert_eq!(extended.factors[0].act.offset, -128);
    // AMCT's range stops at its lowest factor; the extension reaches the optimum.
    assert!((c_amct - 0.7 * 6.0).abs() < 1e-4, "{c_amct}");
    assert!(
        (c_ext - best_clip).abs() <= 0.06 + 1e-6,
        "{c_ext} vs {best_clip}"
    );
    let (mse_amct, mse_ext) = (grid_mse(&x, c_amct), grid_mse(&x, c_ext));
    assert!(mse_ext <= best_mse * 1.01, "{mse_ext} vs {best_mse}");
    assert!(mse_ext < 0.9 * mse_amct, "{mse_ext} vs {mse_amct}");
    // And the layer output on held-out data follows.
    let held_out = piled_near_zero(2);
    let float = output(&m, &held_out);
    let err = |o: &Outcome| {
        let q = output(&o.models().unwrap().1, &held_out);
        q.iter()
            .zip(&float)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
    };
    let (e_amct, e_ext) = (err(&amct), err(&extended));
    eprintln!("clip {c_amct:.3} -> {c_ext:.3}; output error {e_amct:.4} -> {e_ext:.4}");
    assert!(e_ext < 0.9 * e_amct, "{e_amct} -> {e_ext}");
}

#[test]
fn no_grid_reaches_past_the_bounds_of_a_clip() {
    for asymmetric in [true, false] {
        // Values on the grid of a 7.2-wide range (IFMR's r = 1.2 of max 6)
        // and a few 6s: without the Clip IFMR spends levels up to 7.2, with
        // it the grid stops at 6.
        let step: f64 = 7.2 / if asymmetric { 255.0 } else { 127.0 };
        let top_level = (5.9 / step).floor();
        let v: Vec<f32> = uniform(5, 64 * C * 16)
            .into_iter()
            .enumerate()
            .map(|(i, u)| {
                if i % 97 == 0 {
                    6.0
                } else {
                    ((u * (top_level + 1.0)).floor() * step) as f32
                }
            })
            .collect();
        let data = ArrayD::from_shape_vec(IxDyn(&[64, C, 4, 4]), v).unwrap();
        let top = |o: &Outcome| o.factors[0].act.range(8).1;
        let free = top(&calibrate_on(&model(false), &data, false, asymmetric));
        let bounded = calibrate_on(&model(true), &data, false, asymmetric);
        let half_step = bounded.factors[0].act.scale / 2.0;
        assert!(
            free > 6.5,
            "premise: without the Clip the grid reaches {free}"
        );
        assert!(
            top(&bounded) <= 6.0 + half_step,
            "asymmetric {asymmetric}: {}",
            top(&bounded)
        );
    }
}
