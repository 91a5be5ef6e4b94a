//! Both gradients of a depthwise 3×3 convolution on a MobileNetV2 sized
//! activation (16×96×56×56, stride 1, pad 1), the layer that decides the
//! training engine's backward pass (see `docs/training.md`; its forward pass
//! is the inference engine's kernel, benchmarked by `--bench engine`).
//!
//! `cargo bench --bench depthwise [-- RUNS]` prints one JSON line with the
//! median and minimum milliseconds of the input and weight gradients together.

use ascend_quant::sim::kernels::depthwise::grad::{Depthwise, grad_input, grad_weight};
use std::time::Instant;

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let g = Depthwise {
        n: 16,
        c: 96,
        h: 56,
        w: 56,
        kh: 3,
        kw: 3,
        stride: (1, 1),
        dilation: (1, 1),
        pads: (1, 1, 1, 1),
    };
    let x: Vec<f32> = (0..g.n * g.c * g.h * g.w)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w: Vec<f32> = (0..g.c * 9).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
    let y: Vec<f32> = (0..g.n * g.c * g.out_h() * g.out_w())
        .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut dx = vec![0f32; x.len()];
    let (mut dw, mut db) = (vec![0f32; w.len()], vec![0f32; g.c]);
    let mut times = Vec::new();
    for _ in 0..runs + 1 {
        let t = Instant::now();
        grad_input(&g, &y, &w, &mut dx);
        grad_weight(&g, &x, &y, &mut dw, &mut db);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"layer\": \"depthwise gradients 16x96x56x56 3x3\", \"median_ms\": {:.2}, \"min_ms\": {:.2}, \"runs\": {runs}}}",
        times[times.len() / 2],
        times[0]
    );
}
