//! The work one sample costs, estimated before anything runs: the shapes of
//! the graph's values are propagated from the declared inputs (batch 1)
//! through the operators whose output shape follows from their attributes
//! and constant inputs, counting the values each node produces and the
//! multiply-adds of convolutions and matrix products. A value whose shape
//! cannot be told statically stops the count there (the figure is then a
//! lower bound). `docs/engine.md` (Work limits) gives the limits and how to
//! lift them.

use super::gemm::Gemm;
use super::window::Window;
use crate::onnx::attr::{int_attr, ints_attr};
use crate::onnx::graph::{GraphIndex, constant_ints};
use crate::onnx::{Dim, GraphProto, ModelProto, NodeProto, OnnxError, ValueSpec};
use std::collections::HashMap;

/// The most multiply-adds one sample may cost: 2^42 (4.4 · 10^12), beyond the
/// largest vision and language encoders a CPU calibrates (SAM ViT-H's image
/// encoder, ~1.5 · 10^12).
pub const MAX_MULTIPLY_ADDS: u64 = 1 << 42;

/// The most values the nodes may produce for one sample: 2^34 (64 GiB as
/// float32 if all were held at once), beyond any real model at batch 1.
pub const MAX_VALUES: u64 = 1 << 34;

/// The largest factor by which a convolution's or pool's padding may grow
/// the plane it reads when some pad is wider than the kernel's reach
/// (`dilation · (kernel − 1)`), i.e. when outputs see nothing but padding.
/// Real models pad within the reach (DeepLab's dilated 3×3 on a 1×1 map
/// grows it 1369-fold, within its reach of 36, and passes); a pad of a
/// million rows is a corrupted attribute.
pub const MAX_PAD_GROWTH: u64 = 1024;

/// The environment variable that turns these limits off.
pub const LIFT_VARIABLE: &str = "ASCEND_QUANT_NO_WORK_LIMIT";

/// What one sample costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Values the nodes produce (every output, summed).
    pub values: u64,
    /// Multiply-adds of Conv, Gemm and MatMul.
    pub multiply_adds: u64,
    /// Nodes whose output shape the estimate could not follow (their work,
    /// and that of what reads them, is not counted).
    pub unfollowed: usize,
}

/// Refuses a model whose sizes are absurd (`onnx::limits::check_sizes`)
/// or whose one sample costs too much ([`check_work`]).
pub fn check_model(model: &ModelProto) -> Result<(), OnnxError> {
    crate::onnx::limits::check_sizes(model, &check_node_sizes)?;
    check_work(model).map(drop)
}

/// Refuses a node whose window attributes or size-giving constant input
/// (a shape, repeats, sizes or pads) would be absurd, naming the node.
pub fn check_node_sizes(g: &GraphProto, n: &NodeProto) -> Result<(), OnnxError> {
    use crate::onnx::limits::{MAX_ELEMENTS, MAX_WINDOW, product, too_large};
    let label = |what: &str| format!("node '{}' ({}): {what}", n.name(), n.op_type());
    let window = super::window::WrittenWindow::of(n);
    for (key, v) in window.per_axis() {
        if let Some(&big) = v.iter().find(|x| x.unsigned_abs() > MAX_WINDOW as u64) {
            return Err(OnnxError::TooLarge {
                what: label(&format!("attribute {key} = {big}")),
                size: format!("{big} on one axis"),
                limit: format!("{MAX_WINDOW}"),
                hint: "check the model's attributes (a corrupted or mistyped value?)".into(),
            });
        }
    }
    // A padded window covers at least Π(pad_begin + pad_end + 1) positions.
    let padded = |pads: &[i64]| {
        let half = pads.len() / 2;
        product((0..half).map(|i| pads[i].max(0) + pads[i + half].max(0) + 1))
    };
    let sizes = [
        (window.pads.as_deref().map(padded), "the padded plane"),
        (
            window
                .kernel_shape
                .as_deref()
                .map(|k| product(k.iter().copied())),
            "the kernel window",
        ),
        (
            window
                .output_shape
                .as_deref()
                .map(|k| product(k.iter().copied())),
            "attribute output_shape",
        ),
    ];
    for (size, what) in sizes {
        if let Some(size) = size.filter(|&s| s > MAX_ELEMENTS) {
            return Err(too_large(label(what), size));
        }
    }
    let size_input = match n.op_type() {
        "ConstantOfShape" => Some((0, "the shape input")),
        "Expand" | "Reshape" => Some((1, "the shape input")),
        "Tile" => Some((1, "the repeats input")),
        "Resize" => Some((3, "the sizes input")),
        "Pad" => Some((1, "the pads input")),
        _ => None,
    };
    if let Some((input, what)) = size_input
        && let Some(v) = constant_ints(g, n, input)
    {
        let size = if n.op_type() == "Pad" {
            padded(&v)
        } else {
            product(v.iter().copied())
        };
        if size > MAX_ELEMENTS {
            return Err(too_large(label(what), size));
        }
    }
    Ok(())
}

/// Estimates the work of one sample of `model` and refuses it, naming the
/// node and the figures, past [`MAX_MULTIPLY_ADDS`], [`MAX_VALUES`] or
/// [`MAX_PAD_GROWTH`], unless [`LIFT_VARIABLE`] is set.
pub fn check_work(model: &ModelProto) -> Result<Work, OnnxError> {
    let lifted = std::env::var_os(LIFT_VARIABLE).is_some_and(|v| !v.is_empty() && v != "0");
    let Some(g) = model.graph.as_ref() else {
        return Ok(Work::default());
    };
    let mut shapes = input_shapes(g);
    let mut work = Work::default();
    let Ok(index) = GraphIndex::new(g) else {
        return Ok(work); // the graph's own checks name what is wrong
    };
    for &i in index.topological_order() {
        let n = &g.node[i];
        let Some(node_work) = node_work(g, n, &mut shapes) else {
            work.unfollowed += 1;
            continue;
        };
        if let Some((grown, plane)) = node_work.pad_growth
            && grown > MAX_PAD_GROWTH
            && !lifted
        {
            return Err(refusal(
                n,
                format!(
                    "this {}'s padding {:?} is wider than its kernel reaches and grows its {plane} plane {grown}-fold (real models pad within the kernel's reach)",
                    n.op_type(),
                    ints_attr(n, "pads").unwrap_or_default()
                ),
            ));
        }
        work.values = work.values.saturating_add(node_work.values);
        work.multiply_adds = work.multiply_adds.saturating_add(node_work.multiply_adds);
        if lifted {
            continue;
        }
        for (figure, limit, what) in [
            (
                work.multiply_adds,
                MAX_MULTIPLY_ADDS,
                "needs at least {} multiply-adds",
            ),
            (work.values, MAX_VALUES, "produces at least {} values"),
        ] {
            if figure > limit {
                let what = what.replace("{}", &format!("{:.2e}", figure as f64));
                return Err(refusal(
                    n,
                    format!(
                        "one sample {what} up to this {}, more than the limit of {:.2e}",
                        n.op_type(),
                        limit as f64
                    ),
                ));
            }
        }
    }
    Ok(work)
}

fn refusal(n: &NodeProto, why: String) -> OnnxError {
    OnnxError::Invalid {
        node: n.name().to_string(),
        reason: format!(
            "{why}; check the model's shapes and attributes (a corrupted value?), or set {LIFT_VARIABLE}=1 to run it anyway"
        ),
    }
}

/// Known shapes of the graph's values: declared inputs (batch 1 for a free
/// first axis) and initializers.
fn input_shapes(g: &GraphProto) -> HashMap<String, Vec<u64>> {
    let mut shapes = HashMap::new();
    for v in &g.input {
        let spec = ValueSpec::from_proto(v);
        let Some(dims) = spec.shape else { continue };
        let fixed: Option<Vec<u64>> = dims
            .iter()
            .enumerate()
            .map(|(axis, d)| match d {
                Dim::Fixed(n) => Some(*n as u64),
                _ if axis == 0 => Some(1),
                _ => None,
            })
            .collect();
        if let Some(f) = fixed {
            shapes.insert(spec.name, f);
        }
    }
    for t in &g.initializer {
        shapes.insert(
            t.name().to_string(),
            t.dims.iter().map(|&d| d.max(0) as u64).collect(),
        );
    }
    shapes
}

/// One node's figures, once its output shape is known.
struct NodeWork {
    values: u64,
    multiply_adds: u64,
    /// The padded plane's growth over the plane read, and that plane
    /// ("8×8"), when some pad is wider than the kernel's reach.
    pad_growth: Option<(u64, String)>,
}

fn product(dims: &[u64]) -> u64 {
    dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
}

/// Computes `n`'s output shape into `shapes` and returns its work; `None`
/// when an input's shape is unknown or the operator is not one this
/// estimate follows.
fn node_work(
    g: &GraphProto,
    n: &NodeProto,
    shapes: &mut HashMap<String, Vec<u64>>,
) -> Option<NodeWork> {
    let input = |k: usize| {
        n.input
            .get(k)
            .filter(|s| !s.is_empty())
            .and_then(|s| shapes.get(s))
            .cloned()
    };
    let x = input(0)?;
    let mut multiply_adds = 0u64;
    let mut pad_growth = None;
    let out: Vec<u64> = match n.op_type() {
        "Conv" | "MaxPool" | "AveragePool" | "LpPool" => {
            if x.len() < 3 {
                return None;
            }
            let spatial = x.len() - 2;
            // SAME padding or malformed attributes: the shape is not followed.
            let window = Window::parse(n, spatial).ok()?;
            let weight = if n.op_type() == "Conv" {
                Some(input(1)?)
            } else {
                None
            };
            let kernel: Vec<u64> = match &weight {
                Some(w) if w.len() == x.len() => w[2..].to_vec(),
                Some(_) => return None,
                None => window.kernel?.iter().map(|&k| k.max(1) as u64).collect(),
            };
            let as_i64 = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
            let pads = as_i64(&window.pads);
            let strides = as_i64(&window.strides);
            let dilations = as_i64(&window.dilations);
            if kernel.len() != spatial {
                return None;
            }
            let plane: Vec<u64> = x[2..].to_vec();
            let padded: Vec<u64> = (0..spatial)
                .map(|a| plane[a] + pads[a].max(0) as u64 + pads[a + spatial].max(0) as u64)
                .collect();
            let growth = product(&padded) / product(&plane).max(1);
            let past_reach = (0..spatial).any(|a| {
                let reach = dilations[a].max(1) * (kernel[a].max(1) as i64 - 1);
                pads[a] > reach || pads[a + spatial] > reach
            });
            let text = plane
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("×");
            if past_reach {
                pad_growth = Some((growth, text));
            }
            let mut out = vec![x[0], weight.as_ref().map_or(x[1], |w| w[0])];
            for a in 0..spatial {
                let reach = dilations[a].max(1) as u64 * (kernel[a].max(1) - 1) + 1;
                let stride = strides[a].max(1) as u64;
                out.push(padded[a].checked_sub(reach).map_or(0, |d| d / stride + 1));
            }
            if let Some(w) = &weight {
                multiply_adds = product(&out).saturating_mul(product(&w[1..]));
            }
            out
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let mut out = x.clone();
            out[2..].iter_mut().for_each(|d| *d = 1);
            out
        }
        "Gemm" => {
            let w = input(1)?;
            if x.len() != 2 || w.len() != 2 {
                return None;
            }
            let gemm = Gemm::parse(n).ok()?;
            let (m, k) = if gemm.trans_a {
                (x[1], x[0])
            } else {
                (x[0], x[1])
            };
            let cols = if gemm.trans_b { w[0] } else { w[1] };
            multiply_adds = m.saturating_mul(k).saturating_mul(cols);
            vec![m, cols]
        }
        "MatMul" => {
            let w = input(1)?;
            if x.len() < 2 || w.len() < 2 {
                return None;
            }
            let (rows, k, cols) = (x[x.len() - 2], x[x.len() - 1], w[w.len() - 1]);
            let mut out = if x.len() >= w.len() {
                x.clone()
            } else {
                w.clone()
            };
            let len = out.len();
            out[len - 2] = rows;
            out[len - 1] = cols;
            multiply_adds = product(&out).saturating_mul(k);
            out
        }
        "Relu" | "Sigmoid" | "Tanh" | "Clip" | "LeakyRelu" | "HardSigmoid" | "HardSwish"
        | "Elu" | "Selu" | "Softmax" | "LogSoftmax" | "BatchNormalization" | "Identity" | "Erf"
        | "Sqrt" | "Exp" | "Neg" | "Abs" | "Dropout" | "Cast" | "Round" | "Floor" | "Ceil"
        | "Gelu" | "LayerNormalization" | "QuantizeLinear" | "DequantizeLinear" | "PRelu" => {
            x.clone()
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Where" | "Equal" | "Greater"
        | "Less" => {
            let mut out = x.clone();
            for k in 1..n.input.len() {
                let y = input(k)?;
                let len = out.len().max(y.len());
                let at = |s: &[u64], i: usize| (i + s.len()).checked_sub(len).map_or(1, |j| s[j]);
                out = (0..len).map(|i| at(&out, i).max(at(&y, i))).collect();
            }
            out
        }
        "Flatten" => {
            let axis = int_attr(n, "axis").unwrap_or(1);
            let axis = if axis < 0 {
                axis + x.len() as i64
            } else {
                axis
            };
            let axis = usize::try_from(axis).ok().filter(|&a| a <= x.len())?;
            vec![product(&x[..axis]), product(&x[axis..])]
        }
        "Reshape" => {
            let target = constant_ints(g, n, 1)?;
            let total = product(&x);
            let mut out: Vec<u64> = target
                .iter()
                .enumerate()
                .map(|(i, &d)| match d {
                    0 => x.get(i).copied().unwrap_or(1),
                    d if d < 0 => 1,
                    d => d as u64,
                })
                .collect();
            if let Some(free) = target.iter().position(|&d| d < 0) {
                out[free] = total / product(&out).max(1);
            }
            out
        }
        "Transpose" => {
            let perm = ints_attr(n, "perm").unwrap_or_else(|| (0..x.len() as i64).rev().collect());
            perm.iter()
                .map(|&p| usize::try_from(p).ok().and_then(|p| x.get(p).copied()))
                .collect::<Option<Vec<u64>>>()?
        }
        "Concat" => {
            let axis = int_attr(n, "axis")?;
            let axis = usize::try_from(if axis < 0 {
                axis + x.len() as i64
            } else {
                axis
            })
            .ok()
            .filter(|&a| a < x.len())?;
            let mut out = x.clone();
            for k in 1..n.input.len() {
                out[axis] = out[axis].saturating_add(*input(k)?.get(axis)?);
            }
            out
        }
        _ => return None,
    };
    let values = product(&out);
    shapes.insert(n.output.first()?.clone(), out);
    Some(NodeWork {
        values,
        multiply_adds,
        pad_growth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::attr::attr_ints;
    use crate::onnx::builder::node;
    use crate::onnx::proto::tensor_shape_proto::{Dimension, dimension};
    use crate::onnx::proto::{TensorShapeProto, TypeProto, ValueInfoProto, type_proto};

    fn one_node(n: NodeProto) -> Result<(), OnnxError> {
        check_node_sizes(&GraphProto::default(), &n)
    }

    #[test]
    fn a_million_pixel_pad_is_refused_naming_the_node_and_size() {
        let mut conv = node("Conv", "big_pad", &["x", "w"], &["y"], vec![]);
        conv.attribute.push(attr_ints(
            "pads",
            &[1_000_000, 1_000_000, 1_000_000, 1_000_000],
        ));
        let e = one_node(conv.clone()).unwrap_err().to_string();
        // (2,000,001)^2 positions, worked out by hand.
        assert!(
            e.contains("'big_pad' (Conv)") && e.contains("4000004000001 elements"),
            "{e}"
        );
        // Through the whole-model check, inside a subgraph too.
        let model = |n: NodeProto| ModelProto {
            graph: Some(GraphProto {
                node: vec![n],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check_model(&model(conv.clone())).is_err());
        let mut outer = node("If", "branch", &["c"], &["z"], vec![]);
        outer.attribute.push(crate::onnx::proto::AttributeProto {
            name: Some("then_branch".into()),
            r#type: Some(5),
            g: model(conv).graph,
            ..Default::default()
        });
        let e = check_model(&model(outer)).unwrap_err().to_string();
        assert!(e.contains("'big_pad'"), "{e}");
        // A stride of 2^21 on one axis.
        let mut pool = node("MaxPool", "p", &["x"], &["y"], vec![]);
        pool.attribute.push(attr_ints("strides", &[1, 1 << 21]));
        let e = one_node(pool).unwrap_err().to_string();
        assert!(e.contains("attribute strides = 2097152"), "{e}");
    }

    #[test]
    fn ordinary_windows_pass() {
        let mut conv = node("Conv", "c", &["x", "w"], &["y"], vec![]);
        conv.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
        conv.attribute.push(attr_ints("kernel_shape", &[3, 3]));
        one_node(conv).unwrap();
    }

    fn model(nodes: Vec<NodeProto>, x: &[i64], weights: &[(&str, &[usize])]) -> ModelProto {
        let dim = |v: i64| Dimension {
            value: Some(dimension::Value::DimValue(v)),
            ..Default::default()
        };
        ModelProto {
            graph: Some(GraphProto {
                node: nodes,
                input: vec![ValueInfoProto {
                    name: Some("x".into()),
                    r#type: Some(TypeProto {
                        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                            elem_type: Some(1),
                            shape: Some(TensorShapeProto {
                                dim: x.iter().map(|&d| dim(d)).collect(),
                            }),
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                // Only the dims matter here: no data, so huge weights cost nothing.
                initializer: weights
                    .iter()
                    .map(|(n, s)| crate::onnx::TensorProto {
                        name: Some(n.to_string()),
                        dims: s.iter().map(|&d| d as i64).collect(),
                        data_type: Some(1),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_small_cnn_is_counted_by_hand() {
        // Conv 1→4 3×3 pad 1 on 8×8: 4·8·8 = 256 outputs of 9 multiply-adds;
        // MaxPool 2×2 stride 2: 4·4·4 = 64; Flatten 64; Gemm 64→10: 640.
        let mut conv = node("Conv", "c", &["x", "w"], &["a"], vec![]);
        conv.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
        let mut pool = node("MaxPool", "p", &["a"], &["b"], vec![]);
        pool.attribute.push(attr_ints("kernel_shape", &[2, 2]));
        pool.attribute.push(attr_ints("strides", &[2, 2]));
        let m = model(
            vec![
                conv,
                pool,
                node("Flatten", "f", &["b"], &["c"], vec![]),
                node("Gemm", "g", &["c", "wg"], &["y"], vec![]),
            ],
            &[1, 1, 8, 8],
            &[("w", &[4, 1, 3, 3]), ("wg", &[64, 10])],
        );
        let w = check_work(&m).unwrap();
        assert_eq!(w.multiply_adds, 256 * 9 + 640);
        assert_eq!(w.values, 256 + 64 + 64 + 10);
    }

    #[test]
    fn a_million_row_pad_is_refused_with_its_growth() {
        let mut conv = node("Conv", "/3/Conv", &["x", "w"], &["y"], vec![]);
        conv.attribute
            .push(attr_ints("pads", &[1_000_000, 1, 1, 1]));
        let m = model(vec![conv], &[1, 16, 4, 4], &[("w", &[32, 16, 3, 3])]);
        let e = check_work(&m).unwrap_err().to_string();
        // (4 + 1,000,001) × (4 + 2) / 16 = 375,001 (integer division).
        assert!(
            e.contains("node '/3/Conv'") && e.contains("4×4 plane 375001-fold"),
            "{e}"
        );
        // Pads within the kernel's reach are fine however much they grow a
        // small plane: DeepLab's dilated 3×3 (pad 18, reach 36) on a 1×1
        // map, 37² = 1369-fold.
        let mut conv = node("Conv", "c", &["x", "w"], &["y"], vec![]);
        conv.attribute.push(attr_ints("pads", &[18, 18, 18, 18]));
        conv.attribute.push(attr_ints("dilations", &[18, 18]));
        let m = model(vec![conv], &[1, 16, 1, 1], &[("w", &[32, 16, 3, 3])]);
        check_work(&m).unwrap();
    }

    #[test]
    fn work_past_the_limit_is_refused_naming_the_node() {
        // A ReLU, then a 3×3 conv 16384→256 (pad 1) on 512×512: 2^26
        // outputs of 9 · 2^14 multiply-adds, 9 · 2^40 in all.
        let mut conv = node("Conv", "big", &["r", "w"], &["y"], vec![]);
        conv.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
        let m = model(
            vec![node("Relu", "small", &["x"], &["r"], vec![]), conv],
            &[1, 16384, 512, 512],
            &[("w", &[256, 16384, 3, 3])],
        );
        let e = check_work(&m).unwrap_err().to_string();
        assert!(
            e.contains("node 'big'") && e.contains("multiply-adds"),
            "{e}"
        );
    }
}
