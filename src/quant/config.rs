//! The quantization configuration: AMCT's JSON layer config, read with a
//! check of every key and range, and written in graph order.

pub(super) use super::config_levels::layer_op;
use super::observe::{ActAlgo, IfmrSettings};
use super::weights::NuqSettings;
use super::weights::adaround::AdaSettings;
use serde_json::{Map, Value, json};
use std::path::Path;

/// Settings of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerConfig {
    /// Whether the layer is quantized.
    pub quant_enable: bool,
    /// Activation bits (8).
    pub act_bits: u32,
    /// The activation calibrator.
    pub act_algo: ActAlgo,
    /// Per-layer override of `activation_offset`.
    pub asymmetric: Option<bool>,
    /// Weight bits (8).
    pub wts_bits: u32,
    /// One weight scale per output channel (Conv, ConvTranspose; Gemm and
    /// MatMul per output column, an ascend-quant extension).
    pub channel_wise: bool,
    /// How the weight's int8 values are chosen.
    pub wts_algo: WtsAlgo,
    /// DMQ balancing strength α in [0.2, 0.8] (`dmq_balancer_param`), if on.
    pub dmq: Option<f32>,
    /// Choose the DMQ strength of a Gemm / MatMul layer from its data
    /// (`dmq_search`, an ascend-quant key; `quant::dmq_search`), `dmq` being
    /// the strength for layers the search does not take.
    pub dmq_search: bool,
}

/// The weight algorithm of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum WtsAlgo {
    /// ARQ: the uniform int8 grid (`arq_quantize`).
    #[default]
    Arq,
    /// NUQ: the ARQ grid reduced to a few levels (`nuq_quantize`).
    Nuq(NuqSettings),
    /// AdaRound: the ARQ scales with learned rounding (`ada_quantize`).
    Ada(AdaSettings),
}

impl LayerConfig {
    /// AMCT's defaults for a layer of this operator type.
    pub fn default_for(op_type: &str) -> LayerConfig {
        LayerConfig {
            quant_enable: true,
            act_bits: 8,
            act_algo: ActAlgo::default(),
            asymmetric: None,
            wts_bits: 8,
            channel_wise: super::layers::channel_wise_by_default(op_type),
            wts_algo: WtsAlgo::Arq,
            dmq: None,
            dmq_search: false,
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    /// Number of calibration batches (`batch_num`); `None`: every batch the
    /// data gives, the same default as without a configuration file.
    pub batch_num: Option<usize>,
    /// Samples per calibration batch the configuration was made with
    /// (`batch_size`, an ascend-quant key, written by `auto` so its
    /// configuration reproduces its run); `None`: `--batch-size`, else the
    /// model's batch.
    pub batch_size: Option<usize>,
    /// Asymmetric activations by default.
    pub activation_offset: bool,
    /// Fold BatchNormalization into the preceding Conv.
    pub do_fusion: bool,
    /// Conv layers whose BatchNormalization is not folded.
    pub skip_fusion_layers: Vec<String>,
    /// Per-layer settings, in graph order.
    pub layers: Vec<(String, LayerConfig)>,
    /// Inputs of data-movement operators (MaxPool, Add) quantized on their
    /// own (`tensor_quantize`).
    pub tensor_quantize: Vec<TensorQuantConfig>,
    /// Correct each layer's int32 bias by its mean output error on the
    /// calibration data (`bias_correction`, an ascend-quant key).
    pub bias_correction: bool,
    /// AMCT's `fakequant_precision_mode: FORCE_FP16_QUANT`: the quant
    /// operators' scale at fp16 precision (`docs/deploy-format.md`).
    pub fp16_quant: bool,
}

/// One tensor quantization: input `input_index` of node `layer_name`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorQuantConfig {
    /// The consuming node.
    pub layer_name: String,
    /// Which of its inputs.
    pub input_index: usize,
    /// The calibrator.
    pub act_algo: ActAlgo,
    /// Overrides `activation_offset`.
    pub asymmetric: Option<bool>,
}

impl TensorQuantConfig {
    /// The record key AMCT uses: `NODE:INPUT_INDEX`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.layer_name, self.input_index)
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file (or "config").
    pub file: String,
    /// What is wrong, naming the key and what is allowed.
    pub message: String,
}

impl ConfigError {
    /// A function making errors about `file`.
    pub fn about(file: &str) -> impl Fn(String) -> ConfigError + '_ {
        move |message| ConfigError {
            file: file.to_string(),
            message,
        }
    }

    /// Reads a configuration file's text, or says why it cannot be read.
    pub fn read(path: &std::path::Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })
    }
}

impl QuantConfig {
    /// The default configuration for these layers (name, op type).
    pub fn default_for(layers: &[(String, String)]) -> QuantConfig {
        QuantConfig {
            batch_num: None,
            batch_size: None,
            activation_offset: true,
            do_fusion: true,
            skip_fusion_layers: Vec::new(),
            layers: layers
                .iter()
                .map(|(n, op)| (n.clone(), LayerConfig::default_for(op)))
                .collect(),
            tensor_quantize: Vec::new(),
            bias_correction: false,
            fp16_quant: false,
        }
    }

    /// The calibration batches to use when the data gives `available`.
    pub fn batches(&self, available: usize) -> usize {
        self.batch_num.unwrap_or(available)
    }

    /// The settings of `layer`, if it is configured.
    pub fn layer(&self, name: &str) -> Option<&LayerConfig> {
        self.layers.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Whether activations of `layer` are asymmetric.
    pub fn asymmetric(&self, layer: &LayerConfig) -> bool {
        layer.asymmetric.unwrap_or(self.activation_offset)
    }

    /// The configuration as AMCT-style JSON.
    pub fn to_json(&self) -> Value {
        let mut top = Map::new();
        top.insert("version".into(), json!(1));
        if let Some(n) = self.batch_num {
            top.insert("batch_num".into(), json!(n));
        }
        if let Some(n) = self.batch_size {
            top.insert("batch_size".into(), json!(n));
        }
        top.insert("activation_offset".into(), json!(self.activation_offset));
        top.insert("do_fusion".into(), json!(self.do_fusion));
        top.insert("skip_fusion_layers".into(), json!(self.skip_fusion_layers));
        if self.bias_correction {
            top.insert("bias_correction".into(), json!(true));
        }
        if self.fp16_quant {
            top.insert(
                "fakequant_precision_mode".into(),
                json!(crate::deploy_format::fp16_quant::FORCE_FP16_QUANT),
            );
        }
        if !self.tensor_quantize.is_empty() {
            let list: Vec<Value> = self
                .tensor_quantize
                .iter()
                .map(|t| {
                    json!({
                        "layer_name": t.layer_name,
                        "input_index": t.input_index,
                        "activation_quant_params": act_json(8, &t.act_algo, t.asymmetric),
                    })
                })
                .collect();
            top.insert("tensor_quantize".into(), Value::Array(list));
        }
        for (name, l) in &self.layers {
            let act = act_json(l.act_bits, &l.act_algo, l.asymmetric);
            let mut layer = json!({
                "quant_enable": l.quant_enable,
                "activation_quant_params": act,
                "weight_quant_params": weight_json(l),
            });
            if let Some(d) = l.dmq {
                layer["dmq_balancer_param"] = json!(d);
            }
            if l.dmq_search {
                layer["dmq_search"] = json!(true);
            }
            top.insert(name.clone(), layer);
        }
        Value::Object(top)
    }

    /// Sets every layer's weight algorithm to NUQ with these settings.
    pub fn set_nuq(&mut self, settings: NuqSettings) {
        for (_, l) in &mut self.layers {
            l.wts_algo = WtsAlgo::Nuq(settings);
        }
    }

    /// Reads a JSON config; `layers` (name, op type) are the model's quantizable layers.
    pub fn from_json_file(
        path: &Path,
        layers: &[(String, String)],
    ) -> Result<QuantConfig, ConfigError> {
        let text = ConfigError::read(path)?;
        QuantConfig::from_json_str(&text, &path.display().to_string(), layers)
    }

    /// Parses a JSON config's text; `file` names it in errors.
    pub fn from_json_str(
        text: &str,
        file: &str,
        layers: &[(String, String)],
    ) -> Result<QuantConfig, ConfigError> {
        let fail = ConfigError::about(file);
        let value: Value =
            serde_json::from_str(text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
        parse(&value, layers).map_err(fail)
    }
}

fn act_json(bits: u32, algo: &ActAlgo, asymmetric: Option<bool>) -> Value {
    let mut act = Map::new();
    act.insert("num_bits".into(), json!(bits));
    act.insert("act_algo".into(), json!(algo.name()));
    if let Some(a) = asymmetric {
        act.insert("asymmetric".into(), json!(a));
    }
    match algo {
        ActAlgo::Ifmr(s) => {
            act.insert("max_percentile".into(), json!(s.max_percentile));
            act.insert("min_percentile".into(), json!(s.min_percentile));
            act.insert("search_range".into(), json!(s.search_range));
            act.insert("search_step".into(), json!(s.search_step));
            if s.extend_below {
                act.insert("extend_search_below".into(), json!(true));
            }
        }
        ActAlgo::Hfmg { num_of_bins } | ActAlgo::Kl { num_of_bins } => {
            act.insert("num_of_bins".into(), json!(num_of_bins));
        }
        ActAlgo::Percentile { percentile } => {
            act.insert("percentile".into(), json!(percentile));
        }
        ActAlgo::Minmax => {}
    }
    Value::Object(act)
}

fn weight_json(l: &LayerConfig) -> Value {
    let mut w = Map::new();
    match l.wts_algo {
        WtsAlgo::Arq => {
            w.insert("wts_algo".into(), json!("arq_quantize"));
        }
        WtsAlgo::Nuq(n) => {
            w.insert("wts_algo".into(), json!("nuq_quantize"));
            w.insert("num_steps".into(), json!(n.num_steps));
            w.insert("num_of_iteration".into(), json!(n.num_of_iteration));
        }
        WtsAlgo::Ada(a) => {
            w.insert("wts_algo".into(), json!("ada_quantize"));
            w.insert("num_iteration".into(), json!(a.num_iteration));
            w.insert("reg_param".into(), json!(a.reg_param));
            w.insert("beta_range".into(), json!(a.beta_range));
            w.insert("warm_start".into(), json!(a.warm_start));
        }
    }
    w.insert("channel_wise".into(), json!(l.channel_wise));
    w.insert("num_bits".into(), json!(l.wts_bits));
    Value::Object(w)
}

/// NUQ settings checked against AMCT's ranges (`num_steps` 16 or 32,
/// `num_of_iteration` 0 to 5); `ctx` names the place in errors.
pub fn nuq_settings(num_steps: u64, num_of_iteration: u64, ctx: &str) -> Parse<NuqSettings> {
    if !(num_steps == 16 || num_steps == 32) {
        return Err(format!(
            "{ctx}: 'num_steps' = {num_steps}; allowed: 16 or 32"
        ));
    }
    if num_of_iteration > 5 {
        return Err(format!(
            "{ctx}: 'num_of_iteration' = {num_of_iteration}; allowed: 0 to 5"
        ));
    }
    Ok(NuqSettings {
        num_steps: num_steps as usize,
        num_of_iteration: num_of_iteration as u32,
    })
}

/// AdaRound settings from checked values.
pub fn ada_settings(
    num_iteration: usize,
    reg_param: f32,
    beta_range: [f32; 2],
    warm_start: f32,
) -> AdaSettings {
    AdaSettings {
        num_iteration,
        reg_param,
        beta_range,
        warm_start,
    }
}

pub(super) type Parse<T> = Result<T, String>;

/// A `channel_wise` value, refused for layers without output channels.
pub(super) fn get_channel_wise(v: &Value, name: &str, op: &str, ctx: &str) -> Parse<bool> {
    let on = get_bool(v, "channel_wise")?;
    if on && !super::layers::has_weight_channels(op) {
        return Err(format!(
            "{ctx}: 'channel_wise' true is only allowed for Conv, ConvTranspose, Gemm and MatMul, and '{name}' is {op}"
        ));
    }
    Ok(on)
}

pub(super) fn get_bool(v: &Value, key: &str) -> Parse<bool> {
    v.as_bool()
        .ok_or_else(|| format!("'{key}' must be true or false, got {v}"))
}

pub(super) fn get_num(v: &Value, key: &str, lo: f64, hi: f64, range: &str) -> Parse<f64> {
    let x = v
        .as_f64()
        .ok_or_else(|| format!("'{key}' must be a number, got {v}"))?;
    if !(lo..=hi).contains(&x) {
        return Err(format!("'{key}' = {x} is out of range; allowed: {range}"));
    }
    Ok(x)
}

pub(super) fn check_keys(obj: &Map<String, Value>, allowed: &[&str], context: &str) -> Parse<()> {
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(format!(
                "unknown key '{k}' in {context}; allowed keys: {}",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

fn parse(value: &Value, layers: &[(String, String)]) -> Parse<QuantConfig> {
    let obj = value
        .as_object()
        .ok_or("the config must be a JSON object")?;
    let mut cfg = QuantConfig::default_for(&[]);
    for (key, v) in obj {
        match key.as_str() {
            "version" => {
                if v.as_u64() != Some(1) {
                    return Err(format!("'version' must be 1, got {v}"));
                }
            }
            "batch_num" => {
                cfg.batch_num = Some(get_num(v, key, 1.0, 1e9, "an integer >= 1")? as usize)
            }
            "batch_size" => {
                cfg.batch_size = Some(get_num(v, key, 1.0, 1e9, "an integer >= 1")? as usize)
            }
            "activation_offset" => cfg.activation_offset = get_bool(v, key)?,
            "fakequant_precision_mode" => {
                super::fp16_quant::read_json_mode(v)?;
                cfg.fp16_quant = true;
            }
            "do_fusion" => cfg.do_fusion = get_bool(v, key)?,
            "tensor_quantize" => {
                let list = v
                    .as_array()
                    .ok_or("'tensor_quantize' must be a list of {layer_name, input_index, activation_quant_params}")?;
                for (i, t) in list.iter().enumerate() {
                    cfg.tensor_quantize.push(parse_tensor_quant(t, i)?);
                }
            }
            "bias_correction" => cfg.bias_correction = get_bool(v, key)?,
            "skip_fusion_layers" => {
                let list = v
                    .as_array()
                    .ok_or("'skip_fusion_layers' must be a list of layer names")?;
                cfg.skip_fusion_layers = list
                    .iter()
                    .map(|s| {
                        s.as_str()
                            .map(String::from)
                            .ok_or("'skip_fusion_layers' must hold strings")
                    })
                    .collect::<Result<_, _>>()?;
            }
            name => {
                let op = layer_op(layers, name)?;
                cfg.layers
                    .push((name.to_string(), parse_layer(v, name, op)?));
            }
        }
    }
    Ok(cfg)
}

fn parse_act(a: &Value, ctx_name: &str) -> Parse<(ActAlgo, Option<bool>)> {
    let a = a
        .as_object()
        .ok_or_else(|| format!("{ctx_name}: activation_quant_params must be an object"))?;
    let mut asymmetric = None;
    let algo = a
        .get("act_algo")
        .map(|x| x.as_str().unwrap_or("?"))
        .unwrap_or("ifmr");
    let ctx = format!("{ctx_name} activation_quant_params ({algo})");
    let common = ["num_bits", "act_algo", "asymmetric"];
    let extra: &[&str] = match algo {
        "ifmr" => &[
            "max_percentile",
            "min_percentile",
            "search_range",
            "search_step",
            "extend_search_below",
        ],
        "hfmg" | "kl" => &["num_of_bins"],
        "percentile" => &["percentile"],
        "minmax" => &[],
        other => {
            return Err(format!(
                "{ctx}: act_algo '{other}' is unknown; allowed: ifmr, hfmg, minmax, percentile, kl"
            ));
        }
    };
    let allowed: Vec<&str> = common.iter().chain(extra).copied().collect();
    check_keys(a, &allowed, &ctx)?;
    if let Some(b) = a.get("num_bits")
        && b.as_u64() != Some(8)
    {
        return Err(format!(
            "{ctx}: 'num_bits' = {b} is not supported; allowed: 8"
        ));
    }
    if let Some(s) = a.get("asymmetric") {
        asymmetric = Some(get_bool(s, "asymmetric")?);
    }
    let num = |k: &str, lo: f64, hi: f64, range: &str, default: f64| -> Parse<f64> {
        a.get(k)
            .map(|x| get_num(x, k, lo, hi, range).map_err(|e| format!("{ctx}: {e}")))
            .unwrap_or(Ok(default))
    };
    let act_algo = match algo {
        "ifmr" => {
            let d = IfmrSettings::default();
            let range = match a.get("search_range") {
                None => d.search_range,
                Some(r) => {
                    let r: Vec<f64> = r
                        .as_array()
                        .map(|v| v.iter().filter_map(Value::as_f64).collect())
                        .unwrap_or_default();
                    if r.len() != 2 || !(r[0] > 0.0 && r[0] < r[1]) {
                        return Err(format!(
                            "{ctx}: 'search_range' must be [start, end] with 0 < start < end"
                        ));
                    }
                    [r[0] as f32, r[1] as f32]
                }
            };
            let step = num(
                "search_step",
                1e-6,
                f64::from(range[1] - range[0]),
                "(0, end - start]",
                f64::from(d.search_step),
            )?;
            ActAlgo::Ifmr(IfmrSettings {
                max_percentile: num(
                    "max_percentile",
                    0.5 + 1e-12,
                    1.0,
                    "(0.5, 1]",
                    d.max_percentile,
                )?,
                min_percentile: num(
                    "min_percentile",
                    0.5 + 1e-12,
                    1.0,
                    "(0.5, 1]",
                    d.min_percentile,
                )?,
                search_range: range,
                search_step: step as f32,
                extend_below: match a.get("extend_search_below") {
                    None => false,
                    Some(v) => {
                        get_bool(v, "extend_search_below").map_err(|e| format!("{ctx}: {e}"))?
                    }
                },
            })
        }
        "hfmg" => {
            let bins = num(
                "num_of_bins",
                1024.0,
                8192.0,
                "1024, 2048, 4096 or 8192",
                4096.0,
            )? as usize;
            if ![1024, 2048, 4096, 8192].contains(&bins) {
                return Err(format!(
                    "{ctx}: 'num_of_bins' = {bins}; allowed: 1024, 2048, 4096 or 8192"
                ));
            }
            ActAlgo::Hfmg { num_of_bins: bins }
        }
        "kl" => ActAlgo::Kl {
            num_of_bins: num("num_of_bins", 256.0, 65536.0, "256 to 65536", 2048.0)? as usize,
        },
        "percentile" => ActAlgo::Percentile {
            percentile: num("percentile", 50.0, 100.0, "50 to 100 (percent)", 99.999)?,
        },
        _ => ActAlgo::Minmax,
    };
    Ok((act_algo, asymmetric))
}

fn parse_tensor_quant(v: &Value, i: usize) -> Parse<TensorQuantConfig> {
    let ctx = format!("tensor_quantize[{i}]");
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{ctx} must be an object"))?;
    check_keys(
        obj,
        &["layer_name", "input_index", "activation_quant_params"],
        &ctx,
    )?;
    let layer_name = obj
        .get("layer_name")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{ctx}: 'layer_name' (a string) is required"))?
        .to_string();
    let input_index = obj
        .get("input_index")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("{ctx}: 'input_index' (an integer >= 0) is required"))?
        as usize;
    let (act_algo, asymmetric) = match obj.get("activation_quant_params") {
        Some(a) => parse_act(a, &format!("{ctx} ('{layer_name}')"))?,
        None => (ActAlgo::default(), None),
    };
    Ok(TensorQuantConfig {
        layer_name,
        input_index,
        act_algo,
        asymmetric,
    })
}

fn parse_layer(v: &Value, name: &str, op: &str) -> Parse<LayerConfig> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("layer '{name}' must be an object"))?;
    check_keys(
        obj,
        &[
            "quant_enable",
            "activation_quant_params",
            "weight_quant_params",
            "dmq_balancer_param",
            "dmq_search",
        ],
        &format!("layer '{name}'"),
    )?;
    let mut l = LayerConfig::default_for(op);
    if let Some(q) = obj.get("quant_enable") {
        l.quant_enable = get_bool(q, "quant_enable")?;
    }
    if let Some(d) = obj.get("dmq_balancer_param") {
        if !super::layers::has_weight(op) {
            return Err(format!(
                "layer '{name}': 'dmq_balancer_param' needs a layer with a weight, and '{name}' is {op}"
            ));
        }
        l.dmq = Some(get_num(d, "dmq_balancer_param", 0.2, 0.8, "0.2 to 0.8")? as f32);
    }
    if let Some(v) = obj.get("dmq_search") {
        l.dmq_search = get_bool(v, "dmq_search")?;
        if l.dmq_search && l.dmq.is_none() {
            return Err(format!(
                "layer '{name}': 'dmq_search' true needs 'dmq_balancer_param' (the strength where the search does not apply)"
            ));
        }
    }
    if let Some(a) = obj.get("activation_quant_params") {
        let (algo, asymmetric) = parse_act(a, &format!("layer '{name}'"))?;
        l.act_algo = algo;
        l.asymmetric = asymmetric;
    }
    if let Some(w) = obj.get("weight_quant_params") {
        let w = w
            .as_object()
            .ok_or_else(|| format!("layer '{name}': weight_quant_params must be an object"))?;
        let ctx = format!("layer '{name}' weight_quant_params");
        let algo = w.get("wts_algo").map(|a| a.as_str().unwrap_or("?"));
        match algo {
            None | Some("arq_quantize") => {
                check_keys(w, &["wts_algo", "channel_wise", "num_bits"], &ctx)?;
            }
            Some("nuq_quantize") => {
                check_keys(
                    w,
                    &[
                        "wts_algo",
                        "channel_wise",
                        "num_bits",
                        "num_steps",
                        "num_of_iteration",
                    ],
                    &ctx,
                )?;
                let int = |k: &str, default: u64| -> Parse<u64> {
                    match w.get(k) {
                        None => Ok(default),
                        Some(v) => v
                            .as_u64()
                            .ok_or_else(|| format!("{ctx}: '{k}' must be an integer, got {v}")),
                    }
                };
                let d = NuqSettings::default();
                l.wts_algo = WtsAlgo::Nuq(nuq_settings(
                    int("num_steps", d.num_steps as u64)?,
                    int("num_of_iteration", u64::from(d.num_of_iteration))?,
                    &ctx,
                )?);
            }
            Some("ada_quantize") => {
                check_keys(
                    w,
                    &[
                        "wts_algo",
                        "channel_wise",
                        "num_bits",
                        "num_iteration",
                        "reg_param",
                        "beta_range",
                        "warm_start",
                    ],
                    &ctx,
                )?;
                let d = AdaSettings::default();
                let num = |k: &str, lo: f64, hi: f64, range: &str, default: f64| -> Parse<f64> {
                    w.get(k)
                        .map(|x| get_num(x, k, lo, hi, range).map_err(|e| format!("{ctx}: {e}")))
                        .unwrap_or(Ok(default))
                };
                let beta_range = match w.get("beta_range") {
                    None => d.beta_range,
                    Some(r) => {
                        let r: Vec<f64> = r
                            .as_array()
                            .map(|v| v.iter().filter_map(Value::as_f64).collect())
                            .unwrap_or_default();
                        if r.len() != 2 || !(r[0] > r[1] && r[1] > 0.0) {
                            return Err(format!(
                                "{ctx}: 'beta_range' must be [start, end] with start > end > 0"
                            ));
                        }
                        [r[0] as f32, r[1] as f32]
                    }
                };
                l.wts_algo = WtsAlgo::Ada(ada_settings(
                    num(
                        "num_iteration",
                        1.0,
                        1e6,
                        "1 to 1000000",
                        d.num_iteration as f64,
                    )? as usize,
                    num(
                        "reg_param",
                        1e-9,
                        1.0 - 1e-9,
                        "(0, 1)",
                        f64::from(d.reg_param),
                    )? as f32,
                    beta_range,
                    num(
                        "warm_start",
                        0.0,
                        1.0 - 1e-9,
                        "[0, 1)",
                        f64::from(d.warm_start),
                    )? as f32,
                ));
            }
            Some(_) => {
                return Err(format!(
                    "{ctx}: 'wts_algo' = {} is not supported; allowed: arq_quantize, nuq_quantize, ada_quantize",
                    w["wts_algo"]
                ));
            }
        }
        if let Some(b) = w.get("num_bits")
            && b.as_u64() != Some(8)
        {
            return Err(format!(
                "{ctx}: 'num_bits' = {b} is not supported; allowed: 8"
            ));
        }
        if let Some(c) = w.get("channel_wise") {
            l.channel_wise = get_channel_wise(c, name, op, &ctx)?;
        }
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<(String, String)> {
        vec![
            ("conv1".into(), "Conv".into()),
            ("fc".into(), "Gemm".into()),
        ]
    }

    fn parse_str(s: &str) -> Result<QuantConfig, String> {
        parse(&serde_json::from_str(s).unwrap(), &layers())
    }

    #[test]
    fn written_config_reads_back_equal() {
        let mut cfg = QuantConfig::default_for(&layers());
        cfg.layers[1].1.act_algo = ActAlgo::Hfmg { num_of_bins: 2048 };
        cfg.layers[1].1.asymmetric = Some(false);
        cfg.batch_num = Some(4);
        cfg.layers[0].1.wts_algo = WtsAlgo::Nuq(NuqSettings {
            num_steps: 16,
            num_of_iteration: 3,
        });
        cfg.layers[1].1.wts_algo = WtsAlgo::Ada(ada_settings(500, 0.05, [16.0, 3.0], 0.3));
        cfg.layers[1].1.dmq = Some(0.4);
        cfg.layers[1].1.dmq_search = true;
        cfg.layers[1].1.channel_wise = true;
        cfg.bias_correction = true;
        cfg.layers[0].1.act_algo = ActAlgo::Ifmr(IfmrSettings {
            extend_below: true,
            ..Default::default()
        });
        let back = parse(&cfg.to_json(), &layers()).unwrap();
        assert_eq!(back, cfg);
        let e = parse_str(r#"{"conv1": {"activation_quant_params": {"extend_search_below": 1}}}"#)
            .unwrap_err();
        assert!(
            e.contains("extend_search_below") && e.contains("true or false"),
            "{e}"
        );
        let e = parse_str(
            r#"{"fc": {"weight_quant_params": {"wts_algo": "ada_quantize", "beta_range": [2, 20]}}}"#,
        )
        .unwrap_err();
        assert!(e.contains("beta_range") && e.contains("start > end"), "{e}");
        let e = parse_str(r#"{"fc": {"dmq_balancer_param": 0.9}}"#).unwrap_err();
        assert!(
            e.contains("dmq_balancer_param") && e.contains("0.2 to 0.8"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_key_and_the_range() {
        let e = parse_str(r#"{"conv1": {"quant_enable": true, "bogus": 1}}"#).unwrap_err();
        assert!(e.contains("'bogus'") && e.contains("allowed keys"), "{e}");
        let e = parse_str(
            r#"{"conv1": {"activation_quant_params": {"act_algo": "hfmg", "num_of_bins": 3000}}}"#,
        )
        .unwrap_err();
        assert!(
            e.contains("num_of_bins") && e.contains("1024, 2048, 4096 or 8192"),
            "{e}"
        );
        let e = parse_str(r#"{"conv1": {"activation_quant_params": {"max_percentile": 0.3}}}"#)
            .unwrap_err();
        assert!(
            e.contains("max_percentile") && e.contains("(0.5, 1]"),
            "{e}"
        );
        let e = parse_str(r#"{"nope": {}}"#).unwrap_err();
        assert!(e.contains("'nope'") && e.contains("conv1, fc"), "{e}");
        // Gemm per output column: an ascend-quant extension, off by default.
        let c = parse_str(r#"{"fc": {"weight_quant_params": {"channel_wise": true}}}"#).unwrap();
        let e = parse_str(r#"{"fc": {"dmq_search": true}}"#).unwrap_err();
        assert!(
            e.contains("dmq_search") && e.contains("dmq_balancer_param"),
            "{e}"
        );
        assert!(c.layer("fc").unwrap().channel_wise);
        assert!(
            !QuantConfig::default_for(&layers())
                .layer("fc")
                .unwrap()
                .channel_wise
        );
        let e = parse_str(
            r#"{"conv1": {"weight_quant_params": {"wts_algo": "nuq_quantize", "num_steps": 8}}}"#,
        )
        .unwrap_err();
        assert!(e.contains("num_steps") && e.contains("16 or 32"), "{e}");
        let e = parse_str(
            r#"{"conv1": {"weight_quant_params": {"wts_algo": "nuq_quantize", "num_of_iteration": 6}}}"#,
        )
        .unwrap_err();
        assert!(
            e.contains("num_of_iteration") && e.contains("0 to 5"),
            "{e}"
        );
        let e = parse_str(r#"{"conv1": {"weight_quant_params": {"num_steps": 16}}}"#).unwrap_err();
        assert!(
            e.contains("'num_steps'") && e.contains("allowed keys"),
            "{e}"
        );
        let e = parse_str(r#"{"batch_num": 0}"#).unwrap_err();
        assert!(e.contains("batch_num") && e.contains(">= 1"), "{e}");
    }
}
