//! `ascend-quant qat`: quantization-aware training on the CPU. Parses the
//! arguments, calls [`crate::pipeline::qat::run`] and prints the outcome.

use super::Failure;
use super::calibrate::{data_source, with_progress};
use crate::pipeline::qat::{LossChoice, QatOptions, run};
use std::path::PathBuf;

/// Arguments of `qat`.
#[derive(Debug, clap::Args)]
pub struct QatArgs {
    /// The float ONNX model.
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: FILE.npy, NAME=FILE.npy or FILE.npz; repeatable. Axis 0 counts samples.
    #[arg(long = "data")]
    pub data: Vec<String>,
    /// Folders of raw .bin batches, one per input, separated by ';' (AMCT style; needs --data-types and --input-shape).
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Element types of the .bin files, one per input, separated by ';'.
    #[arg(long, default_value = "float32")]
    pub data_types: String,
    /// Input shapes "name:n,c,h,w;name2:..." of the .bin batches.
    #[arg(long)]
    pub input_shape: Option<String>,
    /// Image folders and their preprocessing.
    #[command(flatten)]
    pub images: super::images::ImageArgs,
    /// Sentences and their tokenizer.
    #[command(flatten)]
    pub texts: super::texts::TextArgs,
    /// Integer labels (.npy), one per sample: cross-entropy instead of distillation.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// AMCT retrain configuration (see `ascend-quant config --qat`).
    #[arg(long, conflicts_with = "simple_config")]
    pub config: Option<PathBuf>,
    /// AMCT retrain simple configuration (AMCTRetrainConfig, protobuf text).
    #[arg(long)]
    pub simple_config: Option<PathBuf>,
    /// Optimizer steps (default: --epochs passes over the data; 0 writes the models of the starting clips).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Passes over the data.
    #[arg(long, default_value_t = 1, value_parser = super::at_least_one())]
    pub epochs: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 16, value_parser = super::at_least_one())]
    pub batch_size: usize,
    /// Learning rate of the weights (Adam).
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f32,
    /// Learning rate of the clips (Adam).
    #[arg(long, default_value_t = 1e-3)]
    pub clip_lr: f32,
    /// The loss.
    #[arg(long, value_enum, default_value = "auto")]
    pub loss: LossChoice,
    /// The output the loss and the evaluation read (default: the first float32 output), e.g. a sentence encoder's pooled embedding.
    #[arg(long, value_name = "NAME")]
    pub distill_output: Option<String>,
    /// Start from `calibrate --optimize`'s quantization: DMQ balancing chosen per layer, IFMR ranges searched lower, one weight scale per output column of Gemm/MatMul.
    #[arg(long)]
    pub optimize: bool,
    /// Also train the embedding tables (the float tables of the model's Gathers), frozen by default.
    #[arg(long)]
    pub train_embeddings: bool,
    /// Seed of the batch order (each epoch visits the batches in a new order).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluation data, scored after every epoch (same forms as --data); repeatable.
    #[arg(long = "eval-data")]
    pub eval_data: Vec<String>,
    /// Evaluation sentences, one per line (tokenized as --texts), instead of --eval-data.
    #[arg(long, value_name = "FILE")]
    pub eval_texts: Option<PathBuf>,
    /// A folder of evaluation images (preprocessed as --images), instead of --eval-data.
    #[arg(long, value_name = "DIR")]
    pub eval_images: Option<PathBuf>,
    /// Labels of the evaluation data: top-1 accuracy instead of agreement with float.
    #[arg(long)]
    pub eval_labels: Option<PathBuf>,
    /// Continue from a checkpoint (PREFIX_qat_checkpoint, written after every epoch).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Output prefix: PREFIX_deploy_model.onnx, PREFIX_fake_quant_model.onnx,
    /// PREFIX_record.txt and PREFIX_qat_report.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `qat`.
pub fn execute(args: &QatArgs) -> Result<(), Failure> {
    args.texts.check_used(args.eval_texts.as_ref())?;
    let opts = QatOptions {
        model: args.model.clone(),
        data: data_source(
            &args.data,
            args.data_dir.as_deref(),
            &args.data_types,
            args.input_shape.as_deref(),
            &args.images,
            &args.texts,
        )?,
        labels: args.labels.clone(),
        config: args.config.clone(),
        simple_config: args.simple_config.clone(),
        steps: args.steps,
        epochs: args.epochs,
        batch_size: args.batch_size.max(1),
        lr: args.lr,
        clip_lr: args.clip_lr,
        loss: args.loss,
        distill_output: args.distill_output.clone(),
        train_embeddings: args.train_embeddings,
        optimize: args.optimize,
        seed: args.seed,
        resume: args.resume.clone(),
        eval_data: args.eval_data.clone(),
        eval_images: args
            .eval_images
            .as_deref()
            .map(|d| args.images.source(d))
            .transpose()?,
        eval_texts: args
            .eval_texts
            .as_deref()
            .map(|f| args.texts.source(f))
            .transpose()?,
        eval_labels: args.eval_labels.clone(),
        output: args.output.clone(),
    };
    // Ctrl-C ends the current step, writes a checkpoint and stops (exit 2).
    let _ = ctrlc::set_handler(crate::train::qat::request_stop);
    let r = with_progress(args.quiet, "training", |p| run(&opts, p))?;
    if args.json {
        println!("{}", r.report_json);
    }
    if !args.quiet {
        eprintln!(
            "trained {} steps: loss {:.5} -> {:.5}",
            r.steps, r.first_loss, r.last_loss
        );
        for p in &r.written {
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}
