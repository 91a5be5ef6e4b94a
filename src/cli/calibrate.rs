//! `ascend-quant calibrate`: post-training quantization end to end, and
//! `ascend-quant config`: the default per-layer configuration of a model.

use super::Failure;
use super::exit::usage;
use crate::data::Dataset;
use crate::fsutil::write_all_atomic;
use crate::npu::NpuExecutor;
use crate::onnx::{Dim, ModelProto, load_model};
use crate::quant::calibrate::{RunSettings, calibrate};
use crate::quant::config::QuantConfig;
use crate::quant::layers::discover;
use crate::quant::prepare::prepare;
use crate::report::{LayerReport, QuantReport};
use crate::sim::{Executor, RtenExecutor, feedable_input_names};
use anyhow::Context;
use prost::Message;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where calibration runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The NPU when one is usable, else the CPU simulator.
    Auto,
    /// The CPU simulator.
    Cpu,
    /// An Ascend NPU through AscendCL (atc compiles the model).
    Npu,
}

/// The executor for `backend` and a one-line description of the choice.
pub(super) fn select_backend(
    backend: Backend,
    acl_lib: Option<&Path>,
    output: &Path,
) -> Result<(Box<dyn Executor>, String), Failure> {
    let cache = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(".ascend-quant-cache");
    let npu = || -> Result<NpuExecutor, String> {
        crate::npu::atc::find_atc().map_err(|e| e.to_string())?;
        NpuExecutor::new(acl_lib, &cache).map_err(|e| e.to_string())
    };
    match backend {
        Backend::Cpu => Ok((Box::new(RtenExecutor), "cpu simulator".into())),
        Backend::Npu => {
            let n = npu().map_err(|e| Failure {
                code: super::ExitCode::Runtime,
                error: anyhow::anyhow!("--backend npu: {e}"),
            })?;
            let line = format!("npu ({}, device 0)", n.soc());
            Ok((Box::new(n), line))
        }
        Backend::Auto => match npu() {
            Ok(n) => {
                let line = format!("npu ({}, device 0)", n.soc());
                Ok((Box::new(n), line))
            }
            Err(e) => {
                let why = e.split(" (searched").next().unwrap_or(&e).to_string();
                Ok((Box::new(RtenExecutor), format!("cpu simulator ({why})")))
            }
        },
    }
}

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
    /// AMCT JSON configuration (see `ascend-quant config`).
    #[arg(long, conflicts_with = "simple_config")]
    pub config: Option<PathBuf>,
    /// AMCT simple configuration (.cfg, AMCTConfig in protobuf text format).
    #[arg(long)]
    pub simple_config: Option<PathBuf>,
    /// Samples per batch (default: the model's batch size, else 1).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Calibration batches (default: the config's, else all the data).
    #[arg(long)]
    pub batch_num: Option<usize>,
    /// Layers to keep in float, separated by ','.
    #[arg(long, value_delimiter = ',')]
    pub skip_layers: Vec<String>,
    /// Asymmetric activations (scale + offset) unless a layer says otherwise.
    #[arg(long)]
    pub activation_offset: Option<bool>,
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
}

/// The quantizable layers (name, op type) of a model, as calibration will name them.
fn layer_names(model: &ModelProto) -> Result<Vec<(String, String)>, Failure> {
    let mut m = model.clone();
    prepare(&mut m, false, &[])?;
    Ok(discover(m.graph.as_ref().expect("graph"))?
        .0
        .into_iter()
        .map(|l| (l.name, l.op_type))
        .collect())
}

/// Runs `config`.
pub fn execute_config(args: &ConfigArgs) -> Result<(), Failure> {
    let model = load_model(&args.model)?;
    let cfg = QuantConfig::default_for(&layer_names(&model)?);
    let text = serde_json::to_string_pretty(&cfg.to_json()).context("serializing the config")?;
    crate::fsutil::write_atomic(&args.output, text.as_bytes())
        .map_err(|e| usage(format!("cannot write {}: {e}", args.output.display())))?;
    println!(
        "wrote {} ({} layers)",
        args.output.display(),
        cfg.layers.len()
    );
    Ok(())
}

fn parse_shapes(text: &str) -> Result<Vec<(String, Vec<usize>)>, Failure> {
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

/// The first axis of the first input, when the model fixes it.
pub(super) fn declared_batch(model: &ModelProto) -> Option<usize> {
    let g = model.graph.as_ref()?;
    let name = feedable_input_names(model).into_iter().next()?;
    let v = g.input.iter().find(|v| v.name() == name)?;
    match crate::onnx::ValueSpec::from_proto(v).shape?.first()? {
        Dim::Fixed(n) if *n > 0 => Some(*n),
        _ => None,
    }
}

pub(super) fn output_paths(prefix: &Path) -> [PathBuf; 4] {
    let p = prefix.display().to_string();
    [
        PathBuf::from(format!("{p}_deploy_model.onnx")),
        PathBuf::from(format!("{p}_fake_quant_model.onnx")),
        PathBuf::from(format!("{p}_record.txt")),
        PathBuf::from(format!("{p}_quant_report.json")),
    ]
}

/// Fails early, before any work, when the output folder cannot take files.
fn check_writable(prefix: &Path) -> Result<(), Failure> {
    let dir = match prefix.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| {
        usage(format!(
            "cannot create output folder {}: {e}",
            dir.display()
        ))
    })?;
    tempfile::Builder::new()
        .prefix(".ascend-quant-probe-")
        .tempfile_in(&dir)
        .map_err(|e| {
            usage(format!(
                "output folder {} is not writable: {e}; choose another --output",
                dir.display()
            ))
        })?;
    Ok(())
}

/// Writes a run's models and text files, staged and renamed together so a
/// failure leaves nothing behind. A model too large for one protobuf file is
/// saved first, with its large tensors in a `<file>.data` beside it.
pub(super) fn write_outputs(
    models: &[(&Path, &ModelProto)],
    texts: &[(&Path, &[u8])],
    prefix: &Path,
) -> Result<(), Failure> {
    let fail = |e: String| {
        usage(format!(
            "writing the outputs under {} failed: {e}",
            prefix.display()
        ))
    };
    let limit = crate::onnx::SaveOptions::default().inline_limit;
    let mut staged: Vec<(&Path, Vec<u8>)> = Vec::new();
    for (path, model) in models {
        if model.encoded_len() > limit {
            crate::onnx::save_model(model, path).map_err(|e| fail(e.to_string()))?;
        } else {
            staged.push((path, model.encode_to_vec()));
        }
    }
    let mut all: Vec<(&Path, &[u8])> = staged.iter().map(|(p, b)| (*p, b.as_slice())).collect();
    all.extend(texts.iter().copied());
    write_all_atomic(&all).map_err(|e| fail(format!("{e}; nothing was written")))
}

/// What a calibration needs, gathered from the arguments.
pub(super) struct RunInputs {
    /// The float model.
    pub model: ModelProto,
    /// The effective configuration (file, then command-line overrides).
    pub config: QuantConfig,
    /// The calibration data.
    pub data: Dataset,
    /// Samples per batch.
    pub batch_size: usize,
    /// The batch size the model declares, if fixed.
    pub declared: Option<usize>,
}

/// Loads the model, config and data the calibration arguments name.
pub(super) fn gather(args: &CalibrateArgs) -> Result<RunInputs, Failure> {
    check_writable(&args.output)?;
    let model = load_model(&args.model)?;
    let names = layer_names(&model)?;
    let mut config = match (&args.config, &args.simple_config) {
        (Some(path), _) => QuantConfig::from_json_file(path, &names)?,
        (None, Some(path)) => crate::quant::simple_config::from_simple_config(path, &names)?,
        (None, None) => QuantConfig::default_for(&names),
    };
    for skip in &args.skip_layers {
        let layer = config
            .layers
            .iter_mut()
            .find(|(n, _)| n == skip)
            .ok_or_else(|| {
                let all: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
                usage(format!(
                    "--skip-layers: '{skip}' is not a quantizable layer; the layers are: {}",
                    all.join(", ")
                ))
            })?;
        layer.1.quant_enable = false;
    }
    if let Some(a) = args.activation_offset {
        config.activation_offset = a;
    }
    let inputs = feedable_input_names(&model);
    let data = match (&args.data_dir, args.data.is_empty()) {
        (Some(dirs), true) => {
            let shapes = parse_shapes(
                args.input_shape
                    .as_deref()
                    .ok_or_else(|| usage("--data-dir needs --input-shape".into()))?,
            )?;
            Dataset::from_bin_dirs(dirs, &args.data_types, &shapes)?
        }
        (None, false) => Dataset::from_specs(&args.data, &inputs)?,
        (Some(_), false) => return Err(usage("give either --data or --data-dir, not both".into())),
        (None, true) => {
            return Err(usage(
                "no calibration data: give --data FILE.npy (or --data-dir)".into(),
            ));
        }
    };
    let declared = declared_batch(&model);
    let batch_size = args.batch_size.unwrap_or(declared.unwrap_or(1)).max(1);
    let available = data.batch_count(batch_size);
    let configured = args.config.is_some() || args.simple_config.is_some();
    config.batch_num = match args.batch_num {
        Some(n) => n,
        None if configured => config.batch_num,
        None => available,
    };
    if config.batch_num == 0 {
        return Err(usage("--batch-num must be at least 1".into()));
    }
    Ok(RunInputs {
        model,
        config,
        data,
        batch_size,
        declared,
    })
}

/// Runs `calibrate`.
pub fn execute(args: &CalibrateArgs) -> Result<(), Failure> {
    let started = Instant::now();
    let RunInputs {
        model,
        config,
        data,
        batch_size,
        declared,
    } = gather(args)?;
    let bar = (!args.quiet).then(|| {
        let b = indicatif::ProgressBar::new(config.batch_num as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "calibrating {bar:30} {pos}/{len} batches {elapsed}",
            )
            .expect("valid template"),
        );
        b
    });
    let progress = |done: usize, _total: usize| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    };
    let (executor, backend_line) =
        select_backend(args.backend, args.acl_lib.as_deref(), &args.output)?;
    if !args.quiet {
        eprintln!("backend: {backend_line}");
    }
    let run = RunSettings {
        batch_size,
        dynamic_batch: declared.is_some_and(|d| d != batch_size),
        progress: &progress,
        similarity_samples: args.similarity_samples,
    };
    let outcome = calibrate(&model, &config, &data, executor.as_ref(), &run)?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let [deploy, fake, record, report_path] = output_paths(&args.output);
    let record_text = crate::quant::record::write_record(&outcome.factors);
    let report = QuantReport {
        model: args.model.display().to_string(),
        outputs: [&deploy, &fake, &record, &report_path]
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        batches: outcome.batches_used,
        batch_size,
        backend: backend_line.clone(),
        similarity_samples: args.similarity_samples.min(data.samples()),
        fused_batch_norms: outcome.preparation.fused.clone(),
        layers: outcome
            .factors
            .iter()
            .map(|f| {
                let lc = config.layer(&f.layer.name).expect("configured");
                LayerReport {
                    name: f.layer.name.clone(),
                    op_type: f.layer.op_type.clone(),
                    act_algo: lc.act_algo.name().into(),
                    asymmetric: config.asymmetric(lc),
                    scale_d: f.act.scale,
                    offset_d: f.act.offset,
                    scale_w: f.scale_w.clone(),
                    cosine: outcome
                        .cosine
                        .get(&f.layer.name)
                        .copied()
                        .unwrap_or(f64::NAN),
                }
            })
            .collect(),
        skipped: outcome
            .candidates
            .iter()
            .filter(|c| !c.quantizable)
            .cloned()
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
        phase_seconds: outcome.timings,
    };
    let report_json = serde_json::to_string_pretty(&report).context("serializing the report")?;
    write_outputs(
        &[(&deploy, &outcome.deploy), (&fake, &outcome.fake_quant)],
        &[
            (&record, record_text.as_bytes()),
            (&report_path, report_json.as_bytes()),
        ],
        &args.output,
    )?;
    if args.json {
        println!("{report_json}");
    }
    if !args.quiet {
        report
            .print_table(&mut std::io::stderr())
            .context("printing the summary")?;
    }
    Ok(())
}
