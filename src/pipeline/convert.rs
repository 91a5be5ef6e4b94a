//! One `convert-qat` job: a QDQ model in; deploy model, fake-quant model,
//! record and report out (all or none).

use super::artifacts::{Quantized, write_artifacts};
use super::error::PipelineError;
use super::outputs::{OutputFiles, check_writable};
use crate::convert::{FloatOp, convert};
use crate::onnx::load_model;
use crate::quant::calibrate::{RunSettings, finish};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// What `convert-qat` takes.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The QDQ model.
    pub model: PathBuf,
    /// Output prefix: `PREFIX_deploy_model.onnx` and so on.
    pub output: PathBuf,
}

/// One converted layer or tensor in the report.
#[derive(Clone, Debug, Serialize)]
pub struct ConvertedEntry {
    /// Record key (layer name, or `NODE:INPUT_INDEX` for a tensor).
    pub name: String,
    /// The operator.
    pub op_type: String,
    /// Activation scale.
    pub scale_d: f32,
    /// Activation offset (uint8 zero point − 128, or the int8 zero point).
    pub offset_d: i32,
    /// Weight scales (none for tensors).
    pub scale_w: usize,
}

/// The report of a conversion.
#[derive(Clone, Debug, Serialize)]
pub struct ConvertReport {
    /// The QDQ model.
    pub model: String,
    /// Files written.
    pub outputs: Vec<String>,
    /// Layers that became Ascend int8 layers.
    pub layers: Vec<ConvertedEntry>,
    /// Inputs that became tensor quantizations.
    pub tensor_quantize: Vec<ConvertedEntry>,
    /// Operators that run in float, and why.
    pub float_ops: Vec<FloatOp>,
    /// Seconds the conversion took.
    pub seconds: f64,
}

/// Converts the QDQ model and writes the four files.
pub fn convert_qat(opts: &ConvertOptions) -> Result<ConvertReport, PipelineError> {
    let started = Instant::now();
    check_writable(&opts.output)?;
    let model = load_model(&opts.model)?;
    let file = opts.model.display().to_string();
    let converted = convert(&model, &file)?;
    let op_of = |name: &str| {
        converted
            .calibrated
            .candidates
            .iter()
            .find(|c| c.node == name)
            .map(|c| c.op_type.clone())
            .unwrap_or_default()
    };
    let layers = converted
        .calibrated
        .factors
        .iter()
        .map(|f| ConvertedEntry {
            name: f.layer.name.clone(),
            op_type: op_of(&f.layer.name),
            scale_d: f.act.scale,
            offset_d: f.act.offset,
            scale_w: f.scale_w.len(),
        })
        .collect();
    let tensor_quantize = converted
        .calibrated
        .tensors
        .iter()
        .map(|t| ConvertedEntry {
            name: t.key.clone(),
            op_type: t.op_type.clone(),
            scale_d: t.act.scale,
            offset_d: t.act.offset,
            scale_w: 0,
        })
        .collect();
    let run = RunSettings {
        batch_size: 1,
        dynamic_batch: false,
        progress: &|_, _| {},
        similarity_samples: 0,
    };
    let outcome = finish(converted.calibrated, None, &run)?;
    let files = OutputFiles::new(&opts.output);
    let report = ConvertReport {
        model: file,
        outputs: [
            &files.deploy,
            &files.fake_quant,
            &files.record,
            &files.report,
        ]
        .iter()
        .map(|p| p.display().to_string())
        .collect(),
        layers,
        tensor_quantize,
        float_ops: converted.float_ops,
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| PipelineError::Usage(format!("serializing the report: {e}")))?;
    write_artifacts(&opts.output, Quantized::of(&outcome), |_| {
        Ok(vec![(files.report.clone(), json.into_bytes())])
    })?;
    Ok(report)
}
