//! One post-training quantization run: prepare the float model, stream the
//! calibration batches through the simulator while every layer's observer
//! watches its input, quantize the weights; then measure each layer's output
//! similarity. [`Outcome::models`] builds the deploy and fake-quant models.

use super::adaround::{AdaReport, adaround_layers};
use super::bias_correction::{BiasCorrection, correct_biases};
use super::config::{QuantConfig, WtsAlgo};
use super::dmq::{ChannelAxes, ChannelMax, balance_factors, balance_input, balance_weight};
use super::dmq_search::{self, RowSample, SAMPLE_ROWS, SearchSettings};
use super::emit::{
    LayerFactors, ModelKind, add_tensor_quantization, deploy_and_fake_quant, simulation_model,
};
use super::error::QuantError;
use super::layers::{LayerCandidate, QuantLayer, discover};
use super::nuq::{apply_nuq, nuq_map};
use super::observe::{Observer, finite_extremes};
use super::params::ActParams;
use super::prepare::{Prepared, prepare};
use super::tensor_quant::{TensorFactors, resolve as resolve_tensors};
use super::value_bounds::{Bounds, known_bounds};
use super::weights::adaround::AdaSettings;
use super::weights::{ChannelLayout, InputMoments, arq_scales, quantize_bias, quantize_weight};
use crate::data::{Batch, Dataset};
use crate::onnx::{ModelProto, to_tensor};
use crate::sim::{Executor, Session, SessionOptions};
use crate::tensor::Tensor;
use ndarray::ArrayD;
use rayon::prelude::*;
use std::collections::HashMap;

pub use super::run_settings::RunSettings;

/// The result of a run.
pub struct Outcome {
    /// The float model after preparation (BN folded, names given).
    pub prepared: ModelProto,
    /// What preparation did.
    pub preparation: Prepared,
    /// Factors per quantized layer, in graph order.
    pub factors: Vec<LayerFactors>,
    /// Tensor quantizations.
    pub tensors: Vec<TensorFactors>,
    /// What bias correction did, per layer (empty when it was off).
    pub bias_correction: Vec<BiasCorrection>,
    /// What AdaRound did, per layer (empty when no layer asked for it).
    pub adaround: Vec<AdaReport>,
    /// Every candidate layer and why it was or was not quantized.
    pub candidates: Vec<LayerCandidate>,
    /// Emit the models with FORCE_FP16_QUANT (`fp16_quant`).
    pub fp16_quant: bool,
    /// Cosine similarity of each quantized layer's output, float vs fake-quant, over the calibration data.
    pub cosine: HashMap<String, f64>,
    /// Batches used for calibration.
    pub batches_used: usize,
    /// Seconds spent observing activations (and quantizing weights), and
    /// measuring similarity.
    pub timings: [f64; 2],
}

impl Outcome {
    /// The deploy and fake-quant models of this run (built on each call:
    /// the run holds only the prepared model and the factors).
    pub fn models(&self) -> Result<(ModelProto, ModelProto), crate::onnx::OnnxError> {
        deploy_and_fake_quant(
            &self.prepared,
            &self.factors,
            &self.tensors,
            self.fp16_quant,
        )
    }
}

/// The statistics half of a run: the prepared model and the factors of
/// every enabled layer. Any subset of these factors gives a valid quantized
/// model, which is what automatic quantization relies on.
pub struct Calibrated {
    /// The float model after preparation (BN folded, names given).
    pub prepared: ModelProto,
    /// What preparation did.
    pub preparation: Prepared,
    /// Every candidate layer and why it was or was not quantized.
    pub candidates: Vec<LayerCandidate>,
    /// Factors per enabled layer, in graph order.
    pub factors: Vec<LayerFactors>,
    /// Tensor quantizations (inputs of MaxPool / Add), in configuration order.
    pub tensors: Vec<TensorFactors>,
    /// What AdaRound did, per layer that asked for it.
    pub adaround: Vec<AdaReport>,
    /// Batches used.
    pub batches_used: usize,
    /// Seconds spent observing activations.
    pub seconds: f64,
    /// Emit the models with FORCE_FP16_QUANT (`fp16_quant`).
    pub fp16_quant: bool,
}

/// Runs post-training quantization of `model` with `config` on `data`.
/// The model is taken by value: it becomes the prepared model, so a run never
/// holds two copies of the weights.
pub fn calibrate(
    model: ModelProto,
    config: &QuantConfig,
    data: &Dataset,
    executor: &dyn Executor,
    run: &RunSettings,
) -> Result<Outcome, QuantError> {
    let mut c = observe_layers(model, config, data, executor, run)?;
    let corrections = if config.bias_correction {
        let started = std::time::Instant::now();
        let done = correct_biases(
            &crate::sim::CpuExecutor,
            &c.prepared,
            &mut c.factors,
            data,
            run,
            c.batches_used,
        )?;
        c.seconds += started.elapsed().as_secs_f64();
        done
    } else {
        Vec::new()
    };
    let mut outcome = finish(c, Some(data), run)?;
    outcome.bias_correction = corrections;
    Ok(outcome)
}

/// Turns calibrated factors into a run's outcome, measuring each layer's
/// similarity when there is data.
pub fn finish(
    c: Calibrated,
    data: Option<&Dataset>,
    run: &RunSettings,
) -> Result<Outcome, QuantError> {
    let started = std::time::Instant::now();
    // The similarity comes first, so its sessions are gone before the
    // emitted models exist (the peak memory of a run is the lower for it).
    // Measured on the CPU simulator whatever backend observed: it is the
    // fake-quant arithmetic being checked, not the device.
    let cosine = match data {
        Some(data) => {
            // It runs a faster equivalent of the fake-quant model.
            let mut simulation = simulation_model(&c.prepared, &c.factors)?;
            if c.fp16_quant {
                super::fp16_quant::apply_to_simulation(&mut simulation);
            }
            add_tensor_quantization(&mut simulation, &c.tensors, ModelKind::Simulation)?;
            super::layer_cosines::layer_cosines(
                &crate::sim::CpuExecutor,
                &c.prepared,
                simulation,
                &c.factors,
                data,
                run,
                c.batches_used.max(1),
            )?
        }
        None => HashMap::new(),
    };
    let timings = [c.seconds, started.elapsed().as_secs_f64()];
    Ok(Outcome {
        prepared: c.prepared,
        preparation: c.preparation,
        factors: c.factors,
        tensors: c.tensors,
        bias_correction: Vec::new(),
        adaround: c.adaround,
        candidates: c.candidates,
        fp16_quant: c.fp16_quant,
        cosine,
        batches_used: c.batches_used,
        timings,
    })
}

/// Observes every enabled layer's input over `config.batch_num` batches (all
/// of them by default) and
/// computes all factors.
pub fn observe_layers(
    model: ModelProto,
    config: &QuantConfig,
    data: &Dataset,
    executor: &dyn Executor,
    run: &RunSettings,
) -> Result<Calibrated, QuantError> {
    let (prepared, preparation, enabled, mut candidates) = prepare_layers(model, config)?;
    for c in &mut candidates {
        if c.quantizable && !enabled.iter().any(|l| l.name == c.node) {
            c.quantizable = false;
            c.note = Some("disabled by the configuration".into());
        }
    }
    let available = data.batch_count(run.batch_size);
    let batch_num = config.batches(available);
    if batch_num == 0 {
        return Err(QuantError::Input(format!(
            "the data gives no batch of {} sample(s) ({} samples); give more data or a smaller --batch-size",
            run.batch_size,
            data.samples()
        )));
    }
    if available < batch_num {
        return Err(QuantError::Input(format!(
            "batch_num is {batch_num} but the data gives only {available} batch(es) of {} sample(s) ({} samples); give more data, a smaller --batch-size or a smaller --batch-num",
            run.batch_size,
            data.samples()
        )));
    }
    let graph = crate::onnx::graph_of(&prepared, "the prepared model")?;
    let tensor_targets =
        resolve_tensors(graph, &config.tensor_quantize).map_err(QuantError::Input)?;
    let mut taps: Vec<String> = enabled
        .iter()
        .map(|l| l.act_input.clone())
        .chain(tensor_targets.iter().map(|(_, _, input)| input.clone()))
        .chain(enabled.iter().filter_map(|l| l.second_input.clone()))
        .collect();
    taps.sort();
    taps.dedup();
    let session = executor.prepare(
        &prepared,
        &SessionOptions {
            keep: taps.clone(),
            dynamic_batch: run.dynamic_batch,
            optimize: true,
        },
    )?;
    let tap_refs: Vec<&str> = taps.iter().map(String::as_str).collect();
    // Layers first, then tensor quantizations, then the second inputs of
    // two-input MatMuls: one observer each.
    let second_inputs: Vec<(usize, &str)> = enabled
        .iter()
        .enumerate()
        .filter_map(|(k, l)| Some((k, l.second_input.as_deref()?)))
        .collect();
    let tap_of_layer: Vec<usize> = enabled
        .iter()
        .map(|l| l.act_input.as_str())
        .chain(tensor_targets.iter().map(|(_, _, input)| input.as_str()))
        .chain(second_inputs.iter().map(|&(_, input)| input))
        .map(|input| {
            taps.iter()
                .position(|t| t == input)
                .expect("every input is tapped")
        })
        .collect();
    // Input second moments of the layers whose NUQ search uses the data.
    let mut moments: Vec<(usize, usize, InputMoments)> = enabled
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match config.layer(&l.name)?.wts_algo {
            WtsAlgo::Nuq(n) if n.num_of_iteration > 0 => {
                let map = nuq_map(graph, l).ok()?;
                Some((i, tap_of_layer[i], InputMoments::new(map.channels())))
            }
            _ => None,
        })
        .collect();
    let started = std::time::Instant::now();
    // DMQ layers: balance factors from a first pass over the per-channel input maxima.
    let balances = dmq_factors(
        graph,
        config,
        &enabled,
        session.as_ref(),
        data,
        run,
        &tap_refs,
        &tap_of_layer,
    )?;
    // What the model itself allows each observed value to be (a balanced
    // layer sees its input divided by its factors).
    let model_bounds = known_bounds(graph);
    let bound_of = |input: &str| model_bounds.get(input).copied().unwrap_or(Bounds::ANY);
    let mut bounds: Vec<Bounds> = enabled
        .iter()
        .zip(&balances)
        .map(|(l, bal)| match bal {
            Some((s, _)) => bound_of(&l.act_input).divided_by(s),
            None => bound_of(&l.act_input),
        })
        .chain(tensor_targets.iter().map(|(_, _, input)| bound_of(input)))
        .chain(second_inputs.iter().map(|&(_, input)| bound_of(input)))
        .collect();
    let algo_of = |l: &QuantLayer| {
        &config
            .layer(&l.name)
            .expect("enabled layers are configured")
            .act_algo
    };
    let mut observers: Vec<Box<dyn Observer>> = enabled
        .iter()
        .map(algo_of)
        .chain(config.tensor_quantize.iter().map(|t| &t.act_algo))
        .chain(second_inputs.iter().map(|&(k, _)| algo_of(&enabled[k])))
        .zip(&bounds)
        .map(|(algo, b)| algo.observer_within(*b))
        .collect();
    for b in 0..batch_num {
        let batch = data.batch(run.batch_size, b)?;
        check_finite(&batch, b)?;
        let values = run_batch(session.as_ref(), &batch, &tap_refs)?;
        // Extremes per tapped value, then every observer, both in parallel.
        let stats = values
            .par_iter()
            .zip(taps.par_iter())
            .map(|(t, name)| {
                let a = t.as_f32().ok_or_else(|| {
                    QuantError::Input(format!(
                        "activation '{name}' is {}, only float32 activations can be quantized",
                        t.dtype()
                    ))
                })?;
                let slice = a.as_slice().expect("engine outputs are contiguous");
                let (min, max) = finite_extremes(slice).map_err(|_| {
                    QuantError::Input(format!(
                        "activation '{name}' holds NaN or infinity in calibration batch {b}; the model overflows on this data"
                    ))
                })?;
                Ok((slice, min, max))
            })
            .collect::<Result<Vec<_>, QuantError>>()?;
        // A balanced layer sees its input divided by its factors.
        let balanced: Vec<Option<(Vec<f32>, f32, f32)>> = balances
            .par_iter()
            .enumerate()
            .map(|(k, bal)| {
                let (s, axes) = bal.as_ref()?;
                let t = tap_of_layer[k];
                let x = balance_input(stats[t].0, values[t].shape(), s, *axes)?;
                let (mn, mx) = finite_extremes(&x).ok()?;
                Some((x, mn, mx))
            })
            .collect();
        observers
            .par_iter_mut()
            .zip(tap_of_layer.par_iter())
            .enumerate()
            .for_each(
                |(k, (o, &t))| match balanced.get(k).and_then(Option::as_ref) {
                    Some((x, mn, mx)) => o.observe(x, *mn, *mx),
                    None => {
                        let (slice, min, max) = stats[t];
                        o.observe(slice, min, max);
                    }
                },
            );
        moments.par_iter_mut().for_each(|(k, t, m)| {
            match balanced.get(*k).and_then(Option::as_ref) {
                Some((x, _, _)) => m.observe(x, values[*t].shape()),
                None => m.observe(stats[*t].0, values[*t].shape()),
            }
        });
        (run.progress)(b + 1, batch_num);
    }
    let observed = started.elapsed().as_secs_f64();
    let second_observers = observers.split_off(enabled.len() + tensor_targets.len());
    let second_bounds = bounds.split_off(enabled.len() + tensor_targets.len());
    // A two-input MatMul's second operand: symmetric, its scale the layer's scale_w.
    let mut second_scale: Vec<Option<f32>> = vec![None; enabled.len()];
    for ((&(k, _), o), bound) in second_inputs
        .iter()
        .zip(&second_observers)
        .zip(&second_bounds)
    {
        let l = &enabled[k];
        let bits = config.layer(&l.name).map_or(8, |c| c.act_bits);
        let act = o
            .params(false, bits)
            .and_then(|a| bound.fit(a, false, bits))
            .map_err(|e| {
                QuantError::Input(format!(
                    "layer '{}', second input: {e}; skip this layer in the config",
                    l.name
                ))
            })?;
        second_scale[k] = Some(act.scale);
    }
    let tensor_observers = observers.split_off(enabled.len());
    let tensor_bounds = bounds.split_off(enabled.len());
    let tensors = tensor_targets
        .into_iter()
        .zip(&config.tensor_quantize)
        .zip(tensor_observers.iter().zip(&tensor_bounds))
        .map(|(((node, op_type, input), t), (o, bound))| {
            let asymmetric = t.asymmetric.unwrap_or(config.activation_offset);
            let act = o
                .params(asymmetric, 8)
                .and_then(|a| bound.fit(a, asymmetric, 8))
                .map_err(|e| QuantError::Input(format!("tensor_quantize '{}': {e}", t.key())))?;
            Ok(TensorFactors {
                key: t.key(),
                node,
                op_type,
                input_index: t.input_index,
                input,
                act,
            })
        })
        .collect::<Result<Vec<_>, QuantError>>()?;
    let graph = crate::onnx::graph_of(&prepared, "the prepared model")?;
    let means: Vec<Option<Vec<f64>>> = (0..enabled.len())
        .map(|i| {
            moments
                .iter()
                .find(|(l, _, _)| *l == i)
                .map(|(_, _, m)| m.mean())
        })
        .collect();
    // Factor searches (IFMR, HFMG) and weight quantization are independent per layer.
    let factors = enabled
        .into_par_iter()
        .zip(observers.par_iter())
        .zip(means.par_iter().zip(&second_scale))
        .zip(balances.into_par_iter().zip(bounds.par_iter()))
        .map(|(((l, o), (mean, second)), (balance, bound))| {
            let lc = config.layer(&l.name).ok_or_else(|| {
                QuantError::Input(format!("layer '{}' has no configuration", l.name))
            })?;
            // Ascend quantizes both inputs of a two-input MatMul symmetrically.
            let asymmetric = config.asymmetric(lc) && l.second_input.is_none();
            let act = o
                .params(asymmetric, lc.act_bits)
                .and_then(|a| bound.fit(a, asymmetric, lc.act_bits))
                .map_err(|e| {
                    QuantError::Input(format!(
                        "layer '{}': {e}; skip this layer in the config",
                        l.name
                    ))
                })?;
            let scales = match second {
                Some(s) => WeightScales::Given(vec![*s]),
                None => WeightScales::Arq {
                    channel_wise: lc.channel_wise,
                    bits: lc.wts_bits,
                },
            };
            let mut f = weigh(graph, l, act, scales, balance.map(|(s, _)| s))?;
            if let WtsAlgo::Nuq(settings) = lc.wts_algo {
                apply_nuq(graph, &mut f, settings, mean.as_deref())?;
            }
            Ok(f)
        })
        .collect::<Result<Vec<_>, QuantError>>()?;
    let mut factors = factors;
    let which: Vec<(usize, AdaSettings)> = factors
        .iter()
        .enumerate()
        .filter_map(|(i, f)| match config.layer(&f.layer.name)?.wts_algo {
            WtsAlgo::Ada(s) => Some((i, s)),
            _ => None,
        })
        .collect();
    let adaround = adaround_layers(
        &crate::sim::CpuExecutor,
        &prepared,
        &mut factors,
        &which,
        data,
        run,
    )?;
    Ok(Calibrated {
        prepared,
        preparation,
        candidates,
        factors,
        tensors,
        adaround,
        batches_used: batch_num,
        seconds: observed,
        fp16_quant: config.fp16_quant,
    })
}

/// A layer's DMQ factors and where its input channels sit.
type Balance = (Vec<f32>, ChannelAxes);

/// The DMQ factors (and input-channel layout) of every enabled layer that
/// asks for balancing, from one pass over the calibration batches collecting
/// each input channel's largest magnitude; `None` for the other layers.
#[allow(clippy::too_many_arguments)]
fn dmq_factors(
    graph: &crate::onnx::GraphProto,
    config: &QuantConfig,
    enabled: &[QuantLayer],
    session: &dyn crate::sim::Session,
    data: &Dataset,
    run: &RunSettings,
    taps: &[&str],
    tap_of_layer: &[usize],
) -> Result<Vec<Option<Balance>>, QuantError> {
    let mut maxima: Vec<Option<(ChannelMax, f32)>> = enabled
        .iter()
        .map(|l| {
            let alpha = config.layer(&l.name)?.dmq?;
            Some((ChannelMax::new(ChannelAxes::of(graph, l)?), alpha))
        })
        .collect();
    if maxima.iter().all(Option::is_none) {
        return Ok(vec![None; enabled.len()]);
    }
    // Layers whose strength is searched keep a sample of their input rows.
    let mut samples: Vec<Option<RowSample>> = enabled
        .iter()
        .zip(&maxima)
        .map(|(l, m)| {
            let (m, _) = m.as_ref()?;
            let searched = config.layer(&l.name)?.dmq_search;
            match ChannelAxes::of(graph, l)? {
                ChannelAxes::LastAxis { k } if searched && m.max.len() == k => {
                    Some(RowSample::new(k, SAMPLE_ROWS))
                }
                _ => None,
            }
        })
        .collect();
    let batches = config.batches(data.batch_count(run.batch_size));
    for b in 0..batches {
        let batch = data.batch(run.batch_size, b)?;
        let values = run_batch(session, &batch, taps)?;
        for (k, (m, sample)) in maxima.iter_mut().zip(&mut samples).enumerate() {
            if let Some((m, _)) = m
                && let Some(x) = values[tap_of_layer[k]].as_f32()
                && let Some(slice) = x.as_slice()
            {
                m.observe(slice, x.shape());
                if let Some(sample) = sample {
                    sample.observe(slice, batches);
                }
            }
        }
    }
    enabled
        .par_iter()
        .zip(maxima)
        .zip(samples)
        .map(|((l, m), sample)| {
            let Some((m, alpha)) = m else {
                return Ok(None);
            };
            let Some(w) = l
                .weight
                .as_deref()
                .map(|w| crate::onnx::graph::initializer_f32(graph, w))
                .transpose()?
                .flatten()
            else {
                return Ok(None);
            };
            let axes = ChannelAxes::of(graph, l).expect("checked when collecting");
            let lc = config.layer(&l.name).expect("checked when collecting");
            let settings = SearchSettings {
                algo: &lc.act_algo,
                asymmetric: config.asymmetric(lc),
                act_bits: lc.act_bits,
                wts_bits: lc.wts_bits,
                layout: if lc.channel_wise {
                    l.channel_layout
                } else {
                    ChannelLayout::PerTensor
                },
            };
            let alpha =
                match sample.and_then(|s| dmq_search::choose(&l.name, &s, &m.max, &w, &settings)) {
                    Some(choice) => match choice.alpha {
                        Some(a) => a,
                        None => return Ok(None),
                    },
                    None => alpha,
                };
            Ok(Some((balance_factors(&m.max, &w, axes, alpha), axes)))
        })
        .collect()
}

/// Prepares `model` as `config` says (BN folding) and finds its layers:
/// the prepared model, what preparation did, the layers the configuration
/// enables, and every candidate's verdict.
pub fn prepare_layers(
    model: ModelProto,
    config: &QuantConfig,
) -> Result<(ModelProto, Prepared, Vec<QuantLayer>, Vec<LayerCandidate>), QuantError> {
    // The fake-quant model needs Round and Clip with bound inputs (opset 11), as AMCT does.
    let opset = crate::onnx::default_opset(&model).unwrap_or(0);
    if opset < 11 {
        return Err(QuantError::Input(format!(
            "the model imports the default ONNX opset {opset}; quantization needs opset 11 or later (re-export the model with opset >= 11)"
        )));
    }
    let mut prepared = model;
    let preparation = prepare(&mut prepared, config.do_fusion, &config.skip_fusion_layers)?;
    let graph = crate::onnx::graph_of(&prepared, "the prepared model")?;
    let (layers, candidates) = discover(graph)?;
    let enabled: Vec<QuantLayer> = layers
        .into_iter()
        .filter(|l| config.layer(&l.name).is_some_and(|c| c.quant_enable))
        .collect();
    Ok((prepared, preparation, enabled, candidates))
}

fn check_finite(batch: &Batch, index: usize) -> Result<(), QuantError> {
    for (name, t) in batch {
        let bad = match t {
            Tensor::F32(a) => a.iter().any(|v| !v.is_finite()),
            Tensor::F64(a) => a.iter().any(|v| !v.is_finite()),
            _ => false,
        };
        if bad {
            return Err(QuantError::Input(format!(
                "calibration data for input '{name}' holds NaN or infinity in batch {index}; clean the data"
            )));
        }
    }
    Ok(())
}

fn run_batch(
    session: &dyn Session,
    batch: &Batch,
    fetch: &[&str],
) -> Result<Vec<Tensor>, QuantError> {
    let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Ok(session.run(&feeds, fetch)?)
}

/// How a layer's weight scales are chosen.
#[derive(Clone, Debug)]
pub enum WeightScales {
    /// ARQ: min/max of the weight, per output channel or per tensor.
    Arq {
        /// One scale per output channel.
        channel_wise: bool,
        /// Weight bits.
        bits: u32,
    },
    /// Given (from a record): one value, or one per output channel.
    Given(Vec<f32>),
}

/// Weight scales, int8 weight and int32 bias of one layer.
pub fn weigh(
    graph: &crate::onnx::GraphProto,
    layer: QuantLayer,
    act: ActParams,
    scales: WeightScales,
    balance: Option<Vec<f32>>,
) -> Result<LayerFactors, QuantError> {
    let init = |name: &str| -> Result<ArrayD<f32>, QuantError> {
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name() == name)
            .expect("layers only name initializers");
        match to_tensor(t)? {
            Tensor::F32(a) => Ok(a),
            other => Err(QuantError::Input(format!(
                "layer '{}': '{name}' is {}, only float32 weights are quantized",
                layer.name,
                other.dtype()
            ))),
        }
    };
    let Some(w_name) = layer.weight.clone() else {
        // A two-input MatMul's second operand scale plays the weight's part.
        let scale_w = match scales {
            WeightScales::Given(s) if layer.second_input.is_some() => s,
            _ => vec![1.0],
        };
        return Ok(LayerFactors {
            layer,
            act,
            scale_w,
            weight_q: None,
            bias_q: None,
            nuq: None,
            balance: None,
        });
    };
    let mut w = init(&w_name)?;
    if let Some(s) = &balance {
        let axes = ChannelAxes::of(graph, &layer).ok_or_else(|| {
            QuantError::Input(format!(
                "layer '{}': DMQ balancing does not apply to this {}",
                layer.name, layer.op_type
            ))
        })?;
        if s.len() != axes.channels() {
            return Err(QuantError::Input(format!(
                "layer '{}': {} balance factors for {} input channels",
                layer.name,
                s.len(),
                axes.channels()
            )));
        }
        w = balance_weight(&w, s, axes);
    }
    let (layout, scale_w, bits) = match scales {
        WeightScales::Arq { channel_wise, bits } => {
            let layout = if channel_wise {
                layer.channel_layout
            } else {
                ChannelLayout::PerTensor
            };
            (layout, arq_scales(&layer.name, &w, layout, bits)?, bits)
        }
        WeightScales::Given(scale_w) => {
            let layout = if scale_w.len() == 1 {
                ChannelLayout::PerTensor
            } else {
                layer.channel_layout
            };
            if scale_w.len() != layout.channels() {
                return Err(QuantError::Input(format!(
                    "layer '{}': {} weight scales given, the weight has {} output channels",
                    layer.name,
                    scale_w.len(),
                    layout.channels()
                )));
            }
            (layout, scale_w, 8)
        }
    };
    let weight_q = quantize_weight(&w, &scale_w, layout, bits);
    let bias_q = match &layer.bias {
        Some(b) => {
            let b = init(b)?;
            Some(quantize_bias(
                &layer.name,
                b.as_slice().expect("standard layout"),
                &scale_w,
                act.scale,
            )?)
        }
        None => None,
    };
    Ok(LayerFactors {
        layer,
        act,
        scale_w,
        weight_q: Some(weight_q),
        bias_q,
        nuq: None,
        balance,
    })
}
