//! Writes the two quantized models from a prepared float model and the
//! factors of each layer, in the deploy format of `docs/deploy-format.md`
//! (whose operators, attributes, `deq_scale` packing and names come from
//! [`crate::deploy_format`]):
//!
//! * deploy: `AscendQuant -> layer(int8 weight, int32 bias) -> AscendDequant`;
//! * fake-quant: the same graph with standard operators only
//!   (`Mul, Round, Add, Clip, Sub` for the quantization, `Mul` for the
//!   dequantization, integer-valued float weights and bias).
//!
//! Choices the format leaves open, and what we do:
//! * The deploy model keeps the model's own default-domain opset version
//!   (AMCT rewrites it to 11); changing the version would change the meaning
//!   of other operators (Softmax, Squeeze, ReduceMean... were redefined after 11),
//!   and ATC registers the Ascend ops for opsets 8 to 22. Imports of domains
//!   that no node uses are dropped, so a normal model ends with exactly one.
//! * Every rewritten layer's output value keeps its name, now produced by the
//!   dequantization; the layer itself writes `<layer>_output0`.

use super::dmq::ChannelAxes;
use super::layers::QuantLayer;
use super::params::{ActParams, int_range};
use super::tensor_quant::TensorFactors;
use super::weights::{ChannelLayout, NuqSummary, dequantize_weight};
use crate::deploy_format::{
    ASCEND_ANTI_QUANT, ASCEND_DEQUANT, ASCEND_QUANT, AntiQuantAttrs, QuantAttrs, deq_factor,
    dequant_attributes, names, pack_deq_scale,
};
use crate::onnx::builder::{constant, constant_f32, node, set_initializer_input};
use crate::onnx::graph::sort_topologically;
use crate::onnx::proto::OperatorSetIdProto;
use crate::onnx::{GraphProto, ModelProto, NodeProto, OnnxError, Storage, to_proto};
use crate::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};
use std::collections::{HashMap, HashSet};

/// Everything decided for one layer.
#[derive(Clone, Debug)]
pub struct LayerFactors {
    /// The layer in the prepared model.
    pub layer: QuantLayer,
    /// Activation factors.
    pub act: ActParams,
    /// Weight scales (one, or one per output channel; `[1.0]` for AveragePool).
    pub scale_w: Vec<f32>,
    /// The int8 weight.
    pub weight_q: Option<ArrayD<i8>>,
    /// The int32 bias.
    pub bias_q: Option<Vec<i32>>,
    /// What NUQ did to the weight (asked for, whether applied or not).
    pub nuq: Option<NuqSummary>,
    /// DMQ balancing factors per input channel: the input is divided by
    /// them before quantization and the weight was multiplied by them.
    pub balance: Option<Vec<f32>>,
}

impl LayerFactors {
    /// `float32(scale_w[c] * scale_d)` per channel.
    pub fn deq_scales(&self) -> Vec<f32> {
        self.scale_w
            .iter()
            .map(|&s| deq_factor(s, self.act.scale))
            .collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Deploy,
    FakeQuant,
    /// Float weights and QuantizeLinear/DequantizeLinear pairs: the same
    /// arithmetic as the fake-quant model up to float rounding, in fewer,
    /// faster operators; used internally to measure similarity.
    Simulation,
    /// The simulation's dequantized weights and bias, with float
    /// activations: the weights' share of the error, for error analysis.
    WeightOnly,
}

/// The deploy model for ATC.
pub fn deploy_model(
    prepared: &ModelProto,
    factors: &[LayerFactors],
) -> Result<ModelProto, OnnxError> {
    emit(prepared, factors, Flavor::Deploy)
}

/// The fake-quant model for onnxruntime.
pub fn fake_quant_model(
    prepared: &ModelProto,
    factors: &[LayerFactors],
) -> Result<ModelProto, OnnxError> {
    emit(prepared, factors, Flavor::FakeQuant)
}

/// The two models a run writes, the deploy model and the fake-quant model,
/// with `tensors`' quantizations added and, when `fp16_quant`, AMCT's
/// FORCE_FP16_QUANT applied (`super::fp16_quant`).
pub fn deploy_and_fake_quant(
    prepared: &ModelProto,
    factors: &[LayerFactors],
    tensors: &[TensorFactors],
    fp16_quant: bool,
) -> Result<(ModelProto, ModelProto), OnnxError> {
    let mut deploy = deploy_model(prepared, factors)?;
    add_tensor_quantization(&mut deploy, tensors, ModelKind::Deploy)?;
    let mut fake = fake_quant_model(prepared, factors)?;
    add_tensor_quantization(&mut fake, tensors, ModelKind::FakeQuant)?;
    if fp16_quant {
        super::fp16_quant::apply_to_deploy(&mut deploy);
        super::fp16_quant::apply_to_fake_quant(&mut fake);
    }
    Ok((deploy, fake))
}

/// A model computing what the fake-quant model computes (up to float
/// rounding) with standard QDQ operators and dequantized float weights.
pub fn simulation_model(
    prepared: &ModelProto,
    factors: &[LayerFactors],
) -> Result<ModelProto, OnnxError> {
    emit(prepared, factors, Flavor::Simulation)
}

/// The prepared model with these layers' weights and biases replaced by
/// their dequantized int8 / int32 values and activations left in float:
/// the weights' share of the quantization error.
pub fn weight_only_model(
    prepared: &ModelProto,
    factors: &[LayerFactors],
) -> Result<ModelProto, OnnxError> {
    emit(prepared, factors, Flavor::WeightOnly)
}

fn emit(
    prepared: &ModelProto,
    factors: &[LayerFactors],
    flavor: Flavor,
) -> Result<ModelProto, OnnxError> {
    let mut model = prepared.clone();
    let graph = model.graph.as_mut().ok_or_else(|| OnnxError::NoGraph {
        path: "the prepared model".into(),
    })?;
    let mut added: Vec<NodeProto> = Vec::new();
    // (input value, scale bits, offset) -> quantized value, so layers sharing an input share one quantization.
    let mut quantized: HashMap<(String, u32, i32), String> = HashMap::new();
    for f in factors {
        let l = &f.layer;
        // DMQ: the input divided by the balance factors (the weight holds them).
        let input = match &f.balance {
            Some(factors) => {
                let axes = ChannelAxes::of(graph, l).ok_or_else(|| OnnxError::Invalid {
                    node: l.name.clone(),
                    reason: "DMQ balance factors on a layer without a weight DMQ can balance"
                        .into(),
                })?;
                let constant = names::balance_factor(&l.name);
                let out = format!("{}.output", names::balance_mul(&l.name));
                added.push(constant_f32(
                    &constant,
                    &format!("{constant}.value"),
                    &axes.factor_shape(l.output_rank),
                    factors.iter().map(|v| 1.0 / v).collect(),
                ));
                added.push(node(
                    "Mul",
                    &names::balance_mul(&l.name),
                    &[&l.act_input, &format!("{constant}.value")],
                    &[&out],
                    vec![],
                ));
                out
            }
            None => l.act_input.clone(),
        };
        graph.node[l.node].input[0] = input.clone();
        if flavor != Flavor::WeightOnly {
            let key = (input.clone(), f.act.scale.to_bits(), f.act.offset);
            let q_out = match quantized.get(&key) {
                Some(q) => q.clone(),
                None => {
                    let q = quant_nodes(&mut added, &l.name, &input, &f.act, flavor);
                    quantized.insert(key, q.clone());
                    q
                }
            };
            graph.node[l.node].input[0] = q_out;
        }
        if let Some(second) = &l.second_input {
            // The second operand of a two-input MatMul: symmetric, scale_w.
            let act = ActParams {
                scale: f.scale_w[0],
                offset: 0,
            };
            let key = (second.clone(), act.scale.to_bits(), 0);
            let q_out = match quantized.get(&key) {
                Some(q) => q.clone(),
                None => {
                    let base = names::second_operand(&l.name);
                    let q = quant_nodes(&mut added, &base, second, &act, flavor);
                    quantized.insert(key, q.clone());
                    q
                }
            };
            graph.node[l.node].input[1] = q_out;
        }
        if let Some(wq) = &f.weight_q {
            let value = match flavor {
                Flavor::Deploy => Tensor::I8(wq.clone()),
                Flavor::FakeQuant => Tensor::F32(wq.mapv(f32::from)),
                Flavor::Simulation | Flavor::WeightOnly => {
                    let layout = if f.scale_w.len() == 1 {
                        ChannelLayout::PerTensor
                    } else {
                        l.channel_layout
                    };
                    Tensor::F32(dequantize_weight(wq, &f.scale_w, layout))
                }
            };
            set_initializer_input(
                graph,
                l.node,
                1,
                &names::weight(&l.name),
                &value,
                Storage::Raw,
            );
        }
        if let Some(bq) = &f.bias_q {
            let dims = IxDyn(&[bq.len()]);
            let (value, storage) = match flavor {
                Flavor::Deploy => (
                    Tensor::I32(ArrayD::from_shape_vec(dims, bq.clone()).expect("1-D")),
                    Storage::Typed,
                ),
                Flavor::FakeQuant => (
                    Tensor::F32(
                        ArrayD::from_shape_vec(dims, bq.iter().map(|&v| v as f32).collect())
                            .expect("1-D"),
                    ),
                    Storage::Raw,
                ),
                Flavor::Simulation | Flavor::WeightOnly => {
                    let deq = f.deq_scales();
                    let at = |c: usize| deq[if deq.len() == 1 { 0 } else { c }];
                    let values = bq
                        .iter()
                        .enumerate()
                        .map(|(c, &v)| v as f32 * at(c))
                        .collect();
                    (
                        Tensor::F32(ArrayD::from_shape_vec(dims, values).expect("1-D")),
                        Storage::Raw,
                    )
                }
            };
            let (node, input) = match l.bias_add {
                Some(add) => {
                    // `Add(bias, matmul)` becomes `Add(matmul, bias)`: one form to emit and lower.
                    let between = &graph.node[l.node].output[0];
                    if graph.node[add].input.first() != Some(between) {
                        graph.node[add].input.swap(0, 1);
                    }
                    (add, 1)
                }
                None => (l.node, 2),
            };
            set_initializer_input(graph, node, input, &names::bias(&l.name), &value, storage);
        }
        if l.bias_add.is_some() {
            // The value between the layer and its bias Add is now an integer.
            let between = graph.node[l.node].output[0].clone();
            graph.value_info.retain(|v| v.name() != between);
        }
        if matches!(flavor, Flavor::Simulation | Flavor::WeightOnly) {
            continue; // weights and bias are already in float units: no dequantization
        }
        let producer = l.bias_add.unwrap_or(l.node);
        let int_out = names::int_output(&l.name);
        graph.node[producer].output[0] = int_out.clone();
        dequant_nodes(graph, &mut added, f, &int_out, flavor);
    }
    graph.node.extend(added);
    sort_topologically(graph)?;
    if flavor == Flavor::Deploy {
        let used: HashSet<&str> = graph
            .node
            .iter()
            .map(|n| n.domain())
            .filter(|d| !d.is_empty() && *d != "ai.onnx")
            .collect();
        let default_version = model
            .opset_import
            .iter()
            .find(|o| o.domain().is_empty() || o.domain() == "ai.onnx")
            .and_then(|o| o.version)
            .unwrap_or(11);
        let mut imports = vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(default_version),
        }];
        imports.extend(
            model
                .opset_import
                .iter()
                .filter(|o| used.contains(o.domain()))
                .cloned(),
        );
        model.opset_import = imports;
    }
    Ok(model)
}

/// Adds the quantization of `input` under the names of `base` (a layer);
/// returns the quantized value's name.
fn quant_nodes(
    added: &mut Vec<NodeProto>,
    base: &str,
    input: &str,
    act: &ActParams,
    flavor: Flavor,
) -> String {
    let attrs = QuantAttrs::from_factors(act.scale, act.offset);
    let (inv, offset) = (attrs.scale, attrs.offset);
    match flavor {
        Flavor::Deploy => {
            let out = names::quant_output(base);
            added.push(node(
                ASCEND_QUANT,
                &names::quant_node(base),
                &[input],
                &[&out],
                attrs.to_attributes(),
            ));
            out
        }
        Flavor::Simulation | Flavor::WeightOnly => {
            let base = names::qdq_prefix(base);
            let p = |n: &str| format!("{base}.{n}");
            let zp = Tensor::I8(ArrayD::from_elem(IxDyn(&[]), act.offset as i8));
            added.push(constant_f32(
                &p("scale"),
                &p("scale.value"),
                &[],
                vec![act.scale],
            ));
            added.push(constant(&p("zero_point"), &p("zero_point.value"), &zp));
            let (s, z) = (p("scale.value"), p("zero_point.value"));
            added.push(node(
                "QuantizeLinear",
                &p("quantize"),
                &[input, &s, &z],
                &[&p("q")],
                vec![],
            ));
            added.push(node(
                "DequantizeLinear",
                &p("dequantize"),
                &[&p("q"), &s, &z],
                &[&p("output")],
                vec![],
            ));
            p("output")
        }
        Flavor::FakeQuant => {
            let p = names::fake_quant_prefix(base);
            let (lo, hi) = int_range(8);
            let c = |n: &str| format!("{p}.{n}");
            added.push(constant_f32(&c("scale"), &c("scale.value"), &[], vec![inv]));
            added.push(constant_f32(
                &c("offset"),
                &c("offset.value"),
                &[],
                vec![offset],
            ));
            added.push(constant_f32(
                &c("min_val"),
                &c("min_val.value"),
                &[],
                vec![lo as f32],
            ));
            added.push(constant_f32(
                &c("max_val"),
                &c("max_val.value"),
                &[],
                vec![hi as f32],
            ));
            added.push(node(
                "Mul",
                &c("mul"),
                &[input, &c("scale.value")],
                &[&c("mul.output")],
                vec![],
            ));
            added.push(node(
                "Round",
                &c("round"),
                &[&c("mul.output")],
                &[&c("round.output")],
                vec![],
            ));
            added.push(node(
                "Add",
                &c("add"),
                &[&c("round.output"), &c("offset.value")],
                &[&c("add.output")],
                vec![],
            ));
            added.push(node(
                "Clip",
                &c("clip"),
                &[&c("add.output"), &c("min_val.value"), &c("max_val.value")],
                &[&c("clip.output")],
                vec![],
            ));
            added.push(node(
                "Sub",
                &c("sub"),
                &[&c("clip.output"), &c("offset.value")],
                &[&c("sub.output")],
                vec![],
            ));
            c("sub.output")
        }
    }
}

/// Which of the three models a tensor quantization is added to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// The deploy model: `AscendQuant → AscendAntiQuant`.
    Deploy,
    /// The fake-quant model: the quantization chain, then `Mul(scale_d)`.
    FakeQuant,
    /// The internal similarity model: `QuantizeLinear → DequantizeLinear`.
    Simulation,
}

/// Adds tensor quantizations (inputs of MaxPool / Add) to a model that
/// [`deploy_model`], [`fake_quant_model`] or [`simulation_model`] wrote, as
/// `kind` says; the node then reads the round-tripped value.
pub fn add_tensor_quantization(
    model: &mut ModelProto,
    tensors: &[TensorFactors],
    kind: ModelKind,
) -> Result<(), OnnxError> {
    if tensors.is_empty() {
        return Ok(());
    }
    let graph = model.graph.as_mut().ok_or_else(|| OnnxError::NoGraph {
        path: "the quantized model".into(),
    })?;
    let flavor = match kind {
        ModelKind::Deploy => Flavor::Deploy,
        ModelKind::FakeQuant => Flavor::FakeQuant,
        ModelKind::Simulation => Flavor::Simulation,
    };
    let mut added = Vec::new();
    for t in tensors {
        let Some(consumer) = graph.node.iter().position(|n| n.name() == t.node) else {
            continue; // resolved against the same prepared graph; cannot happen
        };
        let base = names::tensor_base(&t.node, t.input_index);
        let q = quant_nodes(&mut added, &base, &t.input, &t.act, flavor);
        let back = match kind {
            ModelKind::Simulation => q,
            ModelKind::Deploy => {
                let out = names::anti_quant_output(&base);
                added.push(node(
                    ASCEND_ANTI_QUANT,
                    &names::anti_quant_node(&base),
                    &[&q],
                    &[&out],
                    AntiQuantAttrs::from_factors(t.act.scale, t.act.offset).to_attributes(),
                ));
                out
            }
            ModelKind::FakeQuant => {
                // The chain already removed the offset: only the scale is left.
                let p = format!("{}.fakequant", names::anti_quant_node(&base));
                added.push(constant_f32(
                    &format!("{p}.scale"),
                    &format!("{p}.scale.value"),
                    &[],
                    vec![t.act.scale],
                ));
                let out = format!("{p}.mul.output");
                added.push(node(
                    "Mul",
                    &format!("{p}.mul"),
                    &[&q, &format!("{p}.scale.value")],
                    &[&out],
                    vec![],
                ));
                out
            }
        };
        graph.node[consumer].input[t.input_index] = back;
    }
    graph.node.extend(added);
    sort_topologically(graph)
}

/// Adds the dequantization from `int_out` to the layer's original output name.
fn dequant_nodes(
    graph: &mut GraphProto,
    added: &mut Vec<NodeProto>,
    f: &LayerFactors,
    int_out: &str,
    flavor: Flavor,
) {
    let l = &f.layer;
    let deq = f.deq_scales();
    match flavor {
        Flavor::Deploy => {
            let param = names::dequant_param(&l.name);
            let packed = ArrayD::from_shape_vec(
                IxDyn(&[deq.len()]),
                deq.iter().map(|&d| pack_deq_scale(d)).collect(),
            )
            .expect("1-D");
            graph
                .initializer
                .push(to_proto(&param, &Tensor::U64(packed), Storage::Typed));
            added.push(node(
                ASCEND_DEQUANT,
                &names::dequant_node(&l.name),
                &[int_out, &param],
                &[&l.output],
                dequant_attributes(),
            ));
        }
        Flavor::FakeQuant => {
            let p = names::fake_dequant_prefix(&l.name);
            let shape = l.channel_shape(deq.len());
            added.push(constant_f32(
                &format!("{p}.scale"),
                &format!("{p}.scale.value"),
                &shape,
                deq,
            ));
            added.push(node(
                "Mul",
                &format!("{p}.mul"),
                &[int_out, &format!("{p}.scale.value")],
                &[&l.output],
                vec![],
            ));
        }
        Flavor::Simulation | Flavor::WeightOnly => {}
    }
}
