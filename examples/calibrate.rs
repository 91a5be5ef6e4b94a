//! Quantizes the bundled digits model through the library API, the way a
//! deployment script would without the command line:
//!
//! ```sh
//! cargo run --release --example calibrate -- out/example
//! ```
//! writes `out/example_{deploy_model,fake_quant_model}.onnx`,
//! `out/example_record.txt` and `out/example_quant_report.json`.

use ascend_quant::pipeline::Backend;
use ascend_quant::{CalibrateOptions, Progress, calibrate};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let output = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("out/example"));
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/digits");
    let mut opts = CalibrateOptions::new(
        fixtures.join("digits_cnn.onnx"),
        vec![fixtures.join("calib_x.npy").display().to_string()],
        output,
    );
    opts.backend = Backend::Cpu;
    opts.batch_size = Some(10);
    let result = calibrate(&opts, Progress::silent())?;
    for layer in &result.report.layers {
        println!(
            "{:<12} scale_d {:.6} offset_d {:>4}  cosine {:.5}",
            layer.name, layer.scale_d, layer.offset_d, layer.cosine
        );
    }
    for file in &result.written {
        println!("wrote {}", file.display());
    }
    Ok(())
}
