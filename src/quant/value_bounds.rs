//! Bounds that the model itself puts on its values: a ReLU6 output lies in
//! [0, 6] whatever the data, a Sigmoid output in [0, 1]. Calibration uses
//! them so that no quantization grid spends levels on values that cannot
//! occur (docs/algorithms.md, "Activation ranges that respect the model").

use super::params::{ActParams, ParamsError, act_params};
use crate::onnx::{GraphProto, NodeProto};
use std::collections::HashMap;

/// A closed interval `[lo, hi]` every element of a value lies in; either end
/// may be infinite.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounds {
    /// Smallest possible value.
    pub lo: f32,
    /// Largest possible value.
    pub hi: f32,
}

impl Bounds {
    /// No knowledge.
    pub const ANY: Bounds = Bounds {
        lo: f32::NEG_INFINITY,
        hi: f32::INFINITY,
    };

    fn new(lo: f32, hi: f32) -> Bounds {
        Bounds { lo, hi }
    }

    /// Whether this says anything at all.
    pub fn is_known(&self) -> bool {
        self.lo.is_finite() || self.hi.is_finite()
    }

    fn union(self, other: Bounds) -> Bounds {
        Bounds::new(self.lo.min(other.lo), self.hi.max(other.hi))
    }

    fn intersect(self, other: Bounds) -> Bounds {
        Bounds::new(self.lo.max(other.lo), self.hi.min(other.hi))
    }

    /// `act` refitted so that its grid does not reach more than half a step
    /// past these bounds (levels there could never be used); unchanged when
    /// it does not.
    pub fn fit(
        &self,
        act: ActParams,
        asymmetric: bool,
        bits: u32,
    ) -> Result<ActParams, ParamsError> {
        let (lo, hi) = act.range(bits);
        let half = act.scale / 2.0;
        let (lo_b, hi_b) = (self.lo.min(0.0), self.hi.max(0.0));
        let inside = if asymmetric {
            lo >= lo_b - half && hi <= hi_b + half
        } else {
            // A symmetric grid always reaches below zero: only its magnitude counts.
            (-lo).max(hi) <= (-lo_b).max(hi_b) + half
        };
        if inside {
            return Ok(act);
        }
        act_params(lo.max(lo_b), hi.min(hi_b), asymmetric, bits)
    }

    /// The bounds of `x / s` for per-channel factors `s > 0` (DMQ balancing).
    pub fn divided_by(&self, factors: &[f32]) -> Bounds {
        let mut out = Bounds::new(f32::INFINITY, f32::NEG_INFINITY);
        for &s in factors.iter().filter(|s| **s > 0.0) {
            out = out.union(Bounds::new(self.lo / s, self.hi / s));
        }
        if out.lo > out.hi { Bounds::ANY } else { out }
    }
}

/// The known bounds of every value of `graph` that has any, by value name.
/// Sources: Relu, Clip with constant limits, Sigmoid, HardSigmoid, Tanh,
/// Softmax; carried through operators that only move, pick, pad or average
/// values (pooling, reshapes, Concat, Resize, ...). Nodes are visited in
/// graph order, so a producer must come before its consumers.
pub fn known_bounds(graph: &GraphProto) -> HashMap<String, Bounds> {
    let mut bounds: HashMap<String, Bounds> = HashMap::new();
    for node in &graph.node {
        let Some(out) = node.output.first().filter(|o| !o.is_empty()) else {
            continue;
        };
        let input = |i: usize| {
            node.input
                .get(i)
                .and_then(|name| bounds.get(name))
                .copied()
                .unwrap_or(Bounds::ANY)
        };
        let b = match node.op_type() {
            "Relu" => Bounds::new(0.0, f32::INFINITY).intersect(input(0)),
            "Sigmoid" | "HardSigmoid" => Bounds::new(0.0, 1.0),
            "Softmax" => Bounds::new(0.0, 1.0),
            "Tanh" => Bounds::new(-1.0, 1.0),
            "Clip" => clip_bounds(graph, node).intersect(input(0)),
            "MaxPool" | "GlobalMaxPool" | "AveragePool" | "GlobalAveragePool" | "Reshape"
            | "Flatten" | "Transpose" | "Squeeze" | "Unsqueeze" | "Identity" | "Slice"
            | "Gather" | "DepthToSpace" | "SpaceToDepth" | "ReduceMax" | "ReduceMin"
            | "ReduceMean" | "Dropout" => input(0),
            // Nearest and linear resizing stay inside the input's range (cubic does not).
            "Resize" | "Upsample" if crate::ops::resize::is_cubic(node) => Bounds::ANY,
            "Resize" | "Upsample" => input(0),
            "Concat" | "Max" | "Min" => {
                let mut b = input(0);
                for i in 1..node.input.len() {
                    b = b.union(input(i));
                }
                b
            }
            "Pad" => pad_bounds(graph, node, input(0)),
            _ => Bounds::ANY,
        };
        if b.is_known() {
            bounds.insert(out.clone(), b);
        }
    }
    bounds
}

/// Clip's limits: attributes before opset 11, constant inputs 1 and 2 after;
/// an input that is not a constant scalar leaves that side unknown.
fn clip_bounds(graph: &GraphProto, node: &NodeProto) -> Bounds {
    let (min, max) = crate::ops::activation::clip_attributes(node);
    let side = |index: usize, attr: Option<f32>, default: f32| match node
        .input
        .get(index)
        .filter(|n| !n.is_empty())
    {
        Some(name) => constant_scalar(graph, name).unwrap_or(default),
        None => attr.unwrap_or(default),
    };
    Bounds::new(side(1, min, f32::NEG_INFINITY), side(2, max, f32::INFINITY))
}

/// A constant-mode Pad adds its constant value to the input's bounds; other
/// modes repeat input values.
fn pad_bounds(graph: &GraphProto, node: &NodeProto, input: Bounds) -> Bounds {
    let attrs = crate::ops::layout::PadAttributes::of(node);
    if !attrs.constant {
        return input;
    }
    let value = match node.input.get(2).filter(|n| !n.is_empty()) {
        Some(name) => match constant_scalar(graph, name) {
            Some(v) => v,
            None => return Bounds::ANY,
        },
        None => attrs.value,
    };
    input.union(Bounds::new(value, value))
}

/// The single float value of an initializer or `Constant` node called `name`.
fn constant_scalar(graph: &GraphProto, name: &str) -> Option<f32> {
    let tensor = crate::onnx::graph::initializer(graph, name).or_else(|| {
        graph
            .node
            .iter()
            .find(|n| n.op_type() == "Constant" && n.output.first().is_some_and(|o| o == name))
            .and_then(crate::ops::constant_value)
    })?;
    match crate::onnx::to_tensor(tensor).ok()? {
        crate::tensor::Tensor::F32(a) if a.len() == 1 => a.iter().next().copied(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::GraphProto;
    use crate::onnx::attr::{attr_float, attr_int, attr_ints};
    use crate::onnx::builder::{constant_f32, node};

    #[test]
    fn sources_and_carriers() {
        let nodes = vec![
            node("Relu", "n0", &["x"], &["r"], vec![]),
            constant_f32("c0", "lo", &[], vec![0.0]),
            constant_f32("c1", "hi", &[], vec![6.0]),
            node("Clip", "n1", &["x", "lo", "hi"], &["r6"], vec![]),
            node("Sigmoid", "n2", &["x"], &["s"], vec![]),
            node(
                "MaxPool",
                "n3",
                &["r6"],
                &["p"],
                vec![attr_ints("kernel_shape", &[2, 2])],
            ),
            node(
                "Concat",
                "n4",
                &["p", "s"],
                &["c"],
                vec![attr_int("axis", 1)],
            ),
            node("Add", "n5", &["r", "s"], &["a"], vec![]),
            node("Clip", "n6", &["x", "lo"], &["half"], vec![]),
            node("Relu", "n7", &["r6"], &["rr"], vec![]),
            node(
                "Clip",
                "n8",
                &["x"],
                &["old"],
                vec![attr_float("min", -1.0), attr_float("max", 1.0)],
            ),
            node(
                "Pad",
                "n9",
                &["s"],
                &["padded"],
                vec![attr_float("value", -2.0)],
            ),
        ];
        let graph = GraphProto {
            node: nodes,
            ..Default::default()
        };
        let b = known_bounds(&graph);
        assert_eq!(b["r"], Bounds::new(0.0, f32::INFINITY));
        assert_eq!(b["r6"], Bounds::new(0.0, 6.0));
        assert_eq!(b["s"], Bounds::new(0.0, 1.0));
        assert_eq!(b["p"], Bounds::new(0.0, 6.0));
        assert_eq!(b["c"], Bounds::new(0.0, 6.0));
        assert_eq!(b["half"], Bounds::new(0.0, f32::INFINITY));
        assert_eq!(b["rr"], Bounds::new(0.0, 6.0));
        assert_eq!(b["old"], Bounds::new(-1.0, 1.0));
        assert_eq!(b["padded"], Bounds::new(-2.0, 1.0));
        assert!(
            !b.contains_key("a"),
            "an Add of bounded values is not tracked"
        );
        assert!(!b.contains_key("x"));
    }

    #[test]
    fn grids_are_fitted_to_the_bounds() {
        let relu6 = Bounds::new(0.0, 6.0);
        // [0, 7.8] (IFMR's r = 1.3 on a saturated ReLU6) becomes [0, 6].
        let wide = act_params(0.0, 7.8, true, 8).unwrap();
        let fitted = relu6.fit(wide, true, 8).unwrap();
        assert_eq!(fitted.offset, -128);
        assert!((fitted.scale - 6.0 / 255.0).abs() < 1e-7, "{fitted:?}");
        // A grid already inside (or within half a step) is kept bit for bit.
        let inside = act_params(0.0, 4.0, true, 8).unwrap();
        assert_eq!(relu6.fit(inside, true, 8).unwrap(), inside);
        // Symmetric: the positive end is cut to 6, the scale follows (6/127).
        let sym = act_params(-7.8, 7.8, false, 8).unwrap();
        let fitted = relu6.fit(sym, false, 8).unwrap();
        assert!((fitted.scale - 6.0 / 127.0).abs() < 1e-7, "{fitted:?}");
        // Sigmoid outputs with an asymmetric grid over [-0.5, 1.5].
        let g = act_params(-0.5, 1.5, true, 8).unwrap();
        let fitted = Bounds::new(0.0, 1.0).fit(g, true, 8).unwrap();
        let (lo, hi) = fitted.range(8);
        assert!(lo.abs() < 1e-6 && (hi - 1.0).abs() < 1e-6, "{lo} {hi}");
        // No knowledge, no change.
        assert_eq!(Bounds::ANY.fit(wide, true, 8).unwrap(), wide);
    }

    #[test]
    fn balancing_divides_the_bounds() {
        let b = Bounds::new(0.0, 6.0).divided_by(&[2.0, 0.5, 3.0]);
        assert_eq!(b, Bounds::new(0.0, 12.0));
    }
}
