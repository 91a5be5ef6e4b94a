//! The native engine's convolution kernels on MobileNetV2's heaviest layer
//! shapes (batch 1): milliseconds per call, median of `RUNS` (default 50).
//!
//! `cargo bench --bench kernels [-- RUNS]` prints one JSON line per layer.
//! Threads: `RAYON_NUM_THREADS`.

use ascend_quant::sim::kernels::conv::{Conv, ConvGeometry};
use std::time::Instant;

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .find_map(|a| a.parse().ok())
        .unwrap_or(50);
    // (label, c_in, c_out, size, kernel, stride, group)
    let layers = [
        ("pointwise 16->96 @112", 16, 96, 112, 1, 1, 1),
        ("first conv 3->32 @224 s2", 3, 32, 224, 3, 2, 1),
        ("depthwise 96 @112 s2", 96, 96, 112, 3, 2, 96),
        ("depthwise 144 @56", 144, 144, 56, 3, 1, 144),
        ("depthwise 960 @7", 960, 960, 7, 3, 1, 960),
        ("pointwise 960->160 @7", 960, 160, 7, 1, 1, 1),
    ];
    for (label, c_in, c_out, size, k, s, group) in layers {
        let geometry = ConvGeometry {
            kernel: (k, k),
            stride: (s, s),
            dilation: (1, 1),
            pads: [k / 2; 4],
            group,
        };
        let w: Vec<f32> = (0..c_out * c_in / group * k * k)
            .map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.5)
            .collect();
        let x: Vec<f32> = (0..c_in * size * size)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let mut conv = Conv::new(geometry, c_in, c_out, w, Some(vec![0.1; c_out]));
        conv.activation = ascend_quant::sim::kernels::activation::Activation::Clamp(0.0, 6.0);
        let times = rayon::join(
            || {
                for _ in 0..3 {
                    conv.run(&x, 1, size, size);
                }
                (0..runs)
                    .map(|_| {
                        let t = Instant::now();
                        conv.run(&x, 1, size, size);
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect::<Vec<f64>>()
            },
            || (),
        )
        .0;
        let mut t = times;
        t.sort_by(f64::total_cmp);
        println!(
            "{{\"layer\": \"{label}\", \"median_ms\": {:.4}, \"min_ms\": {:.4}}}",
            t[t.len() / 2],
            t[0]
        );
    }
}
