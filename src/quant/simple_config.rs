//! AMCT's "simple config" (`.cfg`): an `AMCTConfig` message in protobuf text
//! format, parsed with prost-reflect and turned into a [`QuantConfig`].
//! Priority per layer: `override_layer_configs` (by name) over
//! `override_layer_types` (by op type) over `common_config`; an algorithm's
//! own `asymmetric` over `activation_offset`.

use super::amct::{descriptors, proto};
use super::config::{
    ConfigError, LayerConfig, QuantConfig, TensorQuantConfig, WtsAlgo, ada_settings, nuq_settings,
};
use super::config_levels::{Level, Levels, check_skip_lists, is_skipped};
use super::observe::{ActAlgo, IfmrSettings};
use super::weights::NuqSettings;
use prost_reflect::DynamicMessage;
use proto::calibration_config::{ActsQuantAlgo, TensorBalancer, WtsQuantAlgo};
use proto::tensor_quantize::TensorQuantAlgo;
use std::path::Path;

/// Reads a simple config; `layers` (name, op type) are the model's quantizable layers.
pub fn from_simple_config(
    path: &Path,
    layers: &[(String, String)],
) -> Result<QuantConfig, ConfigError> {
    let text = ConfigError::read(path)?;
    from_simple_config_str(&text, &path.display().to_string(), layers)
}

/// Parses a simple config's text; `file` names it in errors.
pub fn from_simple_config_str(
    text: &str,
    file: &str,
    layers: &[(String, String)],
) -> Result<QuantConfig, ConfigError> {
    let fail = ConfigError::about(file);
    let desc = descriptors()
        .get_message_by_name("amct.AMCTConfig")
        .expect("declared in amct.proto");
    let msg = DynamicMessage::parse_text_format(desc, text)
        .map_err(|e| fail(format!("not a valid AMCTConfig: {e}")))?;
    let cfg: proto::AmctConfig = msg.transcode_to().map_err(|e| fail(e.to_string()))?;
    build(&cfg, layers).map_err(fail)
}

fn build(cfg: &proto::AmctConfig, layers: &[(String, String)]) -> Result<QuantConfig, String> {
    if cfg.joint_quant() {
        return Err("joint_quant is not supported yet; remove it".into());
    }
    // nuq_config applies NUQ to every layer (those NUQ cannot take stay
    // uniform with a note); a layer's own weight algorithm overrides it.
    let nuq_default = match &cfg.nuq_config {
        Some(n) => Some(WtsAlgo::Nuq(nuq_from(
            &n.nuq_quantize.unwrap_or_default(),
            "nuq_config",
        )?)),
        None => None,
    };
    let levels = Levels {
        common: cfg.common_config.iter().collect(),
        by_type: cfg
            .override_layer_types
            .iter()
            .map(|o| (o.layer_type.clone(), &o.calibration_config))
            .collect(),
        by_layer: cfg
            .override_layer_configs
            .iter()
            .map(|o| (o.layer_name.clone(), &o.calibration_config))
            .collect(),
    };
    check_skip_lists(&[&cfg.skip_layers], layers)?;
    levels.check_layer_names(layers)?;
    let mut out = QuantConfig {
        batch_num: cfg.batch_num.map(|n| n as usize),
        batch_size: None,
        activation_offset: cfg.activation_offset(),
        do_fusion: cfg.do_fusion(),
        skip_fusion_layers: cfg.skip_fusion_layers.clone(),
        layers: Vec::new(),
        tensor_quantize: Vec::new(),
        bias_correction: cfg.bias_correction(),
        fp16_quant: cfg.fakequant_precision_mode() == proto::FakequantPrecisionMode::ForceFp16Quant,
    };
    for (i, t) in cfg.tensor_quantize.iter().enumerate() {
        let layer_name = t
            .layer_name
            .clone()
            .ok_or_else(|| format!("tensor_quantize #{}: 'layer_name' is required", i + 1))?;
        let input_index = t
            .input_index
            .ok_or_else(|| format!("tensor_quantize '{layer_name}': 'input_index' is required"))?
            as usize;
        let acts = match &t.tensor_quant_algo {
            Some(TensorQuantAlgo::IfmrQuantize(f)) => Some(ActsQuantAlgo::IfmrQuantize(*f)),
            Some(TensorQuantAlgo::HfmgQuantize(h)) => Some(ActsQuantAlgo::HfmgQuantize(*h)),
            None => None,
        };
        let mut layer = LayerConfig::default_for("MaxPool");
        let settings = proto::CalibrationConfig {
            acts_quant_algo: acts,
            ..Default::default()
        };
        apply(&mut layer, &settings, &layer_name, "MaxPool", true)?;
        out.tensor_quantize.push(TensorQuantConfig {
            layer_name,
            input_index,
            act_algo: layer.act_algo,
            asymmetric: layer.asymmetric,
        });
    }
    if out.batch_num == Some(0) {
        return Err("'batch_num' must be at least 1".into());
    }
    for (name, op) in layers {
        let mut layer = LayerConfig::default_for(op);
        if let Some(algo) = nuq_default {
            layer.wts_algo = algo;
        }
        for (level, c) in levels.for_layer(name, op) {
            apply(&mut layer, c, name, op, level == Level::Layer)?;
        }
        layer.quant_enable = !is_skipped(name, op, &[&cfg.skip_layers], &[&cfg.skip_layer_types]);
        out.layers.push((name.clone(), layer));
    }
    Ok(out)
}

fn nuq_from(n: &proto::NuQuantize, ctx: &str) -> Result<NuqSettings, String> {
    nuq_settings(
        u64::from(n.num_steps()),
        u64::from(n.num_of_iteration()),
        ctx,
    )
}

fn check_percentile(key: &str, v: f32) -> Result<f64, String> {
    if !(v > 0.5 && v <= 1.0) {
        return Err(format!("'{key}' = {v} is out of range; allowed: (0.5, 1]"));
    }
    Ok(f64::from(v))
}

/// Whether `channel_wise` applies to a layer of `op`: a layer named in an
/// override may ask for it on Gemm / MatMul too (an ascend-quant
/// extension); a type-wide or common setting applies where AMCT applies it
/// (Conv, ConvTranspose), so AMCT's usual configuration keeps Gemm and
/// MatMul per tensor.
fn channels_for(op: &str, named: bool) -> bool {
    if named {
        super::layers::has_weight_channels(op)
    } else {
        super::layers::channel_wise_by_default(op)
    }
}

/// Applies one level of settings. `channel_wise: true` from the common or a
/// type-wide config means "where the layer has output channels"; named for a
/// Gemm/MatMul/AveragePool layer itself, it is an error.
fn apply(
    layer: &mut LayerConfig,
    c: &proto::CalibrationConfig,
    name: &str,
    op: &str,
    named: bool,
) -> Result<(), String> {
    let ctx = |m: String| format!("layer '{name}': {m}");
    if let Some(TensorBalancer::DmqBalancer(d)) = c.tensor_balancer {
        let a = d.migration_strength();
        if !(0.2..=0.8).contains(&a) {
            return Err(ctx(format!(
                "dmq_balancer migration_strength {a} is out of range; allowed: 0.2 to 0.8"
            )));
        }
        if super::layers::has_weight(op) {
            layer.dmq = Some(a);
        } else if named {
            return Err(ctx(format!(
                "dmq_balancer needs a layer with a weight, and this layer is {op}"
            )));
        }
    }
    match c.wts_quant_algo {
        Some(WtsQuantAlgo::ArqQuantize(a)) => {
            layer.wts_algo = WtsAlgo::Arq;
            if a.quant_bits() != 8 {
                return Err(ctx(format!(
                    "arq_quantize quant_bits {} is not supported; allowed: 8",
                    a.quant_bits()
                )));
            }
            let has_channels = channels_for(op, named);
            if a.channel_wise() && !has_channels && named {
                return Err(ctx(format!(
                    "channel_wise true is only allowed for Conv, ConvTranspose, Gemm and MatMul, and this layer is {op}"
                )));
            }
            layer.channel_wise = a.channel_wise() && has_channels;
        }
        Some(WtsQuantAlgo::NuqQuantize(n)) => {
            layer.wts_algo = WtsAlgo::Nuq(nuq_from(&n, "nuq_quantize").map_err(ctx)?);
        }
        Some(WtsQuantAlgo::AdaQuantize(a)) => {
            let (start, end) = (a.beta_range_start(), a.beta_range_end());
            if !(start > end && end > 0.0) {
                return Err(ctx(format!(
                    "ada_quantize beta_range_start {start} / beta_range_end {end}: need start > end > 0"
                )));
            }
            let valid = a.reg_param() > 0.0
                && a.reg_param() < 1.0
                && (0.0..1.0).contains(&a.warm_start())
                && a.num_iteration != Some(0);
            if !valid {
                return Err(ctx(
                    "ada_quantize: reg_param must be in (0, 1), warm_start in [0, 1), num_iteration >= 1"
                        .into(),
                ));
            }
            // Unset, the step count is ascend-quant's default (AMCT's 10000 is
            // minutes per layer on a CPU; see docs/algorithms.md).
            layer.wts_algo = WtsAlgo::Ada(ada_settings(
                a.num_iteration.map_or(
                    super::weights::adaround::AdaSettings::default().num_iteration,
                    |n| n as usize,
                ),
                a.reg_param(),
                [start, end],
                a.warm_start(),
            ));
            let has_channels = channels_for(op, named);
            if a.channel_wise.is_some() {
                layer.channel_wise = a.channel_wise() && has_channels;
            }
        }
        None => {}
    }
    let int8_only = |dst: i32| {
        if dst == proto::DataType::Int8 as i32 {
            Ok(())
        } else {
            Err(ctx("dst_type INT16 is not supported; allowed: INT8".into()))
        }
    };
    match c.acts_quant_algo {
        Some(ActsQuantAlgo::IfmrQuantize(f)) => {
            int8_only(f.dst_type.unwrap_or(1))?;
            let (start, end, step) = (
                f.search_range_start(),
                f.search_range_end(),
                f.search_step(),
            );
            if !(start > 0.0 && start < end) {
                return Err(ctx(format!(
                    "search_range_start {start} / search_range_end {end}: need 0 < start < end"
                )));
            }
            if !(step > 0.0 && step <= end - start) {
                return Err(ctx(format!(
                    "search_step {step} is out of range; allowed: (0, {}]",
                    end - start
                )));
            }
            layer.act_algo = ActAlgo::Ifmr(IfmrSettings {
                max_percentile: check_percentile("max_percentile", f.max_percentile())
                    .map_err(ctx)?,
                min_percentile: check_percentile("min_percentile", f.min_percentile())
                    .map_err(ctx)?,
                search_range: [start, end],
                search_step: step,
                extend_below: false,
            });
            layer.asymmetric = f.asymmetric.or(layer.asymmetric);
        }
        Some(ActsQuantAlgo::HfmgQuantize(h)) => {
            int8_only(h.dst_type.unwrap_or(1))?;
            let bins = h.num_of_bins() as usize;
            if ![1024, 2048, 4096, 8192].contains(&bins) {
                return Err(ctx(format!(
                    "num_of_bins {bins} is out of range; allowed: 1024, 2048, 4096 or 8192"
                )));
            }
            layer.act_algo = ActAlgo::Hfmg { num_of_bins: bins };
            layer.asymmetric = h.asymmetric.or(layer.asymmetric);
        }
        Some(ActsQuantAlgo::MinmaxQuantize(m)) => {
            layer.act_algo = ActAlgo::Minmax;
            layer.asymmetric = m.asymmetric.or(layer.asymmetric);
        }
        Some(ActsQuantAlgo::PercentileQuantize(p)) => {
            let v = p.percentile();
            if !(50.0..=100.0).contains(&v) {
                return Err(ctx(format!(
                    "percentile {v} is out of range; allowed: 50 to 100"
                )));
            }
            layer.act_algo = ActAlgo::Percentile {
                percentile: f64::from(v),
            };
            layer.asymmetric = p.asymmetric.or(layer.asymmetric);
        }
        Some(ActsQuantAlgo::KlQuantize(k)) => {
            let bins = k.num_of_bins() as usize;
            if !(256..=65536).contains(&bins) {
                return Err(ctx(format!(
                    "num_of_bins {bins} is out of range; allowed: 256 to 65536"
                )));
            }
            layer.act_algo = ActAlgo::Kl { num_of_bins: bins };
            layer.asymmetric = k.asymmetric.or(layer.asymmetric);
        }
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<(String, String)> {
        vec![
            ("conv1".into(), "Conv".into()),
            ("conv2".into(), "Conv".into()),
            ("fc".into(), "Gemm".into()),
        ]
    }

    fn parse(text: &str) -> Result<QuantConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.cfg");
        std::fs::write(&p, text).unwrap();
        from_simple_config(&p, &layers()).map_err(|e| e.to_string())
    }

    #[test]
    fn priorities_name_over_type_over_common() {
        let cfg = parse(
            r#"
            batch_num: 3
            activation_offset: false
            skip_layers: "conv2"
            common_config { arq_quantize { channel_wise: false } ifmr_quantize { search_step: 0.02 } }
            override_layer_types { layer_type: "Conv" calibration_config { hfmg_quantize { num_of_bins: 2048 asymmetric: true } } }
            override_layer_configs { layer_name: "conv1" calibration_config { arq_quantize { channel_wise: true } minmax_quantize { } } }
            "#,
        )
        .unwrap();
        assert_eq!(cfg.batch_num, Some(3));
        assert!(!cfg.activation_offset);
        let conv1 = cfg.layer("conv1").unwrap();
        assert_eq!(conv1.act_algo, ActAlgo::Minmax);
        assert!(conv1.channel_wise);
        assert_eq!(conv1.asymmetric, Some(true)); // from the type override; minmax does not set it
        let conv2 = cfg.layer("conv2").unwrap();
        assert!(!conv2.quant_enable);
        assert_eq!(conv2.act_algo, ActAlgo::Hfmg { num_of_bins: 2048 });
        assert!(!conv2.channel_wise);
        let fc = cfg.layer("fc").unwrap();
        assert!(matches!(&fc.act_algo, ActAlgo::Ifmr(s) if s.search_step == 0.02));
        assert!(!cfg.asymmetric(fc));
    }

    #[test]
    fn nuq_config_applies_to_every_layer_unless_a_layer_says_otherwise() {
        let cfg = parse(
            r#"
            nuq_config { mapping_file: "ignored.json" nuq_quantize { num_steps: 16 num_of_iteration: 2 } }
            override_layer_configs { layer_name: "fc" calibration_config { arq_quantize { } } }
            override_layer_configs { layer_name: "conv2" calibration_config { nuq_quantize { } } }
            "#,
        )
        .unwrap();
        let nuq = |steps, iters| {
            WtsAlgo::Nuq(NuqSettings {
                num_steps: steps,
                num_of_iteration: iters,
            })
        };
        assert_eq!(cfg.layer("conv1").unwrap().wts_algo, nuq(16, 2));
        assert_eq!(cfg.layer("conv2").unwrap().wts_algo, nuq(32, 1));
        assert_eq!(cfg.layer("fc").unwrap().wts_algo, WtsAlgo::Arq);
        let e = parse("nuq_config { nuq_quantize { num_steps: 20 } }").unwrap_err();
        assert!(e.contains("num_steps") && e.contains("16 or 32"), "{e}");
    }

    #[test]
    fn errors_name_the_field_or_value() {
        let e = parse("batch_num: 2 bogus_field: 1").unwrap_err();
        assert!(e.contains("bogus_field"), "{e}");
        let e = parse("common_config { hfmg_quantize { num_of_bins: 3000 } }").unwrap_err();
        assert!(
            e.contains("num_of_bins") && e.contains("1024, 2048, 4096 or 8192"),
            "{e}"
        );
        let e = parse("common_config { ifmr_quantize { max_percentile: 0.2 } }").unwrap_err();
        assert!(
            e.contains("max_percentile") && e.contains("(0.5, 1]"),
            "{e}"
        );
        let e = parse(r#"skip_layers: "nope""#).unwrap_err();
        assert!(
            e.contains("'nope'") && e.contains("conv1, conv2, fc"),
            "{e}"
        );
        // Named, a Gemm may ask for one scale per output column.
        let cfg = parse(r#"override_layer_configs { layer_name: "fc" calibration_config { arq_quantize { channel_wise: true } } }"#).unwrap();
        assert!(cfg.layer("fc").unwrap().channel_wise);
        // From the common config it applies where it can.
        let cfg = parse("common_config { arq_quantize { channel_wise: true } }").unwrap();
        assert!(cfg.layer("conv1").unwrap().channel_wise && !cfg.layer("fc").unwrap().channel_wise);
    }
}
