//! What a calibration needs, gathered from the options: the model, the
//! effective configuration, the data and the batch size.

use super::error::PipelineError;
use super::outputs::{check_writable, declared_batch};
use crate::data::{Dataset, ImageSource, TextSource};
use crate::onnx::{ModelProto, load_model};
use crate::quant::config::{QuantConfig, TensorQuantConfig};
use crate::quant::layers::discover;
use crate::quant::prepare::prepare;
use crate::sim::feedable_input_names;
use std::path::PathBuf;

use super::backend::Backend;

/// Where the calibration data comes from.
#[derive(Clone, Debug)]
pub enum DataSource {
    /// `FILE.npy` (single input), `NAME=FILE.npy` or `FILE.npz`; axis 0 counts samples.
    Files(Vec<String>),
    /// AMCT's raw layout: one folder per input (`;`-separated), each `.bin`
    /// file one batch of the given element types (`;`-separated) and shapes.
    BinFolders {
        /// The folders.
        dirs: String,
        /// The element types, one per input.
        types: String,
        /// (input name, batch shape) per input.
        shapes: Vec<(String, Vec<usize>)>,
    },
    /// A folder of JPEG / PNG images for a model with one input.
    Images(ImageSource),
    /// Sentences, tokenized for a text model's inputs.
    Texts(TextSource),
}

/// The ways to give data, for messages.
pub const DATA_OPTIONS: &str = "--data FILE.npy (or NAME=FILE.npy, FILE.npz), --data-dir DIR (AMCT .bin batches), --images DIR or --texts FILE";

impl DataSource {
    /// Opens the data for `model`.
    pub fn open(&self, model: &ModelProto) -> Result<Dataset, PipelineError> {
        let inputs = feedable_input_names(model);
        let inputs = inputs.as_slice();
        Ok(match self {
            DataSource::Images(source) => open_images(source, model)?,
            DataSource::Texts(source) => open_texts(source, model)?,
            DataSource::BinFolders {
                dirs,
                types,
                shapes,
            } => Dataset::from_bin_dirs(dirs, types, shapes)?,
            DataSource::Files(files) if files.is_empty() => {
                return Err(PipelineError::Usage(format!(
                    "no data: give {DATA_OPTIONS}"
                )));
            }
            DataSource::Files(files) => Dataset::from_specs(files, inputs)?,
        })
    }
}

/// A folder of images as the data of `model`, whose (single) input's
/// shape gives the preprocessing's defaults.
pub fn open_images(source: &ImageSource, model: &ModelProto) -> Result<Dataset, PipelineError> {
    let inputs = crate::sim::feedable_inputs(model);
    let names: Vec<String> = inputs.iter().map(|s| s.name.clone()).collect();
    let dims: Option<Vec<Option<usize>>> = inputs.first().and_then(|s| {
        s.shape.as_ref().map(|d| {
            d.iter()
                .map(|d| match d {
                    crate::onnx::Dim::Fixed(n) => Some(*n),
                    _ => None,
                })
                .collect()
        })
    });
    Ok(Dataset::from_images(
        &source.dir,
        &source.prep,
        source.skip_bad,
        &names,
        dims.as_deref(),
    )?)
}

/// Sentences as the data of `model`: each input takes the token ids, the
/// attention mask or the token types by its name, `--max-length` tokens
/// (default: the inputs' fixed sequence length, else 128).
pub fn open_texts(source: &TextSource, model: &ModelProto) -> Result<Dataset, PipelineError> {
    let inputs = crate::sim::feedable_inputs(model);
    let fixed_length = inputs.iter().find_map(|s| match s.shape.as_deref() {
        Some([_, crate::onnx::Dim::Fixed(n), ..]) => Some(*n),
        _ => None,
    });
    let max_length = source
        .max_length
        .or(fixed_length)
        .unwrap_or(crate::data::texts::DEFAULT_MAX_LENGTH);
    let typed: Vec<(String, Option<i32>)> = inputs
        .iter()
        .map(|s| (s.name.clone(), s.elem_type))
        .collect();
    Ok(Dataset::from_texts(source, max_length, &typed)?)
}

/// The evaluation data of `auto` and `qat`: data files, an image folder or
/// sentences (one of them); `None` when none is given.
pub fn open_eval(
    files: &[String],
    images: Option<&ImageSource>,
    texts: Option<&TextSource>,
    model: &ModelProto,
) -> Result<Option<Dataset>, PipelineError> {
    let given = usize::from(!files.is_empty())
        + usize::from(images.is_some())
        + usize::from(texts.is_some());
    if given > 1 {
        return Err(PipelineError::Usage(
            "give one of --eval-data, --eval-images or --eval-texts, not several".into(),
        ));
    }
    if let Some(source) = texts {
        return Ok(Some(open_texts(source, model)?));
    }
    match (files.is_empty(), images) {
        (false, Some(_)) => unreachable!("refused above"),
        (_, Some(source)) => Ok(Some(open_images(source, model)?)),
        (false, None) => Ok(Some(Dataset::from_specs(
            files,
            &feedable_input_names(model),
        )?)),
        (true, None) => Ok(None),
    }
}

/// Where the quantization configuration comes from.
#[derive(Clone, Debug, Default)]
pub enum ConfigSource {
    /// Every quantizable layer with the defaults.
    #[default]
    Default,
    /// An AMCT JSON configuration.
    Json(PathBuf),
    /// An AMCT simple configuration (`.cfg`).
    Simple(PathBuf),
}

/// Everything a calibration run takes.
#[derive(Clone, Debug)]
pub struct CalibrateOptions {
    /// The float ONNX model.
    pub model: PathBuf,
    /// The calibration data.
    pub data: DataSource,
    /// The configuration.
    pub config: ConfigSource,
    /// Samples per batch (default: the config's `batch_size`, else the model's batch size, else 1).
    pub batch_size: Option<usize>,
    /// Calibration batches (default: the config's, else all the data).
    pub batch_num: Option<usize>,
    /// Layers kept in float.
    pub skip_layers: Vec<String>,
    /// Asymmetric activations unless a layer says otherwise (overrides the config).
    pub activation_offset: Option<bool>,
    /// Where calibration runs.
    pub backend: Backend,
    /// The AscendCL library or its folder.
    pub acl_lib: Option<PathBuf>,
    /// Output prefix: `PREFIX_deploy_model.onnx` and so on.
    pub output: PathBuf,
    /// Calibration samples on which each layer's similarity is measured (0 skips it).
    pub similarity_samples: usize,
    /// Inputs to tensor-quantize, `NODE` (every computed input) or
    /// `NODE:INPUT_INDEX`, added to the configuration's `tensor_quantize`.
    pub tensor_quantize: Vec<String>,
    /// Correct biases by their mean output error (adds to the configuration's `bias_correction`).
    pub bias_correction: bool,
    /// FORCE_FP16_QUANT (adds to the configuration's `fakequant_precision_mode`).
    pub fp16_quant: bool,
    /// The accuracy recipe (`--optimize`, see [`apply_optimize`]).
    pub optimize: bool,
    /// Take every factor from this record file instead of calibrating
    /// (AMCT's `convert_model`); data is then optional.
    pub record: Option<PathBuf>,
    /// Also write a self-contained HTML page about the calibration here.
    pub html: Option<PathBuf>,
}

impl CalibrateOptions {
    /// Options with the defaults for everything but the model, data files and output prefix.
    pub fn new(model: PathBuf, data: Vec<String>, output: PathBuf) -> CalibrateOptions {
        CalibrateOptions {
            model,
            data: DataSource::Files(data),
            config: ConfigSource::Default,
            batch_size: None,
            batch_num: None,
            skip_layers: Vec::new(),
            activation_offset: None,
            backend: Backend::Auto,
            acl_lib: None,
            output,
            similarity_samples: 8,
            tensor_quantize: Vec::new(),
            bias_correction: false,
            fp16_quant: false,
            optimize: false,
            record: None,
            html: None,
        }
    }
}

/// The quantizable layers (name, op type) of a model, as calibration names them.
pub fn layer_names(model: &ModelProto) -> Result<Vec<(String, String)>, PipelineError> {
    let mut m = model.clone();
    prepare(&mut m, false, &[])?;
    let graph = crate::onnx::graph_of(&m, "the model")?;
    Ok(discover(graph)?
        .0
        .into_iter()
        .map(|l| (l.name, l.op_type))
        .collect())
}

/// What a calibration needs, gathered from the options.
pub struct RunInputs {
    /// The float model.
    pub model: ModelProto,
    /// The effective configuration (file, then option overrides).
    pub config: QuantConfig,
    /// The calibration data.
    pub data: Dataset,
    /// Samples per batch.
    pub batch_size: usize,
    /// The batch size the model declares, if fixed.
    pub declared: Option<usize>,
}

impl RunInputs {
    /// Whether batches of the chosen size differ from what the model declares.
    pub fn dynamic_batch(&self) -> bool {
        self.declared.is_some_and(|d| d != self.batch_size)
    }
}

/// Samples per batch: `--batch-size`, else the configuration's `batch_size`,
/// else the batch the model declares, else 1; an error for 0.
pub fn batch_size(
    opts: &CalibrateOptions,
    config: &QuantConfig,
    declared: Option<usize>,
) -> Result<usize, PipelineError> {
    match opts.batch_size.or(config.batch_size) {
        Some(0) => Err(PipelineError::Usage(
            "--batch-size must be at least 1".into(),
        )),
        chosen => Ok(chosen.unwrap_or(declared.unwrap_or(1))),
    }
}

/// Loads the model, configuration and data the options name; fails before
/// any work when the output folder cannot take files.
pub fn gather(opts: &CalibrateOptions) -> Result<RunInputs, PipelineError> {
    check_writable(&opts.output)?;
    if let Some(page) = &opts.html {
        check_writable(page)?;
    }
    let model = load_model(&opts.model)?;
    let mut config = read_config(opts, &model)?;
    if let Some(a) = opts.activation_offset {
        config.activation_offset = a;
    }
    if matches!(&opts.data, DataSource::Files(f) if f.is_empty()) {
        return Err(PipelineError::Usage(format!(
            "no calibration data: give {DATA_OPTIONS}; or take every factor from an AMCT record with --record FILE"
        )));
    }
    let data = opts.data.open(&model)?;
    let declared = declared_batch(&model);
    if opts.batch_num == Some(0) {
        return Err(PipelineError::Usage(
            "--batch-num must be at least 1".into(),
        ));
    }
    let batch_size = batch_size(opts, &config, declared)?;
    config.batch_size = Some(batch_size);
    let available = data.batch_count(batch_size);
    config.batch_num = Some(opts.batch_num.unwrap_or(config.batches(available)));
    Ok(RunInputs {
        model,
        config,
        data,
        batch_size,
        declared,
    })
}

/// The configuration the options name, with `skip_layers` applied.
pub fn read_config(
    opts: &CalibrateOptions,
    model: &ModelProto,
) -> Result<QuantConfig, PipelineError> {
    let names = layer_names(model)?;
    let mut config = match &opts.config {
        ConfigSource::Json(path) => QuantConfig::from_json_file(path, &names)?,
        ConfigSource::Simple(path) => {
            crate::quant::simple_config::from_simple_config(path, &names)?
        }
        ConfigSource::Default => QuantConfig::default_for(&names),
    };
    for skip in &opts.skip_layers {
        let layer = config
            .layers
            .iter_mut()
            .find(|(n, _)| n == skip)
            .ok_or_else(|| {
                let all: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
                PipelineError::Usage(format!(
                    "--skip-layers: '{skip}' is not a quantizable layer; the layers are: {}",
                    all.join(", ")
                ))
            })?;
        layer.1.quant_enable = false;
    }
    config.bias_correction |= opts.bias_correction;
    config.fp16_quant |= opts.fp16_quant;
    for spec in &opts.tensor_quantize {
        config.tensor_quantize.extend(tensor_targets(model, spec));
    }
    if opts.optimize {
        apply_optimize(&mut config, &names);
    }
    Ok(config)
}

/// DMQ strength `--optimize` gives every layer that has none.
pub const OPTIMIZE_DMQ: f32 = 0.5;

/// `--optimize`: the recipe the error analysis of MobileNetV2 chose
/// (`docs/algorithms.md`, Accuracy recipe): DMQ balancing at α = 0.5 on every
/// layer with a weight (a layer's own `dmq_balancer_param` is kept), IFMR
/// searching below its range where the error keeps falling, then bias
/// correction.
pub fn apply_optimize(config: &mut QuantConfig, layers: &[(String, String)]) {
    config.bias_correction = true;
    let algos = config
        .layers
        .iter_mut()
        .map(|(_, l)| &mut l.act_algo)
        .chain(config.tensor_quantize.iter_mut().map(|t| &mut t.act_algo));
    for algo in algos {
        if let crate::quant::observe::ActAlgo::Ifmr(s) = algo {
            s.extend_below = true;
        }
    }
    for (name, l) in &mut config.layers {
        let op = layers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, op)| op.as_str());
        let weighted = op.is_some_and(crate::quant::layers::has_weight);
        if weighted && l.dmq.is_none() && l.wts_algo == crate::quant::config::WtsAlgo::Arq {
            l.dmq = Some(OPTIMIZE_DMQ);
            // Gemm / MatMul: the strength chosen per layer from its data.
            l.dmq_search = matches!(op, Some("Gemm" | "MatMul"));
        }
        // Gemm / MatMul weights one scale per output column (AMCT: per tensor).
        if op.is_some_and(crate::quant::layers::has_weight_channels) {
            l.channel_wise = true;
        }
    }
}

/// The tensor quantizations one `--tensor-quantize` item asks for: `NODE:I`
/// is input I; `NODE` is every input of the node that is not a constant.
/// Names that do not resolve are left for calibration to report.
fn tensor_targets(model: &ModelProto, spec: &str) -> Vec<TensorQuantConfig> {
    let target = |name: &str, input_index: usize| TensorQuantConfig {
        layer_name: name.to_string(),
        input_index,
        act_algo: Default::default(),
        asymmetric: None,
    };
    if let Some((name, index)) = spec.rsplit_once(':')
        && let Ok(i) = index.parse::<usize>()
    {
        return vec![target(name, i)];
    }
    let graph = model.graph.as_ref();
    let node = graph.and_then(|g| g.node.iter().find(|n| n.name() == spec));
    let computed: Vec<usize> = match (graph, node) {
        (Some(g), Some(n)) => n
            .input
            .iter()
            .enumerate()
            .filter(|(_, i)| !i.is_empty() && crate::onnx::graph::initializer(g, i).is_none())
            .map(|(k, _)| k)
            .collect(),
        _ => vec![0],
    };
    computed.into_iter().map(|i| target(spec, i)).collect()
}
