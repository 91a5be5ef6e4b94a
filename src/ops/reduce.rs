//! The reductions (ReduceMean, ReduceSum, ReduceMax, ReduceMin) with their
//! axes in the opset's form (an attribute, or from opset 18 — 13 for
//! ReduceSum — a constant input), `keepdims` and `noop_with_empty_axes`:
//! parsed once into [`Reduce`], run on float tensors.

use crate::onnx::NodeProto;
use crate::onnx::attr::{int_attr, ints_attr};
use crate::tensor::Tensor;
use ndarray::{ArrayD, Axis};

/// What a reduction computes over its axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceKind {
    /// The mean.
    Mean,
    /// The sum.
    Sum,
    /// The largest value.
    Max,
    /// The smallest value.
    Min,
}

/// A reduction with its axes resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Reduce {
    /// What it computes.
    pub kind: ReduceKind,
    /// The reduced axes (negative count from the end); `None`: all of them.
    pub axes: Option<Vec<i64>>,
    /// Whether reduced axes stay, with length 1.
    pub keep_dims: bool,
}

impl Reduce {
    /// The reduction `node` computes under `opset`; `Ok(None)` for other
    /// operators, an error when its axes are not a constant.
    pub fn parse<'a>(
        node: &NodeProto,
        opset: i64,
        operand: &dyn Fn(usize) -> Option<&'a Tensor>,
    ) -> Result<Option<Reduce>, String> {
        let (kind, moved) = match node.op_type() {
            "ReduceMean" => (ReduceKind::Mean, 18),
            "ReduceSum" => (ReduceKind::Sum, 13),
            "ReduceMax" => (ReduceKind::Max, 18),
            "ReduceMin" => (ReduceKind::Min, 18),
            _ => return Ok(None),
        };
        let axes = if opset < moved {
            ints_attr(node, "axes")
        } else if node.input.get(1).is_some_and(|a| !a.is_empty()) {
            let t = operand(1).ok_or("its axes are not a constant")?;
            Some(super::ints_of(t)?)
        } else {
            None
        };
        let noop = int_attr(node, "noop_with_empty_axes").unwrap_or(0) != 0;
        let axes = match axes {
            // An empty list means every axis, unless it means none.
            Some(a) if a.is_empty() && noop => Some(a),
            Some(a) if a.is_empty() => None,
            None if noop => Some(Vec::new()),
            other => other,
        };
        Ok(Some(Reduce {
            kind,
            axes,
            keep_dims: int_attr(node, "keepdims").unwrap_or(1) != 0,
        }))
    }

    /// Reduces `x`.
    pub fn run(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>, String> {
        let rank = x.ndim();
        let mut axes: Vec<usize> = match &self.axes {
            None => (0..rank).collect(),
            Some(a) => a
                .iter()
                .map(|&v| super::layout::axis_index(v, rank))
                .collect::<Result<_, _>>()?,
        };
        axes.sort_unstable();
        axes.dedup();
        if axes.iter().any(|&a| x.shape()[a] == 0)
            && matches!(self.kind, ReduceKind::Max | ReduceKind::Min)
        {
            return Err("the max or min of no values".into());
        }
        let mut y = x.clone();
        // From the last axis down, so the earlier indices stay valid.
        for &a in axes.iter().rev() {
            let reduced = match self.kind {
                ReduceKind::Sum => y.sum_axis(Axis(a)),
                ReduceKind::Mean => {
                    let n = y.shape()[a] as f32;
                    y.sum_axis(Axis(a)).mapv(|s| s / n)
                }
                ReduceKind::Max => y.fold_axis(Axis(a), f32::NEG_INFINITY, |m, &v| {
                    if v > *m || v.is_nan() { v } else { *m }
                }),
                ReduceKind::Min => y.fold_axis(Axis(a), f32::INFINITY, |m, &v| {
                    if v < *m || v.is_nan() { v } else { *m }
                }),
            };
            y = if self.keep_dims {
                reduced.insert_axis(Axis(a))
            } else {
                reduced
            };
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::attr::{attr_int, attr_ints};
    use crate::onnx::builder::node;
    use ndarray::IxDyn;

    #[test]
    fn mean_over_the_last_axis_and_sum_over_all_by_hand() {
        let x =
            ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, 2.0, 6.0, -1.0, 0.0, 4.0]).unwrap();
        let mean = node(
            "ReduceMean",
            "m",
            &["x"],
            &["y"],
            vec![attr_ints("axes", &[-1])],
        );
        let r = Reduce::parse(&mean, 17, &|_| None).unwrap().unwrap();
        let y = r.run(&x).unwrap();
        assert_eq!(y.shape(), &[2, 1]);
        assert_eq!(y.as_slice().unwrap(), &[3.0, 1.0]);
        let sum = node(
            "ReduceSum",
            "s",
            &["x"],
            &["y"],
            vec![attr_int("keepdims", 0)],
        );
        let r = Reduce::parse(&sum, 13, &|_| None).unwrap().unwrap();
        let y = r.run(&x).unwrap();
        assert_eq!(y.shape(), &[] as &[usize]);
        assert_eq!(y.iter().next(), Some(&12.0));
        let max = node(
            "ReduceMax",
            "x",
            &["x"],
            &["y"],
            vec![attr_ints("axes", &[0])],
        );
        let y = Reduce::parse(&max, 13, &|_| None)
            .unwrap()
            .unwrap()
            .run(&x)
            .unwrap();
        assert_eq!(y.as_slice().unwrap(), &[1.0, 2.0, 6.0]);
        // From opset 18 the axes are an input, which must be a constant.
        let moved = node("ReduceMean", "m", &["x", "axes"], &["y"], vec![]);
        assert!(Reduce::parse(&moved, 18, &|_| None).is_err());
    }
}
