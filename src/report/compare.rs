//! Layer-by-layer comparison of a float model with its quantized version
//! (fake-quant or deploy, the latter through the simulator's integer path).

use crate::data::Dataset;
use crate::deploy_format::{ASCEND_QUANT, QuantAttrs, names};
use crate::onnx::{GraphProto, ModelProto, NodeProto, graph_of, to_tensor};
use crate::quant::error::QuantError;
use crate::quant::layers::QUANTIZABLE_OPS;
use crate::quant::observe::histogram::Histogram;
use crate::quant::params::ActParams;
use crate::sim::{Executor, SessionOptions};
use crate::similarity::Similarity;
use crate::tensor::Tensor;
use serde::Serialize;
use std::collections::HashSet;

/// How one layer's output differs between the two models.
#[derive(Clone, Debug, Serialize)]
pub struct LayerDiff {
    /// The layer (node) name.
    pub name: String,
    /// Its operator.
    pub op_type: String,
    /// Whether the quantized model quantizes it.
    pub quantized: bool,
    /// Cosine similarity of the outputs.
    pub cosine: f64,
    /// ‖quant − float‖ / ‖float‖.
    pub relative_l2: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
}

/// How one model output differs between the two models, sample by sample.
#[derive(Clone, Debug, Serialize)]
pub struct OutputDiff {
    /// The output's name.
    pub name: String,
    /// Mean over the samples of each sample's cosine similarity.
    pub cosine_mean: f64,
    /// The lowest sample's cosine similarity.
    pub cosine_min: f64,
    /// For a `[samples, features]` output (embeddings, logits): the share
    /// of samples whose most similar other sample is the float model's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nn_agreement: Option<f64>,
}

/// Values of `[samples, features]` outputs kept for the nearest-neighbour
/// agreement, at most (per model and output).
const MAX_EMBEDDING_VALUES: usize = 1 << 24;

/// Per-sample cosines of one output, and its rows while they fit.
#[derive(Default)]
struct OutputAccumulator {
    cosines: Vec<f64>,
    rows: Option<(Vec<f32>, Vec<f32>, usize)>,
}

impl OutputAccumulator {
    fn add(&mut self, float: &ndarray::ArrayD<f32>, quant: &ndarray::ArrayD<f32>) {
        if float.shape() != quant.shape() || float.ndim() == 0 {
            return;
        }
        for (f, q) in float.outer_iter().zip(quant.outer_iter()) {
            let mut s = Similarity::default();
            s.add(f.iter(), q.iter());
            self.cosines.push(s.cosine());
        }
        if float.ndim() == 2 {
            let width = float.shape()[1];
            let rows = self
                .rows
                .get_or_insert_with(|| (Vec::new(), Vec::new(), width));
            if rows.2 == width && rows.0.len() + float.len() <= MAX_EMBEDDING_VALUES {
                rows.0.extend(float.iter());
                rows.1.extend(quant.iter());
            } else {
                rows.2 = 0; // too many, or widths differ: no agreement
            }
        }
    }

    fn finish(self, name: String) -> OutputDiff {
        let n = self.cosines.len().max(1) as f64;
        let nn_agreement =
            self.rows
                .filter(|r| r.2 > 0 && r.0.len() / r.2 >= 2)
                .map(|(f, q, w)| {
                    let shape = ndarray::IxDyn(&[f.len() / w, w]);
                    let f = ndarray::ArrayD::from_shape_vec(shape.clone(), f).expect("whole rows");
                    let q = ndarray::ArrayD::from_shape_vec(shape, q).expect("whole rows");
                    super::metric::neighbour_agreement(&q, &f)
                });
        OutputDiff {
            name,
            cosine_mean: self.cosines.iter().sum::<f64>() / n,
            cosine_min: self.cosines.iter().copied().fold(f64::INFINITY, f64::min),
            nn_agreement,
        }
    }
}

/// The float input distribution of one layer and the range its quantization keeps.
#[derive(Clone, Debug, Serialize)]
pub struct ActivationHistogram {
    /// The layer.
    pub layer: String,
    /// Lower edge of the histogram.
    pub lo: f32,
    /// Upper edge.
    pub hi: f32,
    /// Counts per bin.
    pub counts: Vec<f64>,
    /// The quantization's representable range, when the layer is quantized.
    pub clip: Option<(f32, f32)>,
}

/// The whole comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// Per float32 model output both models have.
    pub outputs: Vec<OutputDiff>,
    /// Per layer, worst cosine first.
    pub layers: Vec<LayerDiff>,
    /// The chosen layer's input histogram.
    pub histogram: Option<ActivationHistogram>,
    /// Samples compared.
    pub samples: usize,
    /// Where the error comes from (`--analyze`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub analysis: Option<super::analyze::Analysis>,
}

/// Activation scale and offset of `layer` in a quantized model, read from
/// its AscendQuant node or from the fake-quant constants.
fn act_factors(g: &GraphProto, layer: &str) -> Option<(f32, f32)> {
    // The node that quantizes the layer's input (possibly shared with another layer).
    let layer_node = g.node.iter().find(|n| n.name() == layer)?;
    let input = layer_node.input.first()?;
    let producer = g.node.iter().find(|n| n.output.contains(input))?;
    if producer.op_type() == ASCEND_QUANT {
        let a = QuantAttrs::read(producer).ok()?;
        return Some((a.scale_d(), a.offset));
    }
    // A fake-quant chain ends in <its layer>.quant.fakequant.sub; the
    // chain's constants are named after the layer that owns it.
    let owner = names::layer_of_fake_quant_sub(producer.name())?;
    let prefix = names::fake_quant_prefix(owner);
    let constant = |suffix: &str| -> Option<f32> {
        let c = g
            .node
            .iter()
            .find(|n| n.name() == format!("{prefix}.{suffix}"))?;
        match to_tensor(c.attribute.first()?.t.as_ref()?).ok()? {
            Tensor::F32(a) => a.iter().next().copied(),
            _ => None,
        }
    };
    Some((1.0 / constant("scale")?, constant("offset")?))
}

/// The value carrying a layer's float result in the quantized model: the
/// output of its dequantization when it is quantized, else its own output.
fn compared_value(
    quant_names: &HashSet<String>,
    g: &GraphProto,
    node: &NodeProto,
) -> (String, bool) {
    for name in names::dequant_nodes(node.name()) {
        if let Some(d) = g.node.iter().find(|n| n.name() == name) {
            return (d.output[0].clone(), true);
        }
    }
    let out = node.output[0].clone();
    let quantized = quant_names.contains(&names::quant_node(node.name()));
    (out, quantized)
}

/// Compares every quantizable-type layer of `float` with `quant` on `data`;
/// `histogram_layer` (default: the worst quantized layer) gets an input histogram.
pub fn compare(
    executor: &dyn Executor,
    float: &ModelProto,
    quant: &ModelProto,
    data: &Dataset,
    batch_size: usize,
    dynamic_batch: bool,
    histogram_layer: Option<&str>,
) -> Result<Comparison, QuantError> {
    let fg = graph_of(float, "the float model")?;
    let qg = graph_of(quant, "the quantized model")?;
    let quant_names: HashSet<String> = qg.node.iter().map(|n| n.name().to_string()).collect();
    let quant_values: HashSet<&str> = qg
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    let layers: Vec<(&NodeProto, String, bool)> = fg
        .node
        .iter()
        .filter(|n| QUANTIZABLE_OPS.contains(&n.op_type()) && !n.name().is_empty())
        .map(|n| {
            let (value, q) = compared_value(&quant_names, qg, n);
            (n, value, q)
        })
        .filter(|(_, v, _)| quant_values.contains(v.as_str()))
        .collect();
    if let Some(h) = histogram_layer
        && !layers.iter().any(|(n, _, _)| n.name() == h)
    {
        return Err(QuantError::Input(format!(
            "--layer '{h}' is not a layer both models share"
        )));
    }
    // The model outputs both have, float32 ones (a sentence encoder's
    // embeddings, not its int64 token ids), fetched after the layers.
    let model_outputs: Vec<String> = fg
        .output
        .iter()
        .filter(|o| {
            crate::onnx::ValueSpec::from_proto(o)
                .elem_type
                .is_none_or(|t| t == 1)
                && qg.output.iter().any(|q| q.name() == o.name())
        })
        .map(|o| o.name().to_string())
        .collect();
    let mut values: Vec<String> = layers.iter().map(|(_, v, _)| v.clone()).collect();
    let layer_count = values.len();
    values.extend(model_outputs.iter().cloned());
    let inputs: Vec<String> = layers.iter().map(|(n, _, _)| n.input[0].clone()).collect();
    let mut float_keep = values.clone();
    float_keep.extend(inputs.iter().cloned());
    float_keep.sort();
    float_keep.dedup();
    let fs = executor.prepare(
        float,
        &SessionOptions {
            keep: float_keep.clone(),
            dynamic_batch,
            optimize: true,
        },
    )?;
    let qs = executor.prepare(
        quant,
        &SessionOptions {
            keep: values.clone(),
            dynamic_batch,
            optimize: true,
        },
    )?;
    let float_fetch: Vec<&str> = float_keep.iter().map(String::as_str).collect();
    let quant_fetch: Vec<&str> = values.iter().map(String::as_str).collect();
    let mut acc = vec![Similarity::default(); layers.len()];
    let mut out_acc: Vec<OutputAccumulator> = model_outputs
        .iter()
        .map(|_| OutputAccumulator::default())
        .collect();
    let mut hist_input: Option<(String, Histogram)> = None;
    let mut samples = 0;
    for b in 0..data.batch_count(batch_size) {
        let batch = data.batch(batch_size, b)?;
        samples += batch.first().map(|(_, t)| t.shape()[0]).unwrap_or(0);
        let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let fv = fs.run(&feeds, &float_fetch)?;
        let qv = qs.run(&feeds, &quant_fetch)?;
        let fval = |name: &str| &fv[float_keep.iter().position(|k| k == name).expect("kept")];
        for (k, a) in acc.iter_mut().enumerate() {
            let (Some(x), Some(y)) = (fval(&values[k]).as_f32(), qv[k].as_f32()) else {
                continue;
            };
            a.add(x.iter(), y.iter());
        }
        for (k, a) in out_acc.iter_mut().enumerate() {
            let name = &values[layer_count + k];
            if let (Some(x), Some(y)) = (fval(name).as_f32(), qv[layer_count + k].as_f32()) {
                a.add(x, y);
            }
        }
        let wanted = histogram_layer
            .map(String::from)
            .or_else(|| hist_input.as_ref().map(|(l, _)| l.clone()));
        if let Some(layer) = wanted {
            let idx = layers
                .iter()
                .position(|(n, _, _)| n.name() == layer)
                .expect("checked");
            if let Some(x) = fval(&inputs[idx]).as_f32() {
                let slice = x.as_slice().expect("contiguous");
                if let Ok((mn, mx)) = crate::quant::observe::finite_extremes(slice) {
                    let h =
                        hist_input.get_or_insert_with(|| (layer.clone(), Histogram::aligned(64)));
                    h.1.add(slice, mn, mx);
                }
            }
        }
    }
    let mut diffs: Vec<LayerDiff> = layers
        .iter()
        .zip(&acc)
        .map(|((n, _, q), a)| LayerDiff {
            name: n.name().to_string(),
            op_type: n.op_type().to_string(),
            quantized: *q,
            cosine: a.cosine(),
            relative_l2: a.relative_l2(),
            max_abs: a.max_abs(),
        })
        .collect();
    diffs.sort_by(|a, b| a.cosine.total_cmp(&b.cosine));
    // Without --layer, histogram the worst quantized layer: a second pass over up to 16 samples.
    if hist_input.is_none()
        && let Some(worst) = diffs.iter().find(|d| d.quantized).or(diffs.first())
    {
        let idx = layers
            .iter()
            .position(|(n, _, _)| n.name() == worst.name)
            .expect("listed");
        let mut h = Histogram::aligned(64);
        let mut seen = 0;
        for b in 0..data.batch_count(batch_size) {
            if seen >= 16 {
                break;
            }
            let batch = data.batch(batch_size, b)?;
            seen += batch.first().map(|(_, t)| t.shape()[0]).unwrap_or(0);
            let feeds: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let v = fs.run(&feeds, &[inputs[idx].as_str()])?;
            if let Some(slice) = v[0].as_f32().and_then(|x| x.as_slice())
                && let Ok((mn, mx)) = crate::quant::observe::finite_extremes(slice)
            {
                h.add(slice, mn, mx);
            }
        }
        hist_input = Some((worst.name.clone(), h));
    }
    let histogram = hist_input.map(|(layer, h)| ActivationHistogram {
        clip: act_factors(qg, &layer).map(|(scale, offset)| {
            ActParams {
                scale,
                offset: offset as i32,
            }
            .range(8)
        }),
        layer,
        lo: h.lo(),
        hi: h.hi(),
        counts: h.counts().to_vec(),
    });
    let outputs = out_acc
        .into_iter()
        .zip(model_outputs)
        .map(|(a, name)| a.finish(name))
        .collect();
    Ok(Comparison {
        outputs,
        layers: diffs,
        histogram,
        samples,
        analysis: None,
    })
}
