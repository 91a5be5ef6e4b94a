//! The retrain (quantization-aware training) configuration: AMCT's retrain
//! JSON, read with a check of every key and range, and written in graph
//! order by `ascend-quant config --qat`.
//!
//! ```json
//! {"version": 1, "batch_num": 1,
//!  "conv1": {"retrain_enable": true,
//!            "retrain_data_config": {"algo": "ulq_quantize", "fixed_min": true,
//!                                    "clip_max": 6.0, "clip_min": 0.0, "dst_type": "INT8"},
//!            "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": true,
//!                                      "dst_type": "INT8"}}}
//! ```
//! `clip_max`/`clip_min` are optional (given together): without them the clips
//! start from IFMR over the first `batch_num` batches. `fixed_min` is optional:
//! without it, clip_min is pinned to 0 after ReLU-like producers only.

use super::amct::proto;
use super::config::{
    ConfigError, Parse, check_keys, get_bool, get_channel_wise, get_num, layer_op,
};
use super::config_levels::{Level, Levels, check_skip_lists, is_skipped};
use serde_json::{Map, Value, json};
use std::path::Path;

/// Retrain settings of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrainLayer {
    /// Whether the layer is trained quantized (else it stays float).
    pub retrain_enable: bool,
    /// Initial clip range `(clip_min, clip_max)`; `None`: from IFMR.
    pub clips: Option<(f32, f32)>,
    /// Pin clip_min to 0; `None`: decided from the producer (ReLU-like → true).
    pub fixed_min: Option<bool>,
    /// One weight scale per output channel (Conv, ConvTranspose only).
    pub channel_wise: bool,
}

impl RetrainLayer {
    /// The defaults for a layer of this operator type.
    pub fn default_for(op_type: &str) -> RetrainLayer {
        RetrainLayer {
            retrain_enable: true,
            clips: None,
            fixed_min: None,
            channel_wise: super::layers::channel_wise_by_default(op_type),
        }
    }
}

/// The whole retrain configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrainConfig {
    /// Batches used to initialise the clips (IFMR).
    pub batch_num: usize,
    /// Per-layer settings, in graph order.
    pub layers: Vec<(String, RetrainLayer)>,
    /// AMCT's `fakequant_precision_mode: FORCE_FP16_QUANT` for the models
    /// written after training (`docs/deploy-format.md`, FP16 quant).
    pub fp16_quant: bool,
}

impl RetrainConfig {
    /// The default configuration for these layers (name, op type).
    pub fn default_for(layers: &[(String, String)]) -> RetrainConfig {
        RetrainConfig {
            batch_num: 1,
            fp16_quant: false,
            layers: layers
                .iter()
                .map(|(n, op)| (n.clone(), RetrainLayer::default_for(op)))
                .collect(),
        }
    }

    /// The settings of `name`, if it is configured.
    pub fn layer(&self, name: &str) -> Option<&RetrainLayer> {
        self.layers.iter().find(|(n, _)| n == name).map(|(_, l)| l)
    }

    /// The configuration in AMCT's retrain JSON layout.
    pub fn to_json(&self) -> Value {
        let mut top = Map::new();
        top.insert("version".into(), json!(1));
        top.insert("batch_num".into(), json!(self.batch_num));
        if self.fp16_quant {
            top.insert(
                "fakequant_precision_mode".into(),
                json!(crate::deploy_format::fp16_quant::FORCE_FP16_QUANT),
            );
        }
        for (name, l) in &self.layers {
            let mut data = Map::new();
            data.insert("algo".into(), json!("ulq_quantize"));
            if let Some((lo, hi)) = l.clips {
                data.insert("clip_max".into(), json!(hi));
                data.insert("clip_min".into(), json!(lo));
            }
            if let Some(f) = l.fixed_min {
                data.insert("fixed_min".into(), json!(f));
            }
            data.insert("dst_type".into(), json!("INT8"));
            top.insert(
                name.clone(),
                json!({
                    "retrain_enable": l.retrain_enable,
                    "retrain_data_config": Value::Object(data),
                    "retrain_weight_config": {
                        "algo": "arq_retrain",
                        "channel_wise": l.channel_wise,
                        "dst_type": "INT8",
                    },
                }),
            );
        }
        Value::Object(top)
    }

    /// Reads a retrain JSON file; `layers` (name, op type) are the model's quantizable layers.
    pub fn from_json_file(
        path: &Path,
        layers: &[(String, String)],
    ) -> Result<RetrainConfig, ConfigError> {
        let text = ConfigError::read(path)?;
        RetrainConfig::from_json_str(&text, &path.display().to_string(), layers)
    }

    /// Parses a retrain JSON text; `file` names it in errors.
    pub fn from_json_str(
        text: &str,
        file: &str,
        layers: &[(String, String)],
    ) -> Result<RetrainConfig, ConfigError> {
        let fail = ConfigError::about(file);
        let value: Value =
            serde_json::from_str(text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
        parse(&value, layers).map_err(fail)
    }
}

impl RetrainConfig {
    /// Reads AMCT's retrain simple config (`AMCTRetrainConfig` in protobuf
    /// text format). Priority per layer: `override_layer_configs` (by name)
    /// over `override_layer_types` (by op type) over the top-level settings.
    pub fn from_simple_config(
        path: &Path,
        layers: &[(String, String)],
    ) -> Result<RetrainConfig, ConfigError> {
        let text = ConfigError::read(path)?;
        RetrainConfig::from_simple_config_str(&text, &path.display().to_string(), layers)
    }

    /// Parses a retrain simple config's text; `file` names it in errors.
    pub fn from_simple_config_str(
        text: &str,
        file: &str,
        layers: &[(String, String)],
    ) -> Result<RetrainConfig, ConfigError> {
        let fail = ConfigError::about(file);
        let desc = super::amct::descriptors()
            .get_message_by_name("amct.AMCTRetrainConfig")
            .ok_or_else(|| fail("the retrain schema is missing".into()))?;
        let msg = prost_reflect::DynamicMessage::parse_text_format(desc, text)
            .map_err(|e| fail(format!("not a valid AMCTRetrainConfig: {e}")))?;
        let cfg: proto::AmctRetrainConfig = msg.transcode_to().map_err(|e| fail(e.to_string()))?;
        build_simple(&cfg, layers).map_err(fail)
    }
}

fn apply_data(l: &mut RetrainLayer, d: &proto::RetrainDataQuantConfig, ctx: &str) -> Parse<()> {
    match &d.algo {
        None => Ok(()),
        Some(proto::retrain_data_quant_config::Algo::UlqQuantize(u)) => {
            if u.dst_type() != proto::DataType::Int8 {
                return Err(format!(
                    "{ctx}: ulq_quantize dst_type {} is not supported; allowed: INT8",
                    u.dst_type().as_str_name()
                ));
            }
            if let Some(f) = u.fixed_min {
                l.fixed_min = Some(f);
            }
            if let Some(c) = &u.clip_max_min {
                let usable = c.clip_max > c.clip_min
                    && c.clip_min <= 0.0
                    && c.clip_max >= 0.0
                    && c.clip_max.is_finite()
                    && c.clip_min.is_finite();
                if !usable {
                    return Err(format!(
                        "{ctx}: clip_max_min ({}, {}) must satisfy clip_min <= 0 <= clip_max and clip_min < clip_max",
                        c.clip_max, c.clip_min
                    ));
                }
                l.clips = Some((c.clip_min, c.clip_max));
            }
            Ok(())
        }
    }
}

fn apply_weights(
    l: &mut RetrainLayer,
    w: &proto::RetrainWeightQuantConfig,
    op: &str,
    ctx: &str,
) -> Parse<()> {
    match &w.algo {
        None => Ok(()),
        Some(proto::retrain_weight_quant_config::Algo::UlqRetrain(_)) => Err(format!(
            "{ctx}: ulq_retrain weights are not supported; use arq_retrain"
        )),
        Some(proto::retrain_weight_quant_config::Algo::ArqRetrain(a)) => {
            if a.dst_type() != proto::DataType::Int8 {
                return Err(format!(
                    "{ctx}: arq_retrain dst_type {} is not supported; allowed: INT8",
                    a.dst_type().as_str_name()
                ));
            }
            l.channel_wise = a.channel_wise() && super::layers::channel_wise_by_default(op);
            Ok(())
        }
    }
}

fn build_simple(
    cfg: &proto::AmctRetrainConfig,
    layers: &[(String, String)],
) -> Parse<RetrainConfig> {
    if cfg.prune_config.is_some()
        || !cfg.regular_prune_skip_layers.is_empty()
        || !cfg.regular_prune_skip_types.is_empty()
    {
        return Err(
            "pruning (prune_config, regular_prune_skip_*) is not supported; remove it".into(),
        );
    }
    if cfg.batch_num() == 0 {
        return Err("'batch_num' must be at least 1".into());
    }
    let skip_names: [&[String]; 2] = [&cfg.skip_layers, &cfg.quant_skip_layers];
    let skip_types: [&[String]; 2] = [&cfg.skip_layer_types, &cfg.quant_skip_types];
    check_skip_lists(&skip_names, layers)?;
    let levels = Levels {
        common: vec![(
            cfg.retrain_data_quant_config.as_ref(),
            cfg.retrain_weight_quant_config.as_ref(),
        )],
        by_type: cfg
            .override_layer_types
            .iter()
            .map(|o| {
                let settings = (
                    o.retrain_data_quant_config.as_ref(),
                    o.retrain_weight_quant_config.as_ref(),
                );
                (o.layer_type.clone(), settings)
            })
            .collect(),
        by_layer: cfg
            .override_layer_configs
            .iter()
            .map(|o| {
                let settings = (
                    o.retrain_data_quant_config.as_ref(),
                    o.retrain_weight_quant_config.as_ref(),
                );
                (o.layer_name.clone(), settings)
            })
            .collect(),
    };
    levels.check_layer_names(layers)?;
    let mut out = RetrainConfig::default_for(layers);
    out.batch_num = cfg.batch_num() as usize;
    out.fp16_quant =
        cfg.fakequant_precision_mode() == proto::FakequantPrecisionMode::ForceFp16Quant;
    for (name, l) in &mut out.layers {
        let op = layer_op(layers, name)?;
        l.retrain_enable = !is_skipped(name, op, &skip_names, &skip_types);
        for (level, (data, weights)) in levels.for_layer(name, op) {
            let ctx = match level {
                Level::Common => None,
                Level::Type => Some(format!("override_layer_types '{op}'")),
                Level::Layer => Some(format!("override_layer_configs '{name}'")),
            };
            if let Some(d) = data {
                let ctx = ctx.as_deref().unwrap_or("retrain_data_quant_config");
                apply_data(l, d, ctx)?;
            }
            if let Some(w) = weights {
                let ctx = ctx.as_deref().unwrap_or("retrain_weight_quant_config");
                apply_weights(l, w, op, ctx)?;
            }
        }
        if l.fixed_min == Some(true) && l.clips.is_some_and(|(lo, _)| lo != 0.0) {
            return Err(format!(
                "layer '{name}': fixed_min true pins clip_min to 0; remove clip_min or set it to 0"
            ));
        }
    }
    Ok(out)
}

fn parse(value: &Value, layers: &[(String, String)]) -> Parse<RetrainConfig> {
    let obj = value
        .as_object()
        .ok_or("the retrain config must be a JSON object")?;
    let mut cfg = RetrainConfig::default_for(&[]);
    for (key, v) in obj {
        match key.as_str() {
            "version" => {
                if v.as_u64() != Some(1) {
                    return Err(format!("'version' must be 1, got {v}"));
                }
            }
            "batch_num" => cfg.batch_num = get_num(v, key, 1.0, 1e9, "an integer >= 1")? as usize,
            "fakequant_precision_mode" => {
                super::fp16_quant::read_json_mode(v)?;
                cfg.fp16_quant = true;
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

fn get_object<'a>(v: &'a Value, ctx: &str) -> Parse<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| format!("{ctx} must be an object"))
}

fn check_string(obj: &Map<String, Value>, key: &str, allowed: &str, ctx: &str) -> Parse<()> {
    match obj.get(key) {
        None => Ok(()),
        Some(Value::String(s)) if s == allowed => Ok(()),
        Some(other) => Err(format!(
            "{ctx}: '{key}' = {other} is not supported; allowed: \"{allowed}\""
        )),
    }
}

fn parse_layer(v: &Value, name: &str, op: &str) -> Parse<RetrainLayer> {
    let ctx = format!("layer '{name}'");
    let obj = get_object(v, &ctx)?;
    check_keys(
        obj,
        &[
            "retrain_enable",
            "retrain_data_config",
            "retrain_weight_config",
        ],
        &ctx,
    )?;
    let mut l = RetrainLayer::default_for(op);
    if let Some(e) = obj.get("retrain_enable") {
        l.retrain_enable = get_bool(e, "retrain_enable")?;
    }
    if let Some(d) = obj.get("retrain_data_config") {
        let ctx = format!("{ctx} retrain_data_config");
        let d = get_object(d, &ctx)?;
        check_keys(
            d,
            &["algo", "clip_max", "clip_min", "fixed_min", "dst_type"],
            &ctx,
        )?;
        check_string(d, "algo", "ulq_quantize", &ctx)?;
        check_string(d, "dst_type", "INT8", &ctx)?;
        if let Some(f) = d.get("fixed_min") {
            l.fixed_min = Some(get_bool(f, "fixed_min")?);
        }
        l.clips = match (d.get("clip_min"), d.get("clip_max")) {
            (None, None) => None,
            (Some(lo), Some(hi)) => {
                let lo = get_num(lo, "clip_min", f64::MIN, 0.0, "a number <= 0")? as f32;
                let hi = get_num(hi, "clip_max", 0.0, f64::MAX, "a number >= 0")? as f32;
                if hi <= lo || !lo.is_finite() || !hi.is_finite() {
                    return Err(format!(
                        "{ctx}: clip_max ({hi}) must be larger than clip_min ({lo})"
                    ));
                }
                Some((lo, hi))
            }
            _ => {
                return Err(format!(
                    "{ctx}: give clip_max and clip_min together (or neither, to start from IFMR)"
                ));
            }
        };
        if l.fixed_min == Some(true) && l.clips.is_some_and(|(lo, _)| lo != 0.0) {
            return Err(format!(
                "{ctx}: fixed_min true pins clip_min to 0; remove clip_min or set it to 0"
            ));
        }
    }
    if let Some(w) = obj.get("retrain_weight_config") {
        let ctx = format!("{ctx} retrain_weight_config");
        let w = get_object(w, &ctx)?;
        check_keys(w, &["algo", "channel_wise", "dst_type"], &ctx)?;
        check_string(w, "algo", "arq_retrain", &ctx)?;
        check_string(w, "dst_type", "INT8", &ctx)?;
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

    #[test]
    fn the_default_round_trips_and_matches_amct_keys() {
        let cfg = RetrainConfig::default_for(&layers());
        let v = cfg.to_json();
        assert_eq!(v["conv1"]["retrain_data_config"]["algo"], "ulq_quantize");
        assert_eq!(v["conv1"]["retrain_weight_config"]["algo"], "arq_retrain");
        assert_eq!(v["conv1"]["retrain_weight_config"]["channel_wise"], true);
        assert_eq!(v["fc"]["retrain_weight_config"]["channel_wise"], false);
        let back = RetrainConfig::from_json_str(&v.to_string(), "r.json", &layers()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn clips_and_fixed_min_are_read() {
        let text = r#"{"version": 1, "batch_num": 3, "conv1": {"retrain_data_config":
            {"algo": "ulq_quantize", "clip_max": 6.0, "clip_min": 0.0, "fixed_min": true}}}"#;
        let cfg = RetrainConfig::from_json_str(text, "r.json", &layers()).unwrap();
        assert_eq!(cfg.batch_num, 3);
        let l = cfg.layer("conv1").unwrap();
        assert_eq!((l.clips, l.fixed_min), (Some((0.0, 6.0)), Some(true)));
    }

    #[test]
    fn the_simple_config_follows_amct_priorities() {
        let text = r#"
            batch_num: 2
            retrain_data_quant_config { ulq_quantize { fixed_min: false } }
            retrain_weight_quant_config { arq_retrain { channel_wise: false } }
            override_layer_types { layer_type: "Conv"
              retrain_weight_quant_config { arq_retrain { channel_wise: true } } }
            override_layer_configs { layer_name: "conv1"
              retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 6.0 clip_min: 0.0 } fixed_min: true } } }
            skip_layer_types: "Gemm"
        "#;
        let cfg = RetrainConfig::from_simple_config_str(text, "r.cfg", &layers()).unwrap();
        assert_eq!(cfg.batch_num, 2);
        let conv = cfg.layer("conv1").unwrap();
        assert_eq!(
            (
                conv.retrain_enable,
                conv.clips,
                conv.fixed_min,
                conv.channel_wise
            ),
            (true, Some((0.0, 6.0)), Some(true), true)
        );
        let fc = cfg.layer("fc").unwrap();
        assert_eq!(
            (fc.retrain_enable, fc.fixed_min, fc.channel_wise),
            (false, Some(false), false)
        );
        for (bad, needle) in [
            ("skip_layers: \"nope\"", "layer 'nope' does not exist"),
            (
                "retrain_weight_quant_config { ulq_retrain { } }",
                "ulq_retrain weights are not supported",
            ),
            ("prune_config { prune_ratio: 0.2 }", "pruning"),
            (
                "retrain_data_quant_config { ulq_quantize { dst_type: INT4 } }",
                "INT4 is not supported",
            ),
            (
                "retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 1 clip_min: 2 } } }",
                "clip_min <= 0",
            ),
            ("batchnum: 1", "not a valid AMCTRetrainConfig"),
        ] {
            let e = RetrainConfig::from_simple_config_str(bad, "r.cfg", &layers())
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_keys_and_ranges_name_the_key() {
        let cases = [
            (r#"{"conv9": {}}"#, "layer 'conv9' does not exist"),
            (r#"{"conv1": {"retrain": true}}"#, "unknown key 'retrain'"),
            (
                r#"{"conv1": {"retrain_data_config": {"algo": "ifmr"}}}"#,
                "'algo' = \"ifmr\" is not supported",
            ),
            (
                r#"{"conv1": {"retrain_data_config": {"clip_max": 2.0}}}"#,
                "give clip_max and clip_min together",
            ),
            (
                r#"{"conv1": {"retrain_data_config": {"clip_max": 2.0, "clip_min": 1.0}}}"#,
                "'clip_min' = 1 is out of range",
            ),
            (
                r#"{"conv1": {"retrain_data_config": {"clip_max": 2.0, "clip_min": -1.0, "fixed_min": true}}}"#,
                "fixed_min true pins clip_min to 0",
            ),
            (
                r#"{"conv1": {"retrain_weight_config": {"dst_type": "INT4"}}}"#,
                "'dst_type' = \"INT4\" is not supported",
            ),
            (r#"{"batch_num": 0}"#, "'batch_num' = 0 is out of range"),
        ];
        for (text, needle) in cases {
            let e = RetrainConfig::from_json_str(text, "r.json", &layers())
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("r.json: ") && e.contains(needle),
                "{text}: {e}"
            );
        }
    }
}
