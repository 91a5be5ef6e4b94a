//! Scoring a candidate configuration: on the evaluation data with the CPU
//! simulator, or by the user's own command.

use super::metric::Metric;
use crate::data::Dataset;
use crate::onnx::ModelProto;
use crate::quant::error::QuantError;
use crate::sim::{Executor, SessionOptions};
use crate::tensor::Tensor;
use ndarray::{ArrayD, Axis};
use prost::Message;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Scores a quantized model (higher is better).
pub trait Evaluator {
    /// Whether [`Evaluator::evaluate`] wants the fake-quant model itself (to
    /// hand to another program) rather than the simulation model, which
    /// computes the same thing in fewer operators.
    fn wants_fake_quant(&self) -> bool;
    /// The metric of a candidate: its fake-quant or simulation model, as
    /// [`Evaluator::wants_fake_quant`] asks.
    fn evaluate(&mut self, model: &ModelProto) -> Result<f64, QuantError>;
    /// The float model's metric.
    fn float_score(&mut self, float: &ModelProto) -> Result<f64, QuantError>;
}

/// Runs models on evaluation data with the simulator and scores the first output.
pub struct InternalEvaluator<'a> {
    executor: &'a dyn Executor,
    data: &'a Dataset,
    batch_size: usize,
    dynamic_batch: bool,
    metric: Metric,
    reference: Option<ArrayD<f32>>,
}

impl<'a> InternalEvaluator<'a> {
    /// An evaluator over `data` in batches of `batch_size`.
    pub fn new(
        executor: &'a dyn Executor,
        data: &'a Dataset,
        batch_size: usize,
        dynamic_batch: bool,
        metric: Metric,
    ) -> Self {
        InternalEvaluator {
            executor,
            data,
            batch_size,
            dynamic_batch,
            metric,
            reference: None,
        }
    }

    fn outputs(&self, model: &ModelProto) -> Result<ArrayD<f32>, QuantError> {
        let session = self.executor.prepare(
            model,
            &SessionOptions {
                dynamic_batch: self.dynamic_batch,
                ..Default::default()
            },
        )?;
        let output = session
            .outputs()
            .first()
            .map(|o| o.name.clone())
            .ok_or_else(|| QuantError::Input("the model has no output".into()))?;
        let mut parts = Vec::new();
        for b in 0..self.data.batch_count(self.batch_size) {
            let batch = self.data.batch(self.batch_size, b)?;
            let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
            match session.run(&feeds, &[output.as_str()])?.remove(0) {
                Tensor::F32(a) => parts.push(a),
                other => {
                    return Err(QuantError::Input(format!(
                        "output '{output}' is {}, the metrics need float32",
                        other.dtype()
                    )));
                }
            }
        }
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        ndarray::concatenate(Axis(0), &views)
            .map_err(|e| QuantError::Input(format!("evaluation outputs do not stack: {e}")))
    }
}

impl Evaluator for InternalEvaluator<'_> {
    fn float_score(&mut self, float: &ModelProto) -> Result<f64, QuantError> {
        let out = self.outputs(float)?;
        if let Metric::Top1(labels) = &self.metric
            && labels.len() != out.shape()[0]
        {
            return Err(QuantError::Input(format!(
                "{} labels for {} evaluation samples",
                labels.len(),
                out.shape()[0]
            )));
        }
        let score = self.metric.score(&out, &out);
        self.reference = Some(out);
        Ok(score)
    }

    fn wants_fake_quant(&self) -> bool {
        false
    }

    fn evaluate(&mut self, simulation: &ModelProto) -> Result<f64, QuantError> {
        let out = self.outputs(simulation)?;
        let reference = self.reference.as_ref().expect("float_score runs first");
        Ok(self.metric.score(&out, reference))
    }
}

/// Runs the user's command with `{model}` replaced by a model file and reads
/// the metric from the last line of its standard output.
pub struct ExternalEvaluator {
    command: String,
    timeout: Duration,
    scratch: PathBuf,
}

impl ExternalEvaluator {
    /// An evaluator running `command` (through `sh -c`), writing models under `scratch`.
    pub fn new(command: String, timeout: Duration, scratch: PathBuf) -> Self {
        ExternalEvaluator {
            command,
            timeout,
            scratch,
        }
    }

    /// Runs the command on `model` and parses its number.
    pub fn score_file(&self, model: &ModelProto, file: &str) -> Result<f64, QuantError> {
        let path = self.scratch.join(file);
        crate::fsutil::write_atomic(&path, &model.encode_to_vec())
            .map_err(|e| QuantError::Input(format!("cannot write {}: {e}", path.display())))?;
        let line = self.command.replace("{model}", &path.display().to_string());
        let fail = |why: String| QuantError::Input(format!("evaluator `{line}` {why}"));
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&line)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("could not start: {e}")))?;
        let started = Instant::now();
        loop {
            match child.try_wait().map_err(|e| fail(e.to_string()))? {
                Some(_) => break,
                None if started.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!(
                        "did not finish within {} s (--evaluator-timeout)",
                        self.timeout.as_secs()
                    )));
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(fail(format!(
                "failed ({}): {}",
                out.status,
                stderr.trim().lines().last().unwrap_or("")
            )));
        }
        let last = stdout
            .trim()
            .lines()
            .last()
            .unwrap_or("")
            .trim()
            .to_string();
        last.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| fail(format!("printed '{last}' as its last line, not a number")))
    }
}

impl Evaluator for ExternalEvaluator {
    fn float_score(&mut self, float: &ModelProto) -> Result<f64, QuantError> {
        self.score_file(float, "auto_float_model.onnx")
    }

    fn wants_fake_quant(&self) -> bool {
        true
    }

    fn evaluate(&mut self, fake_quant: &ModelProto) -> Result<f64, QuantError> {
        self.score_file(fake_quant, "auto_candidate_fake_quant_model.onnx")
    }
}
