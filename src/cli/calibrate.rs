//! `ascend-quant calibrate`: post-training quantization end to end, and
//! `ascend-quant config`: the default per-layer configuration of a model.
//! Parses the arguments into the library's options and prints the result.

use super::Failure;
use super::exit::usage;
use crate::pipeline::{
    Backend, CalibrateOptions, ConfigSource, DataSource, Progress, calibrate, default_config,
};
use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `calibrate`.
#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    /// The float ONNX model.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration data: FILE.npy (single input), NAME=FILE.npy, or FILE.npz; repeatable. Axis 0 counts samples.
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
    /// AMCT JSON configuration (see `ascend-quant config`).
    #[arg(long, conflicts_with = "simple_config")]
    pub config: Option<PathBuf>,
    /// AMCT simple configuration (.cfg, AMCTConfig in protobuf text format).
    #[arg(long)]
    pub simple_config: Option<PathBuf>,
    /// Samples per batch (default: the config's batch_size, else the model's batch size, else 1).
    #[arg(long, value_parser = super::at_least_one())]
    pub batch_size: Option<usize>,
    /// Calibration batches (default: the config's, else all the data).
    #[arg(long, value_parser = super::at_least_one())]
    pub batch_num: Option<usize>,
    /// Layers to keep in float, separated by ','.
    #[arg(long, value_delimiter = ',')]
    pub skip_layers: Vec<String>,
    /// Asymmetric activations (scale + offset) unless a layer says otherwise.
    #[arg(long)]
    pub activation_offset: Option<bool>,
    /// AMCT's FORCE_FP16_QUANT, for devices whose quant operator computes in
    /// fp16: the quant scale at fp16 precision, dequant factors truncated to S19.
    #[arg(long, value_name = "MODE", value_parser = ["FORCE_FP16_QUANT"])]
    pub fakequant_precision_mode: Option<String>,
    /// Where calibration runs.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// The AscendCL library or its folder (default: ASCEND_QUANT_ACL_LIB, then the CANN install paths).
    #[arg(long)]
    pub acl_lib: Option<PathBuf>,
    /// Output prefix: writes PREFIX_deploy_model.onnx, PREFIX_fake_quant_model.onnx,
    /// PREFIX_record.txt and PREFIX_quant_report.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Calibration samples on which each layer's float vs fake-quant cosine
    /// similarity is measured (0 skips it).
    #[arg(long, default_value_t = 8)]
    pub similarity_samples: usize,
    /// Quantize inputs of MaxPool / Add nodes on their own (AscendQuant +
    /// AscendAntiQuant): NODE (its computed inputs) or NODE:INPUT_INDEX, separated by ','.
    #[arg(long, value_delimiter = ',')]
    pub tensor_quantize: Vec<String>,
    /// Correct each layer's bias by its mean output error on the calibration
    /// data, with the quantized layers upstream.
    #[arg(long)]
    pub bias_correction: bool,
    /// The accuracy recipe: DMQ balancing (0.5) on every layer with a weight,
    /// then bias correction (slower: about 12x plain calibration on MobileNetV2).
    #[arg(long)]
    pub optimize: bool,
    /// Build the models from this record file's factors instead of
    /// calibrating (layers it does not name stay float; --data is then
    /// optional and only measures similarity).
    #[arg(long, conflicts_with_all = ["batch_num", "activation_offset", "skip_layers", "optimize", "bias_correction", "tensor_quantize"])]
    pub record: Option<PathBuf>,
    /// Also write a self-contained HTML page: per-layer factors, calibrator,
    /// cosine chart, and each layer's input histogram with the range kept.
    #[arg(long, value_name = "PAGE")]
    pub html: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar or table.
    #[arg(long)]
    pub quiet: bool,
}

/// Arguments of `config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The float ONNX model.
    #[arg(long)]
    pub model: PathBuf,
    /// Where to write the JSON configuration.
    #[arg(long)]
    pub output: PathBuf,
    /// Write the retrain (quantization-aware training) configuration instead.
    #[arg(long)]
    pub qat: bool,
}

/// Runs `config`.
pub fn execute_config(args: &ConfigArgs) -> Result<(), Failure> {
    let layers = default_config(&args.model, &args.output, args.qat)?;
    println!("wrote {} ({layers} layers)", args.output.display());
    Ok(())
}

pub(super) fn parse_shapes(text: &str) -> Result<Vec<(String, Vec<usize>)>, Failure> {
    text.split(';')
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (name, dims) = item
                .rsplit_once(':')
                .ok_or_else(|| usage(format!("--input-shape '{item}' must be NAME:D1,D2,...")))?;
            let dims = dims
                .split(',')
                .map(|d| {
                    d.trim()
                        .parse::<usize>()
                        .map_err(|_| usage(format!("--input-shape '{item}': '{d}' is not a size")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((name.to_string(), dims))
        })
        .collect()
}

/// The data the `--data`, `--data-dir`, `--data-types`, `--input-shape`,
/// `--images` and `--texts` arguments name.
pub(super) fn data_source(
    files: &[String],
    data_dir: Option<&str>,
    data_types: &str,
    input_shape: Option<&str>,
    images: &super::images::ImageArgs,
    texts: &super::texts::TextArgs,
) -> Result<DataSource, Failure> {
    let given = usize::from(!files.is_empty())
        + usize::from(data_dir.is_some())
        + usize::from(images.images.is_some())
        + usize::from(texts.texts.is_some());
    if given > 1 {
        return Err(usage(
            "give one of --data, --data-dir, --images or --texts, not several".into(),
        ));
    }
    if let Some(file) = &texts.texts {
        return Ok(DataSource::Texts(texts.source(file)?));
    }
    if let Some(dir) = &images.images {
        return Ok(DataSource::Images(images.source(dir)?));
    }
    match (data_dir, files.is_empty()) {
        (Some(dirs), true) => Ok(DataSource::BinFolders {
            dirs: dirs.to_string(),
            types: data_types.to_string(),
            shapes: parse_shapes(
                input_shape.ok_or_else(|| usage("--data-dir needs --input-shape".into()))?,
            )?,
        }),
        (Some(_), false) => Err(usage("give either --data or --data-dir, not both".into())),
        (None, _) => Ok(DataSource::Files(files.to_vec())),
    }
}

impl CalibrateArgs {
    /// The library's options for these arguments.
    pub fn to_options(&self) -> Result<CalibrateOptions, Failure> {
        let data = data_source(
            &self.data,
            self.data_dir.as_deref(),
            &self.data_types,
            self.input_shape.as_deref(),
            &self.images,
            &self.texts,
        )?;
        let config = match (&self.config, &self.simple_config) {
            (Some(p), _) => ConfigSource::Json(p.clone()),
            (None, Some(p)) => ConfigSource::Simple(p.clone()),
            (None, None) => ConfigSource::Default,
        };
        Ok(CalibrateOptions {
            html: self.html.clone(),
            model: self.model.clone(),
            data,
            config,
            batch_size: self.batch_size,
            batch_num: self.batch_num,
            skip_layers: self.skip_layers.clone(),
            activation_offset: self.activation_offset,
            fp16_quant: self.fakequant_precision_mode.is_some(),
            backend: self.backend,
            acl_lib: self.acl_lib.clone(),
            output: self.output.clone(),
            similarity_samples: self.similarity_samples,
            tensor_quantize: self.tensor_quantize.clone(),
            bias_correction: self.bias_correction,
            optimize: self.optimize,
            record: self.record.clone(),
        })
    }
}

/// Runs `job` with a progress bar over calibration batches and its messages
/// printed above the bar (nothing at all when `quiet`).
pub(super) fn with_progress<T>(quiet: bool, what: &str, job: impl FnOnce(Progress<'_>) -> T) -> T {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {{elapsed}} {{msg}}"
        )) {
            b.set_style(style);
        }
        b
    };
    let batches = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let message = |line: &str| {
        if !quiet {
            bar.suspend(|| eprintln!("{line}"));
        }
    };
    let status = |line: &str| match (quiet, bar.is_hidden()) {
        (true, _) => {}
        (false, true) => eprintln!("{line}"),
        (false, false) => bar.set_message(line.to_string()),
    };
    let result = job(Progress {
        batches: &batches,
        message: &message,
        status: &status,
    });
    bar.finish_and_clear();
    result
}

/// Runs `calibrate`.
pub fn execute(args: &CalibrateArgs) -> Result<(), Failure> {
    args.texts.check_used(None)?;
    let opts = args.to_options()?;
    let result = with_progress(args.quiet, "calibrating", |p| calibrate(&opts, p))?;
    if args.json {
        println!("{}", result.report_json);
    }
    if !args.quiet {
        result
            .report
            .print_table(&mut std::io::stderr())
            .context("printing the summary")?;
    }
    Ok(())
}
