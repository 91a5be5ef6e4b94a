//! One `qat` job: calibrate the initial clips, fine-tune the fake-quantized
//! model on the CPU, and write the deploy model, fake-quant model, record and
//! report from the trained weights and learned clips (all or none).

use super::Progress;
use super::artifacts::{Quantized, write_artifacts};
use super::error::PipelineError;
use super::inputs::{DataSource, layer_names};
use super::outputs::{check_writable, declared_batch, with_suffix};
use crate::data::Dataset;
use crate::onnx::{ModelProto, Storage, load_model, to_proto};
use crate::quant::calibrate::{RunSettings, observe_layers};
use crate::quant::config::QuantConfig;
use crate::quant::dmq::{ChannelAxes, balance_weight};
use crate::quant::emit::LayerFactors;
use crate::quant::params::ActParams;
use crate::quant::retrain_config::RetrainConfig;
use crate::quant::weights::{ChannelLayout, arq_scales, quantize_bias, quantize_weight};
use crate::report::metric::Metric;
use crate::sim::CpuExecutor;
use crate::tensor::Tensor;
use crate::train::checkpoint::Checkpoint;
use crate::train::fake_quant::ulq_grid;
use crate::train::graph::{Balance, LayerQuant, TrainError, TrainGraph};
use crate::train::qat::{LossKind, QatSettings, TrainedLayer, outputs_over, train};
use ndarray::ArrayD;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

impl From<TrainError> for PipelineError {
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Diverged(m) => PipelineError::Training(m),
            e @ TrainError::Interrupted(_) => PipelineError::Training(e.to_string()),
            other => PipelineError::Usage(other.to_string()),
        }
    }
}

/// Scores the fake-quantized `graph` on the evaluation set with the metrics
/// of `auto` (as fractions): top-1 accuracy with labels, top-1 agreement and
/// mean output cosine with the float model's outputs (`reference`).
fn evaluate(
    graph: &TrainGraph,
    eval: &Dataset,
    batch_size: usize,
    labels: Option<&[i64]>,
    reference: &ArrayD<f32>,
    output: &str,
) -> Result<serde_json::Value, TrainError> {
    let y = outputs_over(graph, eval, batch_size, Some(output))?;
    let mut v = json!({
        "top1_agreement": Metric::Top1Agreement.score(&y, reference) / 100.0,
        "output_cosine": Metric::Cosine.score(&y, reference) / 100.0,
        "samples": y.shape().first().copied().unwrap_or(0),
    });
    if y.ndim() == 2 {
        // Embeddings: does each sample keep its nearest neighbour?
        v["nn_agreement"] = json!(Metric::NnAgreement.score(&y, reference) / 100.0);
    }
    if let Some(l) = labels {
        v["top1"] = json!(Metric::Top1(l.to_vec()).score(&y, reference) / 100.0);
    }
    Ok(v)
}

/// The loss choices of `qat --loss`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossChoice {
    /// Cross-entropy with labels, else KL distillation.
    #[default]
    Auto,
    /// Cross-entropy against --labels.
    Ce,
    /// KL divergence from the float model's softmax.
    Kl,
    /// Mean squared error to the float model's outputs.
    Mse,
    /// One minus the cosine of each sample's output with the float model's.
    Cosine,
}

impl crate::choice::Choice for LossChoice {
    const ALL: &'static [Self] = &[
        LossChoice::Auto,
        LossChoice::Ce,
        LossChoice::Kl,
        LossChoice::Mse,
        LossChoice::Cosine,
    ];

    fn name(self) -> &'static str {
        match self {
            LossChoice::Auto => "auto",
            LossChoice::Ce => "ce",
            LossChoice::Kl => "kl",
            LossChoice::Mse => "mse",
            LossChoice::Cosine => "cosine",
        }
    }

    fn help(self) -> &'static str {
        match self {
            LossChoice::Auto => "Cross-entropy with labels, else KL distillation",
            LossChoice::Ce => "Cross-entropy against --labels",
            LossChoice::Kl => "KL divergence from the float model's softmax",
            LossChoice::Mse => "Mean squared error to the float model's outputs",
            LossChoice::Cosine => {
                "One minus the cosine of each sample's output with the float model's (embeddings)"
            }
        }
    }
}

/// What `qat` takes.
#[derive(Clone, Debug)]
pub struct QatOptions {
    /// The float model.
    pub model: PathBuf,
    /// Training data (same forms as calibration data).
    pub data: DataSource,
    /// Integer labels, one per sample, for cross-entropy.
    pub labels: Option<PathBuf>,
    /// The retrain configuration, AMCT JSON (default: every layer, clips from IFMR).
    pub config: Option<PathBuf>,
    /// The retrain configuration as AMCT's simple config (`AMCTRetrainConfig`).
    pub simple_config: Option<PathBuf>,
    /// Optimizer steps (default: one epoch).
    pub steps: Option<usize>,
    /// Epochs, when `steps` is not given.
    pub epochs: usize,
    /// Samples per batch.
    pub batch_size: usize,
    /// Learning rate of the weights.
    pub lr: f32,
    /// Learning rate of the clips.
    pub clip_lr: f32,
    /// The loss.
    pub loss: LossChoice,
    /// The output the loss and the evaluation read (default: the first
    /// float32 output).
    pub distill_output: Option<String>,
    /// Also train the tables of the model's Gathers (embeddings), which are
    /// frozen otherwise.
    pub train_embeddings: bool,
    /// Start from `calibrate --optimize`'s quantization (DMQ balancing,
    /// IFMR ranges searched lower, per-column Gemm/MatMul weights).
    pub optimize: bool,
    /// Seed of the batch order.
    pub seed: u64,
    /// A checkpoint to continue from (`PREFIX_qat_checkpoint` of an earlier run).
    pub resume: Option<PathBuf>,
    /// Evaluation data, scored after every epoch.
    pub eval_data: Vec<String>,
    /// Evaluation images, instead of `eval_data`.
    pub eval_images: Option<crate::data::ImageSource>,
    /// Evaluation sentences, tokenized as the calibration's (`--eval-texts`).
    pub eval_texts: Option<crate::data::TextSource>,
    /// Labels of the evaluation data (top-1 accuracy); else agreement with float.
    pub eval_labels: Option<PathBuf>,
    /// Output prefix.
    pub output: PathBuf,
}

/// What a `qat` run produced.
pub struct QatResult {
    /// The loss of the first and the last step.
    pub first_loss: f64,
    /// The loss of the last step.
    pub last_loss: f64,
    /// Steps trained.
    pub steps: usize,
    /// The report as written.
    pub report_json: String,
    /// The files written.
    pub written: Vec<PathBuf>,
}

fn read_labels(path: &std::path::Path, samples: usize) -> Result<Vec<i64>, PipelineError> {
    let labels = crate::data::read_labels(path)?;
    if labels.len() != samples {
        return Err(PipelineError::Usage(format!(
            "{}: {} labels for {samples} samples; give one label per sample",
            path.display(),
            labels.len()
        )));
    }
    Ok(labels)
}

/// Runs quantization-aware training as `opts` say.
pub fn run(opts: &QatOptions, progress: Progress<'_>) -> Result<QatResult, PipelineError> {
    let started = Instant::now();
    if !(opts.lr > 0.0 && opts.clip_lr > 0.0) {
        return Err(PipelineError::Usage(
            "--lr and --clip-lr must be positive".into(),
        ));
    }
    check_writable(&opts.output)?;
    let model = load_model(&opts.model)?;
    let names = layer_names(&model)?;
    let retrain = match (&opts.config, &opts.simple_config) {
        (Some(_), Some(_)) => {
            return Err(PipelineError::Usage(
                "give --config or --simple-config, not both".into(),
            ));
        }
        (Some(p), None) => RetrainConfig::from_json_file(p, &names)?,
        (None, Some(p)) => RetrainConfig::from_simple_config(p, &names)?,
        (None, None) => RetrainConfig::default_for(&names),
    };
    let data = opts.data.open(&model)?;
    let labels = opts
        .labels
        .as_deref()
        .map(|p| read_labels(p, data.samples()))
        .transpose()?;
    let loss = match (opts.loss, labels.is_some()) {
        (LossChoice::Ce, false) => {
            return Err(PipelineError::Usage("--loss ce needs --labels".into()));
        }
        (LossChoice::Auto | LossChoice::Ce, true) => LossKind::CrossEntropy,
        (LossChoice::Auto | LossChoice::Kl, _) => LossKind::Distillation,
        (LossChoice::Mse, _) => LossKind::Mse,
        (LossChoice::Cosine, _) => LossKind::Cosine,
    };
    let model_outputs: Vec<crate::onnx::ValueSpec> = model
        .graph
        .as_ref()
        .map(|g| {
            g.output
                .iter()
                .map(crate::onnx::ValueSpec::from_proto)
                .collect()
        })
        .unwrap_or_default();
    let output = crate::onnx::ValueSpec::scored_output(
        &model_outputs,
        opts.distill_output.as_deref(),
        "--distill-output",
    )
    .map_err(PipelineError::Usage)?;
    // Initial clips: IFMR over the first batch_num batches (a PTQ observation).
    let mut ptq = QuantConfig::default_for(&names);
    ptq.batch_num = Some(
        retrain
            .batch_num
            .min(data.batch_count(opts.batch_size))
            .max(1),
    );
    for (name, l) in &mut ptq.layers {
        l.quant_enable = retrain.layer(name).is_none_or(|r| r.retrain_enable);
        l.channel_wise = retrain.layer(name).is_some_and(|r| r.channel_wise);
    }
    if opts.optimize {
        // Start from `calibrate --optimize`'s quantization; training takes
        // the place of its bias correction.
        super::inputs::apply_optimize(&mut ptq, &names);
        ptq.bias_correction = false;
    }
    let declared = declared_batch(&model);
    let calibrated = observe_layers(
        model.clone(),
        &ptq,
        &data,
        &CpuExecutor,
        &RunSettings {
            batch_size: opts.batch_size,
            dynamic_batch: declared.is_some_and(|d| d != opts.batch_size),
            progress: progress.batches,
            similarity_samples: 0,
        },
    )?;
    let prepared = calibrated.prepared.clone();
    let mut student = TrainGraph::new(&prepared)?;
    let mut trained_layers = Vec::new();
    for f in &calibrated.factors {
        let l = &f.layer;
        if !matches!(
            l.op_type.as_str(),
            "Conv" | "ConvTranspose" | "Gemm" | "MatMul"
        ) {
            continue; // AveragePool keeps its calibrated factors
        }
        if l.second_input.is_some() {
            // A two-input MatMul trains fake-quantized at its calibrated
            // ranges (both symmetric), which it keeps: the trainer does not
            // learn them.
            let s2 = f.scale_w.first().copied().unwrap_or(0.0);
            let (lo, hi) = f.act.range(8);
            student.set_quant(
                &l.name,
                LayerQuant {
                    clip_min: lo,
                    clip_max: hi,
                    fixed_min: false,
                    channel_wise: false,
                    second: Some((-128.0 * s2, 127.0 * s2)),
                    ..Default::default()
                },
            )?;
            continue;
        }
        let cfg = retrain.layer(&l.name);
        let (lo, hi) = f.act.range(8);
        let (clip_min, clip_max) = cfg.and_then(|c| c.clips).unwrap_or((lo, hi));
        let fixed_min = cfg.and_then(|c| c.fixed_min).unwrap_or(clip_min >= 0.0);
        let balance = match &f.balance {
            Some(factors) => Some(Balance {
                factors: factors.clone(),
                axes: balance_axes(&prepared, l)?,
            }),
            None => None,
        };
        student.set_quant(
            &l.name,
            LayerQuant {
                clip_min: if fixed_min { 0.0 } else { clip_min },
                clip_max,
                fixed_min,
                channel_wise: f.scale_w.len() > 1,
                balance,
                ..Default::default()
            },
        )?;
        trained_layers.push(TrainedLayer {
            name: l.name.clone(),
            fixed_min,
        });
    }
    // The float teacher runs on the inference engine (no activations kept).
    let teacher_session = match loss {
        LossKind::CrossEntropy => None,
        _ => Some(crate::sim::Executor::prepare(
            &crate::sim::CpuExecutor,
            &prepared,
            &crate::sim::SessionOptions {
                dynamic_batch: true,
                ..Default::default()
            },
        )?),
    };
    let teacher_fn = |feeds: &[(&str, &Tensor)]| -> Result<ndarray::ArrayD<f32>, TrainError> {
        let session = teacher_session.as_ref().expect("built for distillation");
        let mut out = session
            .run(feeds, &[output.as_str()])
            .map_err(|e| TrainError::Invalid(format!("the float teacher: {e}")))?;
        match out.pop() {
            Some(crate::tensor::Tensor::F32(a)) => Ok(a),
            _ => Err(TrainError::Invalid(
                "the float teacher's output is not float32".into(),
            )),
        }
    };
    let teacher: Option<&crate::train::qat::Teacher<'_>> = teacher_session
        .as_ref()
        .map(|_| &teacher_fn as &crate::train::qat::Teacher<'_>);
    let mut trainable: Vec<String> = calibrated
        .factors
        .iter()
        .flat_map(|f| [f.layer.weight.clone(), f.layer.bias.clone()])
        .flatten()
        .collect();
    if opts.train_embeddings {
        trainable.extend(embedding_tables(&prepared));
    }
    student.train_only(&trainable);
    let steps = opts
        .steps
        .unwrap_or(opts.epochs.max(1) * data.batch_count(opts.batch_size));
    let settings = QatSettings {
        steps,
        batch_size: opts.batch_size,
        lr: opts.lr,
        clip_lr: opts.clip_lr,
        loss,
        seed: opts.seed,
        output: Some(output.clone()),
    };
    let start = opts
        .resume
        .as_deref()
        .map(Checkpoint::load)
        .transpose()
        .map_err(PipelineError::Usage)?;
    if let Some(c) = &start
        && c.step > steps
    {
        return Err(PipelineError::Usage(format!(
            "the checkpoint is at step {}, past the {steps} steps asked for; ask for more steps",
            c.step
        )));
    }
    let checkpoint_path = with_suffix(&opts.output, "_qat_checkpoint");
    let eval = super::inputs::open_eval(
        &opts.eval_data,
        opts.eval_images.as_ref(),
        opts.eval_texts.as_ref(),
        &model,
    )?;
    let eval_labels = match (&eval, &opts.eval_labels) {
        (Some(e), Some(p)) => Some(read_labels(p, e.samples())?),
        (None, Some(_)) => {
            return Err(PipelineError::Usage(
                "--eval-labels needs --eval-data or --eval-images".into(),
            ));
        }
        _ => None,
    };
    // The float model's outputs on the evaluation set, once.
    let reference = match &eval {
        Some(e) => outputs_over(
            &TrainGraph::new(&prepared)?,
            e,
            opts.batch_size,
            Some(&output),
        )?,
        None => ArrayD::zeros(ndarray::IxDyn(&[0])),
    };
    let epochs_report = std::cell::RefCell::new(Vec::<serde_json::Value>::new());
    let mut save = |c: &Checkpoint, graph: &TrainGraph| -> Result<(), TrainError> {
        c.save(&checkpoint_path).map_err(|e| {
            TrainError::Invalid(format!(
                "cannot write the checkpoint {}: {e}",
                checkpoint_path.display()
            ))
        })?;
        if let Some(e) = &eval {
            let mut m = evaluate(
                graph,
                e,
                opts.batch_size,
                eval_labels.as_deref(),
                &reference,
                &output,
            )?;
            m["step"] = json!(c.step);
            (progress.message)(&format!("after step {}: {m}", c.step));
            epochs_report.borrow_mut().push(m);
        }
        Ok(())
    };
    let first_step = start.as_ref().map_or(0, |c| c.step);
    let training_started = Instant::now();
    let losses = train(
        &mut student,
        teacher,
        &trained_layers,
        &trainable,
        &data,
        labels.as_deref(),
        &settings,
        start.as_ref(),
        &mut save,
        &|step, loss| {
            let done = step.saturating_sub(first_step).max(1);
            let secs = training_started.elapsed().as_secs_f64();
            let rate = (done * opts.batch_size) as f64 / secs.max(1e-9);
            let eta = secs / done as f64 * steps.saturating_sub(step) as f64;
            (progress.batches)(step, steps);
            (progress.status)(&format!(
                "step {step}/{steps}: loss {loss:.5}, {rate:.1} images/s, ETA {eta:.0} s"
            ));
        },
    )
    .map_err(|e| match (e, declared) {
        // A graph exported for one batch size may hold constants of it.
        (TrainError::Invalid(m), Some(d)) if d != opts.batch_size => TrainError::Invalid(format!(
            "{m} (the model is exported for batch {d}: train with --batch-size {d}, or export it with a dynamic batch axis)"
        )),
        (e, _) => e,
    })?;
    let training_seconds = training_started.elapsed().as_secs_f64();
    // The trained model and its factors.
    let mut trained = prepared.clone();
    write_back(&mut trained, &mut student, &trainable)?;
    let mut factors = Vec::new();
    let mut clips_report = Vec::new();
    for f in &calibrated.factors {
        let l = &f.layer;
        let act = match student
            .quant_mut(&l.name)
            .filter(|_| l.second_input.is_none())
        {
            Some(q) => {
                clips_report
                    .push(json!({"layer": l.name, "clip_min": q.clip_min, "clip_max": q.clip_max}));
                let grid = ulq_grid(q.clip_min, q.clip_max, 8).ok_or_else(|| {
                    PipelineError::Usage(format!(
                        "layer '{}': the learned clip range is empty",
                        l.name
                    ))
                })?;
                ActParams {
                    scale: grid.scale,
                    offset: grid.offset,
                }
            }
            None => f.act,
        };
        let (weight_q, bias_q, scale_w) = match &l.weight {
            Some(w) => {
                let w = student.constant_mut(w).cloned().ok_or_else(|| {
                    PipelineError::Usage(format!("layer '{}': weight not found", l.name))
                })?;
                // A balanced layer's int8 weight holds its factors.
                let w = match &f.balance {
                    Some(s) => balance_weight(&w, s, balance_axes(&trained, l)?),
                    None => w,
                };
                let layout = if f.scale_w.len() > 1 {
                    l.channel_layout
                } else {
                    ChannelLayout::PerTensor
                };
                let scale_w = arq_scales(&l.name, &w, layout, 8)
                    .map_err(|e| PipelineError::Usage(e.to_string()))?;
                let bias = match &l.bias {
                    Some(b) => {
                        let values: Vec<f32> = student
                            .constant_mut(b)
                            .map(|a| a.iter().copied().collect())
                            .unwrap_or_default();
                        Some(
                            quantize_bias(&l.name, &values, &scale_w, act.scale)
                                .map_err(|e| PipelineError::Usage(e.to_string()))?,
                        )
                    }
                    None => None,
                };
                (
                    Some(quantize_weight(&w, &scale_w, layout, 8)),
                    bias,
                    scale_w,
                )
            }
            None => (None, None, f.scale_w.clone()),
        };
        factors.push(LayerFactors {
            layer: l.clone(),
            act,
            scale_w,
            weight_q,
            bias_q,
            nuq: None,
            balance: f.balance.clone(),
        });
    }
    let report_path = with_suffix(&opts.output, "_qat_report.json");
    let report = json!({
        "model": opts.model.display().to_string(),
        "loss": loss.name(),
        "distill_output": output,
        "optimize": opts.optimize,
        "train_embeddings": opts.train_embeddings,
        "steps": steps,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "clip_lr": opts.clip_lr,
        "seed": opts.seed,
        "loss_per_step": losses,
        "resumed_from_step": start.as_ref().map(|c| c.step),
        "eval_per_epoch": epochs_report.borrow().clone(),
        "checkpoint": checkpoint_path.display().to_string(),
        "clips": clips_report,
        "fused_batch_norms": calibrated.preparation.fused,
        "quantized_layers": factors.len(),
        "seconds": {
            "total": started.elapsed().as_secs_f64(),
            "initial_calibration": calibrated.seconds,
            "training": training_seconds,
        },
    });
    let report_json = serde_json::to_string_pretty(&report)
        .map_err(|e| PipelineError::Usage(format!("serializing the report: {e}")))?;
    let quantized = Quantized {
        prepared: &trained,
        factors: &factors,
        tensors: &[],
        fp16_quant: retrain.fp16_quant,
    };
    let report_bytes = report_json.clone().into_bytes();
    let written = write_artifacts(&opts.output, quantized, |_| {
        Ok(vec![(report_path, report_bytes)])
    })?;
    Ok(QatResult {
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        last_loss: losses.last().copied().unwrap_or(f64::NAN),
        steps,
        report_json,
        written,
    })
}

/// Where a balanced layer's input channels sit.
fn balance_axes(
    model: &ModelProto,
    l: &crate::quant::layers::QuantLayer,
) -> Result<ChannelAxes, PipelineError> {
    model
        .graph
        .as_ref()
        .and_then(|g| ChannelAxes::of(g, l))
        .ok_or_else(|| {
            PipelineError::Usage(format!(
                "layer '{}': DMQ balancing needs its weight's input channels",
                l.name
            ))
        })
}

/// The float tables the model's Gathers read by computed indices: its
/// embeddings (word, position, token type), trained only on request.
fn embedding_tables(model: &ModelProto) -> Vec<String> {
    let Some(g) = model.graph.as_ref() else {
        return Vec::new();
    };
    let floats: std::collections::HashSet<&str> = g
        .initializer
        .iter()
        .filter(|t| t.data_type() == 1)
        .map(|t| t.name())
        .collect();
    g.node
        .iter()
        .filter(|n| n.op_type() == "Gather")
        .filter_map(|n| n.input.first())
        .filter(|t| floats.contains(t.as_str()))
        .cloned()
        .collect()
}

/// Replaces the trained initializers of `model` by the graph's values.
fn write_back(
    model: &mut ModelProto,
    graph: &mut TrainGraph,
    names: &[String],
) -> Result<(), PipelineError> {
    let g = crate::onnx::graph_of_mut(model, "the prepared model")?;
    for t in &mut g.initializer {
        if names.iter().any(|n| n == t.name())
            && let Some(v) = graph.constant_mut(t.name())
        {
            *t = to_proto(t.name(), &Tensor::F32(v.clone()), Storage::Raw);
        }
    }
    Ok(())
}
