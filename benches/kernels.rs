//! The native engine's convolution kernels on MobileNetV2's heaviest layer
//! shapes (batch 1): milliseconds per call, median of `RUNS` (default 50),
//! for the float kernels and for the exact integer ones of deploy models.
//!
//! `cargo bench --bench kernels [-- RUNS] [LABEL…]` prints one JSON line per
//! layer and kind (only the layers whose label contains one of the LABELs,
//! when some are given).
//! Threads: `RAYON_NUM_THREADS`.

use ascend_quant::sim::kernels::activation::Activation;
use ascend_quant::sim::kernels::conv::{Conv, ConvGeometry};
use ascend_quant::sim::kernels::int_conv::{IntConv, Quantizer, Requant};
use std::time::Instant;

/// Median and minimum of `runs` timed calls of `f` (after 3 untimed ones),
/// inside the thread pool as the engine calls its kernels.
fn time(runs: usize, f: impl Fn() + Sync) -> (f64, f64) {
    let mut t = rayon::join(
        || {
            for _ in 0..3 {
                f();
            }
            (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect::<Vec<f64>>()
        },
        || (),
    )
    .0;
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[0])
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let runs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(50);
    // Any other argument keeps only the layers whose label contains it.
    let only: Vec<&String> = args
        .iter()
        .filter(|a| a.parse::<usize>().is_err())
        .collect();
    // (label, c_in, c_out, size, kernel, stride, group)
    let layers = [
        ("pointwise 16->96 @112", 16, 96, 112, 1, 1, 1),
        ("first conv 3->32 @224 s2", 3, 32, 224, 3, 2, 1),
        ("depthwise 96 @112 s2", 96, 96, 112, 3, 2, 96),
        ("depthwise 144 @56", 144, 144, 56, 3, 1, 144),
        ("depthwise 960 @7", 960, 960, 7, 3, 1, 960),
        ("pointwise 960->160 @7", 960, 160, 7, 1, 1, 1),
        ("pointwise 576->96 @14", 576, 96, 14, 1, 1, 1),
        ("pointwise 320->1280 @7", 320, 1280, 7, 1, 1, 1),
        ("pointwise 160->960 @7", 160, 960, 7, 1, 1, 1),
        ("pointwise 384->64 @14", 384, 64, 14, 1, 1, 1),
        // The detector's (scripts/make_yolo_like.py), with SiLU.
        ("detector conv 16->16 @80 silu", 16, 16, 80, 3, 1, 1),
        ("detector conv 16->32 @160 s2 silu", 16, 32, 160, 3, 2, 1),
        ("detector conv 16->32 @160 s2 none", 16, 32, 160, 3, 2, 1),
        ("detector conv 128->256 @40 s2 silu", 128, 256, 40, 3, 2, 1),
        ("detector pointwise 192->64 @40 silu", 192, 64, 40, 1, 1, 1),
    ];
    for (label, c_in, c_out, size, k, s, group) in layers {
        if !only.is_empty() && !only.iter().any(|o| label.contains(o.as_str())) {
            continue;
        }
        let geometry = conv_geometry(k, s, group);
        let w: Vec<f32> = (0..c_out * c_in / group * k * k)
            .map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.5)
            .collect();
        let x: Vec<f32> = (0..c_in * size * size)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let mut conv = Conv::new(geometry, c_in, c_out, w, Some(vec![0.1; c_out]));
        conv.activation = if label.ends_with("silu") {
            Activation::Silu
        } else if label.ends_with("none") {
            Activation::None
        } else {
            Activation::Clamp(0.0, 6.0)
        };
        let (median, min) = time(runs, || {
            conv.run(&x, 1, size, size);
        });
        println!(
            "{{\"layer\": \"{label}\", \"kind\": \"float\", \"median_ms\": {median:.4}, \"min_ms\": {min:.4}}}"
        );
        let wq: Vec<i8> = (0..c_out * c_in / group * k * k)
            .map(|i| ((i * 37) % 255) as i8)
            .collect();
        let requant = Requant {
            bias: vec![7; c_out],
            deq: vec![0.001; c_out],
        };
        let quantizer = Quantizer {
            scale: 40.0,
            offset: -3.0,
        };
        let int_conv = IntConv::new(
            conv_geometry(k, s, group),
            c_in,
            c_out,
            quantizer,
            &wq,
            requant,
        );
        let (median, min) = time(runs, || {
            int_conv.run(&x, 1, size, size).expect("fits");
        });
        println!(
            "{{\"layer\": \"{label}\", \"kind\": \"int8\", \"median_ms\": {median:.4}, \"min_ms\": {min:.4}}}"
        );
    }
}

/// A square kernel with "same" padding.
fn conv_geometry(k: usize, s: usize, group: usize) -> ConvGeometry {
    ConvGeometry {
        kernel: (k, k),
        stride: (s, s),
        dilation: (1, 1),
        pads: [k / 2; 4],
        group,
    }
}
