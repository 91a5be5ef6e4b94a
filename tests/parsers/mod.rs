//! Every parser of user files, driven from raw bytes the way a user's file
//! reaches it. Shared by the fuzz targets (`fuzz/`, which include this file)
//! and the bounded mutation test (`tests/mutation.rs`): each function may
//! return `Err` for bad input but must never panic.
#![allow(dead_code)]

use ascend_quant::data::{Dataset, read_npy_bytes};
use ascend_quant::onnx::{GraphIndex, load_model_bytes};
use ascend_quant::quant::config::QuantConfig;
use ascend_quant::quant::from_record::calibrated_from_record;
use ascend_quant::quant::layers::discover;
use ascend_quant::quant::prepare::prepare;
use ascend_quant::quant::record::read_record;
use ascend_quant::quant::retrain_config::RetrainConfig;
use ascend_quant::quant::simple_config::from_simple_config_str;
use ascend_quant::sim::{SessionOptions, adapt_for_rten, rewrite_for_execution};
use std::path::{Path, PathBuf};

/// The layers the config parsers check names against (the digits model's).
pub fn layers() -> Vec<(String, String)> {
    [
        ("/0/Conv", "Conv"),
        ("/3/Conv", "Conv"),
        ("/6/Conv", "Conv"),
        ("/10/Gemm", "Gemm"),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), t.to_string()))
    .collect()
}

/// A model: decode, validate the graph, prepare it for calibration (BN
/// folding, Gemm weights), find its layers, prepare it for execution
/// (size limits, the CPU engine's rewrites).
pub fn model(bytes: &[u8]) -> Result<(), String> {
    let origin = Path::new("fuzzed.onnx");
    let m = load_model_bytes(bytes, origin, None).map_err(|e| e.to_string())?;
    if let Some(g) = &m.graph {
        GraphIndex::new(g).map_err(|e| e.to_string())?;
    }
    let mut prepared = m.clone();
    prepare(&mut prepared, true, &[]).map_err(|e| e.to_string())?;
    if let Some(g) = &prepared.graph {
        discover(g).map_err(|e| e.to_string())?;
    }
    let mut runnable =
        rewrite_for_execution(&m, &SessionOptions::default()).map_err(|e| e.to_string())?;
    adapt_for_rten(&mut runnable).map_err(|e| e.to_string())?;
    // As a QDQ model for convert-qat (most models are refused: no pairs).
    let _ = ascend_quant::convert::convert(&m, "fuzzed.onnx");
    Ok(())
}

/// Most values a fuzzed model may compute per run, and most multiply-adds,
/// so every iteration stays short; bigger models are only prepared.
const RUN_VALUES: u64 = 1 << 20;
const RUN_MULTIPLY_ADDS: u64 = 1 << 26;

/// A model run as every command runs one: prepared on the CPU executor (the
/// native engine, or rten for what it declines) and executed once on a
/// tiny input (every float input filled with a ramp, free axes of size 1),
/// fetching every output. Engine errors are fine; panics are not. Runs only
/// when the static work estimate follows the whole graph and finds it
/// small ([`RUN_VALUES`], [`RUN_MULTIPLY_ADDS`]).
pub fn model_run(bytes: &[u8]) -> Result<(), String> {
    use ascend_quant::onnx::Dim;
    use ascend_quant::sim::{CpuExecutor, Executor, feedable_inputs};
    use ascend_quant::tensor::Tensor;
    let m = load_model_bytes(bytes, Path::new("fuzzed.onnx"), None).map_err(|e| e.to_string())?;
    let work = ascend_quant::ops::work::check_work(&m).map_err(|e| e.to_string())?;
    let session = CpuExecutor
        .prepare(&m, &SessionOptions::default())
        .map_err(|e| e.to_string())?;
    if work.unfollowed > 0 || work.values > RUN_VALUES || work.multiply_adds > RUN_MULTIPLY_ADDS {
        return Ok(());
    }
    let mut feeds = Vec::new();
    for spec in feedable_inputs(&m) {
        let Some(dims) = &spec.shape else {
            return Ok(());
        };
        let shape: Vec<usize> = dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                _ => 1,
            })
            .collect();
        let n: usize = shape.iter().product();
        if spec.elem_type != Some(1) || n as u64 > RUN_VALUES {
            return Ok(());
        }
        let ramp = (0..n).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
        let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), ramp)
            .map_err(|e| e.to_string())?;
        feeds.push((spec.name.clone(), Tensor::F32(a)));
    }
    let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let outputs: Vec<String> = session.outputs().iter().map(|o| o.name.clone()).collect();
    let fetch: Vec<&str> = outputs.iter().map(String::as_str).collect();
    session
        .run(&refs, &fetch)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A record file.
pub fn record(bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    let record = read_record(text)?;
    // Applied to the digits model, as `calibrate --record` does (refusals are fine).
    let model = load_model_bytes(DIGITS_MODEL, Path::new("digits_cnn.onnx"), None)
        .map_err(|e| e.to_string())?;
    let config = QuantConfig::default_for(&layers());
    let _ = calibrated_from_record(model, &config, &record, "fuzzed.txt");
    Ok(())
}

/// The digits model, for the record parser.
const DIGITS_MODEL: &[u8] = include_bytes!("../fixtures/digits/digits_cnn.onnx");

/// An AMCT JSON config.
pub fn json_config(bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    QuantConfig::from_json_str(text, "fuzzed.json", &layers())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// An AMCT retrain (QAT) JSON config.
pub fn retrain_config(bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    RetrainConfig::from_json_str(text, "fuzzed.json", &layers())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// An AMCT retrain simple config (AMCTRetrainConfig).
pub fn retrain_simple_config(bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    RetrainConfig::from_simple_config_str(text, "fuzzed.cfg", &layers())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// An AMCT simple config (.cfg).
pub fn simple_config(bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    from_simple_config_str(text, "fuzzed.cfg", &layers())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A scratch folder of this process for parsers that read files.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ascend-quant-parsers-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Reads every batch of a data set, as calibration does.
fn read_all(data: &Dataset) -> Result<(), String> {
    for b in 0..data.batch_count(3).min(64) {
        data.batch(3, b).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A `.npy` file, whole (`read_npy_bytes`) and streamed from disk as a
/// calibration data file; bytes that start like a zip archive are also read
/// as an `.npz`.
pub fn npy(bytes: &[u8]) -> Result<(), String> {
    let zipped = bytes.starts_with(b"PK");
    let whole = if zipped {
        Ok(())
    } else {
        read_npy_bytes(bytes, Path::new("fuzzed.npy")).map(|_| ())
    };
    let ext = if zipped { "npz" } else { "npy" };
    let path = scratch().join(format!("data.{ext}"));
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let streamed = Dataset::from_specs(&[path.display().to_string()], &["x".to_string()])
        .map_err(|e| e.to_string())
        .and_then(|d| read_all(&d));
    whole.map_err(|e| e.to_string()).and(streamed)
}

/// An AMCT `.bin` folder: the first byte picks the element type, the next
/// four the shape, the rest is one batch file.
pub fn bin_folder(bytes: &[u8]) -> Result<(), String> {
    let (head, body) = bytes.split_at(bytes.len().min(5));
    let types = [
        "float32", "float64", "int8", "uint8", "int32", "int64", "bool", "int4",
    ];
    let ty = types[usize::from(head.first().copied().unwrap_or(0)) % types.len()];
    let shape: Vec<usize> = head.iter().skip(1).map(|&b| usize::from(b)).collect();
    let dir = scratch().join("bins");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("0.bin"), body).map_err(|e| e.to_string())?;
    let data = Dataset::from_bin_dirs(&dir.display().to_string(), ty, &[("x".to_string(), shape)])
        .map_err(|e| e.to_string())?;
    read_all(&data)
}

/// An image folder of one file: the first byte picks the preprocessing (the
/// model input's layout and channels, a resize, a crop, BGR), the rest is
/// the file (a PNG or JPEG, or anything else).
pub fn image_folder(bytes: &[u8]) -> Result<(), String> {
    use ascend_quant::data::Preprocess;
    let (head, body) = bytes.split_at(bytes.len().min(1));
    let pick = head.first().copied().unwrap_or(0);
    let channels = if pick & 1 == 0 { 3 } else { 1 };
    let dims = if pick & 2 == 0 {
        [Some(1), Some(channels), Some(8), Some(6)]
    } else {
        [Some(1), Some(8), Some(6), Some(channels)]
    };
    let prep = Preprocess {
        resize: (pick & 4 != 0).then_some(u32::from(pick >> 4) + 1),
        center_crop: (pick & 8 != 0).then_some((u32::from(pick >> 5) + 1, 3)),
        bgr: pick & 16 != 0,
        ..Default::default()
    };
    let dir = scratch().join("images");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("a.png"), body).map_err(|e| e.to_string())?;
    for skip_bad in [false, true] {
        if let Ok(data) = Dataset::from_images(&dir, &prep, skip_bad, &["x".into()], Some(&dims)) {
            read_all(&data)?;
        }
    }
    Ok(())
}

/// A text file of sentences (`--texts`), tokenized by the committed test
/// tokenizer: the first byte picks the max length (1 to 16) and whether the
/// inputs are int32, the rest is the file.
pub fn text_file(bytes: &[u8]) -> Result<(), String> {
    use ascend_quant::data::TextSource;
    let (head, body) = bytes.split_at(bytes.len().min(1));
    let pick = head.first().copied().unwrap_or(0);
    let dir = scratch().join("texts");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.exists() {
        std::fs::write(&tokenizer, include_str!("../fixtures/texts/tokenizer.json"))
            .map_err(|e| e.to_string())?;
    }
    let file = dir.join("sentences.txt");
    std::fs::write(&file, body).map_err(|e| e.to_string())?;
    let source = TextSource {
        file,
        tokenizer,
        max_length: None,
    };
    let elem = if pick & 0x10 != 0 { Some(6) } else { Some(7) };
    let inputs: Vec<(String, Option<i32>)> = ["input_ids", "attention_mask", "token_type_ids"]
        .iter()
        .map(|n| (n.to_string(), elem))
        .collect();
    let data = Dataset::from_texts(&source, 1 + usize::from(pick & 0x0f), &inputs)
        .map_err(|e| e.to_string())?;
    read_all(&data)
}
