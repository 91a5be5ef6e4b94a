//! Scoring a candidate configuration: on the evaluation data with the CPU
//! simulator, or by the user's own command.

use crate::data::{Batch, Dataset};
use crate::onnx::{ModelProto, ValueSpec};
use crate::quant::error::QuantError;
use crate::report::metric::Metric;
use crate::sim::{Executor, SessionOptions};
use crate::tensor::Tensor;
use ndarray::{ArrayD, Axis};
use prost::Message;
use rayon::prelude::*;
use std::io::Read;
use std::os::unix::process::CommandExt;
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
    /// The metric of a candidate that only matters if it reaches `target`:
    /// an evaluator may stop as soon as the target is out of reach and
    /// return the best score the candidate could still have had (below
    /// `target`). By default, the full evaluation.
    fn evaluate_against(&mut self, model: &ModelProto, target: f64) -> Result<f64, QuantError> {
        let _ = target;
        self.evaluate(model)
    }
    /// The float model's metric.
    fn float_score(&mut self, float: &ModelProto) -> Result<f64, QuantError>;
}

/// Runs models on evaluation data with the simulator and scores one output:
/// the one named, else the first float32 output.
pub struct InternalEvaluator<'a> {
    executor: &'a dyn Executor,
    data: &'a Dataset,
    batch_size: usize,
    dynamic_batch: bool,
    metric: Metric,
    output: Option<String>,
    reference: Option<ArrayD<f32>>,
    /// Sentences run padded only to their batch's longest (set by
    /// [`Evaluator::float_score`] when that leaves the float model's output
    /// unchanged).
    unpadded: bool,
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
            output: None,
            reference: None,
            unpadded: false,
        }
    }

    /// Whether sentences run padded only to their batch's longest (known
    /// once the float model is scored).
    pub fn unpadded(&self) -> bool {
        self.unpadded
    }

    /// Scores the output `name` instead of the first float32 output (a
    /// sentence encoder's pooled embedding among its token embeddings).
    pub fn scoring(mut self, name: Option<String>) -> Self {
        self.output = name;
        self
    }

    /// The model's first output on the evaluation data. With `stop`, the
    /// batches run in groups and the run ends early when `stop` says so of
    /// the outputs so far (samples in order); the outputs then cover only
    /// the first samples.
    fn outputs(
        &self,
        model: &ModelProto,
        stop: Option<&StopRule<'_>>,
    ) -> Result<ArrayD<f32>, QuantError> {
        let session = self.executor.prepare(
            model,
            &SessionOptions {
                dynamic_batch: self.dynamic_batch,
                ..Default::default()
            },
        )?;
        let outputs = session.outputs();
        let output = ValueSpec::scored_output(outputs, self.output.as_deref(), "--metric-output")
            .map_err(QuantError::Input)?;
        // Batches run side by side: two batch-1 runs, each mostly on one
        // core, get through more samples per second than one run spread over
        // both (the kernels' own parallel loops share the same pool).
        let (data, batch_size, session, unpadded) =
            (self.data, self.batch_size, session.as_ref(), self.unpadded);
        let run_batch = |b: usize| -> Result<ArrayD<f32>, QuantError> {
            let batch = if unpadded {
                data.batch_unpadded(batch_size, b)?
            } else {
                data.batch(batch_size, b)?
            };
            let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
            match session.run(&feeds, &[output.as_str()])?.remove(0) {
                Tensor::F32(a) => Ok(a),
                other => Err(QuantError::Input(format!(
                    "output '{output}' is {}, the metrics need float32",
                    other.dtype()
                ))),
            }
        };
        let count = data.batch_count(batch_size);
        let group = if stop.is_some() { GROUP } else { count.max(1) };
        let stack = |parts: &[ArrayD<f32>]| {
            let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
            ndarray::concatenate(Axis(0), &views)
                .map_err(|e| QuantError::Input(format!("evaluation outputs do not stack: {e}")))
        };
        let mut parts: Vec<ArrayD<f32>> = Vec::with_capacity(count);
        let mut next_check = group;
        for start in (0..count).step_by(group) {
            let done: Vec<ArrayD<f32>> = (start..(start + group).min(count))
                .into_par_iter()
                .map(run_batch)
                .collect::<Result<_, _>>()?;
            parts.extend(done);
            // Checked after the first group, then each time the samples
            // double, so the prefixes stacked for it add up to at most
            // twice the outputs.
            if let Some(stop) = stop
                && parts.len() < count
                && parts.len() >= next_check
            {
                next_check = parts.len() * 2;
                if stop(&stack(&parts)?) {
                    break;
                }
            }
        }
        stack(&parts)
    }
}

impl InternalEvaluator<'_> {
    /// Whether sentences may run padded only to their batch's longest: the
    /// float model's scored output on the first batch keeps its shape and
    /// its values (within 1e-5 of its largest magnitude) — a pooled
    /// embedding or a classifier's logits do, token embeddings do not.
    fn padding_is_inert(&self, float: &ModelProto) -> Result<bool, QuantError> {
        if !self.data.is_text() || self.data.samples() == 0 {
            return Ok(false);
        }
        let session = self.executor.prepare(
            float,
            &SessionOptions {
                dynamic_batch: self.dynamic_batch,
                ..Default::default()
            },
        )?;
        let output =
            ValueSpec::scored_output(session.outputs(), self.output.as_deref(), "--metric-output")
                .map_err(QuantError::Input)?;
        let run = |batch: Batch| -> Result<Option<ArrayD<f32>>, QuantError> {
            let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
            Ok(match session.run(&feeds, &[output.as_str()]) {
                Ok(mut out) => match out.remove(0) {
                    Tensor::F32(a) => Some(a),
                    _ => None,
                },
                // A model that cannot take a shorter sequence keeps its padding.
                Err(_) => None,
            })
        };
        // The first batch that is shorter unpadded (one padded to the full
        // length would prove nothing).
        let mut probe = None;
        for b in 0..self.data.batch_count(self.batch_size).min(16) {
            let (full, short) = (
                self.data.batch(self.batch_size, b)?,
                self.data.batch_unpadded(self.batch_size, b)?,
            );
            if full.first().map(|(_, t)| t.shape()) != short.first().map(|(_, t)| t.shape()) {
                probe = Some((full, short));
                break;
            }
        }
        let Some((full, short)) = probe else {
            return Ok(false);
        };
        let (padded, short) = (run(full)?, run(short)?);
        Ok(match (padded, short) {
            (Some(a), Some(b)) if a.shape() == b.shape() => {
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
                a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale)
            }
            _ => false,
        })
    }
}

/// Says, from the outputs of the first samples, whether to stop a run.
type StopRule<'a> = dyn Fn(&ArrayD<f32>) -> bool + 'a;

/// Batches per group when a run may stop early: enough to keep both cores
/// busy, few enough that a hopeless candidate stops soon.
const GROUP: usize = 8;

impl Evaluator for InternalEvaluator<'_> {
    fn float_score(&mut self, float: &ModelProto) -> Result<f64, QuantError> {
        self.unpadded = self.padding_is_inert(float)?;
        let out = self.outputs(float, None)?;
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
        self.evaluate_against(simulation, f64::NEG_INFINITY)
    }

    fn evaluate_against(
        &mut self,
        simulation: &ModelProto,
        target: f64,
    ) -> Result<f64, QuantError> {
        let reference = self.reference.as_ref().ok_or_else(|| {
            QuantError::Input(
                "the float model must be scored (float_score) before a candidate".into(),
            )
        })?;
        let metric = &self.metric;
        let hopeless = |so_far: &ArrayD<f32>| metric.best_reachable(so_far, reference) < target;
        let out = self.outputs(simulation, Some(&hopeless))?;
        Ok(metric.best_reachable(&out, reference))
    }
}

/// Runs the user's command with `{model}` replaced by a model file and reads
/// the metric from the last line of its standard output.
///
/// The path replaces `{model}` shell-quoted (a bare `{model}`, `'{model}'` and
/// `"{model}"` all become one quoted word, so paths with spaces or quotes are
/// safe) and is also given in the environment as `ASCEND_QUANT_MODEL`. The
/// command's output is read on threads while it runs, so an evaluator that
/// prints a lot (a progress bar) never blocks on a full pipe; on timeout its
/// whole process group is killed. Models are written into a temporary folder
/// beside the outputs, removed with the evaluator.
pub struct ExternalEvaluator {
    command: String,
    timeout: Duration,
    scratch: PathBuf,
    folder: Option<tempfile::TempDir>,
}

/// `text` as one single-quoted shell word.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The command line with every form of the `{model}` placeholder replaced
/// by the quoted `path`.
pub fn substitute_model(command: &str, path: &str) -> String {
    let quoted = shell_quote(path);
    command
        .replace("'{model}'", &quoted)
        .replace("\"{model}\"", &quoted)
        .replace("{model}", &quoted)
}

/// Reads a pipe to its end on a thread.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut bytes);
        }
        bytes
    })
}

impl ExternalEvaluator {
    /// An evaluator running `command` (through `sh -c`), writing models into a
    /// temporary folder under `scratch`.
    pub fn new(command: String, timeout: Duration, scratch: PathBuf) -> Self {
        ExternalEvaluator {
            command,
            timeout,
            scratch,
            folder: None,
        }
    }

    fn folder(&mut self) -> Result<PathBuf, QuantError> {
        if self.folder.is_none() {
            let dir = tempfile::Builder::new()
                .prefix(".ascend-quant-eval-")
                .tempdir_in(&self.scratch)
                .map_err(|e| {
                    QuantError::Input(format!(
                        "cannot create a folder for the evaluated models in {}: {e}",
                        self.scratch.display()
                    ))
                })?;
            self.folder = Some(dir);
        }
        Ok(self
            .folder
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default())
    }

    /// Runs the command on `model` and parses its number.
    pub fn score_file(&mut self, model: &ModelProto, file: &str) -> Result<f64, QuantError> {
        let path = self.folder()?.join(file);
        crate::fsutil::write_atomic(&path, &model.encode_to_vec())
            .map_err(|e| QuantError::Input(format!("cannot write {}: {e}", path.display())))?;
        let line = substitute_model(&self.command, &path.display().to_string());
        let fail = |why: String| QuantError::Input(format!("evaluator `{}` {why}", self.command));
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&line)
            .env("ASCEND_QUANT_MODEL", &path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| fail(format!("could not start: {e}")))?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let started = Instant::now();
        let status = loop {
            match child.try_wait().map_err(|e| fail(e.to_string()))? {
                Some(status) => break Some(status),
                None if started.elapsed() > self.timeout => break None,
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let Some(status) = status else {
            // The shell's children hold the pipes too: end the whole group
            // (its id is the shell's pid, `process_group(0)` above).
            if let Ok(pgid) = libc::pid_t::try_from(child.id())
                && pgid > 1
            {
                // SAFETY: kill(2) takes plain integers; a negative pid names
                // the process group, which holds only the evaluator's processes.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!(
                "did not finish within {} s (--evaluator-timeout)",
                self.timeout.as_secs()
            )));
        };
        let stdout = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
        if !status.success() {
            return Err(fail(format!(
                "failed ({status}): {}",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_form_becomes_one_quoted_word() {
        let path = "/tmp/my models/it's.onnx";
        let quoted = "'/tmp/my models/it'\\''s.onnx'";
        for cmd in ["eval {model}", "eval '{model}'", "eval \"{model}\""] {
            assert_eq!(substitute_model(cmd, path), format!("eval {quoted}"));
        }
        // The shell reads it back as the one original path.
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(path)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), path);
    }
}
