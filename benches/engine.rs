//! Latency of the CPU simulator on one model and input, for comparison with
//! onnxruntime by `scripts/bench_engine.py`.
//!
//! `cargo bench --bench engine -- MODEL INPUT.npy [RUNS]` prints one JSON line:
//! the median and minimum latency in milliseconds of `RUNS` runs after warm-up.
//! An input with more samples than the model declares runs as `run` runs
//! it (free batch axis); the line then also gives the median per sample.
//! Set `RAYON_NUM_THREADS=1 RTEN_NUM_THREADS=1` for a single-threaded
//! measurement, and `ENGINE=rten` to time the rten engine instead of the
//! CPU executor users get (native kernels, rten for what they do not run).

use ascend_quant::data::read_npy;
use ascend_quant::onnx::load_model;
use ascend_quant::sim::{CpuExecutor, Executor, RtenExecutor, SessionOptions};
use std::path::Path;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [model_path, input_path, rest @ ..] = args.as_slice() else {
        eprintln!("usage: cargo bench --bench engine -- MODEL INPUT.npy [RUNS]");
        return Ok(());
    };
    let runs: usize = rest.first().map(|r| r.parse()).transpose()?.unwrap_or(50);
    let model = load_model(Path::new(model_path))?;
    let input = read_npy(Path::new(input_path))?;
    let samples = input.shape().first().copied().unwrap_or(1).max(1);
    let opts = SessionOptions {
        dynamic_batch: samples > 1,
        ..SessionOptions::default()
    };
    let session = match std::env::var("ENGINE").as_deref() {
        Ok("rten") => RtenExecutor.prepare(&model, &opts)?,
        _ => CpuExecutor.prepare(&model, &opts)?,
    };
    let input_name = session.inputs()[0].name.clone();
    let output_name = session.outputs()[0].name.clone();
    let feeds = [(input_name.as_str(), &input)];
    for _ in 0..5 {
        session.run(&feeds, &[output_name.as_str()])?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        session.run(&feeds, &[output_name.as_str()])?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"median_ms\": {:.4}, \"min_ms\": {:.4}, \"runs\": {runs}, \"samples\": {samples}, \"median_ms_per_sample\": {:.4}}}",
        times[times.len() / 2],
        times[0],
        times[times.len() / 2] / samples as f64
    );
    Ok(())
}
