//! One training step (forward + backward) of a model's training graph, float
//! and with every Conv/Gemm fake-quantized, on a random batch.
//!
//! `cargo bench --bench train_step -- MODEL [BATCH] [RUNS]` prints one JSON
//! line: median milliseconds per step and images per second.

use ascend_quant::onnx::load_model;
use ascend_quant::quant::layers::discover;
use ascend_quant::quant::prepare::prepare;
use ascend_quant::sim::feedable_inputs;
use ascend_quant::train::graph::{LayerQuant, TrainGraph};
use ndarray::{ArrayD, IxDyn};
use std::path::Path;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(path) = args.first() else {
        eprintln!("usage: cargo bench --bench train_step -- MODEL [BATCH] [RUNS]");
        return Ok(());
    };
    let batch: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(16);
    let runs: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut model = load_model(Path::new(path))?;
    prepare(&mut model, true, &[])?;
    let input = feedable_inputs(&model).remove(0);
    let mut shape: Vec<usize> = input
        .shape
        .iter()
        .flatten()
        .map(|d| match d {
            ascend_quant::onnx::Dim::Fixed(n) => *n,
            _ => 1,
        })
        .collect();
    shape[0] = batch;
    let n: usize = shape.iter().product();
    let x = ArrayD::from_shape_vec(
        IxDyn(&shape),
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect(),
    )?;
    let mut results = Vec::new();
    for quantized in [false, true] {
        let mut g = TrainGraph::new(&model)?;
        if quantized {
            for l in discover(model.graph.as_ref().ok_or("no graph")?)?.0 {
                if matches!(l.op_type.as_str(), "Conv" | "Gemm") {
                    g.set_quant(
                        &l.name,
                        LayerQuant {
                            clip_min: -1.0,
                            clip_max: 6.0,
                            fixed_min: false,
                            channel_wise: l.op_type == "Conv",
                            ..Default::default()
                        },
                    )?;
                }
            }
        }
        let out = g.output_names()[0].to_string();
        let mut times = Vec::new();
        for _ in 0..runs + 1 {
            let t = Instant::now();
            let acts = g.forward(&[(input.name.as_str(), &x)])?;
            let y = acts.get(&g, &out).ok_or("no output")?;
            let seed = y.mapv(|_| 1e-3f32);
            g.backward(&acts, &[(out.as_str(), seed)])?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.remove(0);
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        results.push(format!(
            "\"{}\": {{\"median_ms\": {median:.1}, \"images_per_s\": {:.1}}}",
            if quantized { "quantized" } else { "float" },
            batch as f64 * 1000.0 / median
        ));
    }
    println!(
        "{{\"model\": \"{path}\", \"batch\": {batch}, {}}}",
        results.join(", ")
    );
    Ok(())
}
