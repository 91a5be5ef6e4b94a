//! Shape and layout helpers of the training graph: permutations, softmax,
//! summing broadcast gradients, and the reductions' backward pass.

use ndarray::{ArrayD, Axis};

/// Transpose's permutation (default: reversed axes), checked.
pub(in crate::train) fn perm_of(
    perm: &Option<Vec<usize>>,
    rank: usize,
) -> Result<Vec<usize>, String> {
    let p = perm.clone().unwrap_or_else(|| (0..rank).rev().collect());
    let mut seen = vec![false; rank];
    if p.len() != rank
        || p.iter()
            .any(|&v| v >= rank || std::mem::replace(&mut seen[v], true))
    {
        return Err(format!("perm {p:?} is not a permutation of {rank} axes"));
    }
    Ok(p)
}

pub(in crate::train) fn softmax(x: &ArrayD<f32>, axis: usize) -> ArrayD<f32> {
    let mut y = x.clone();
    for mut lane in y.lanes_mut(Axis(axis)) {
        let m = lane.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        lane.mapv_inplace(|v| (v - m).exp());
        let sum: f32 = lane.sum();
        lane.mapv_inplace(|v| v / sum);
    }
    y
}

/// Sums a broadcast gradient back to `shape`.
pub(in crate::train) fn reduce_to(g: &ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    let mut r = g.clone();
    while r.ndim() > shape.len() {
        r = r.sum_axis(Axis(0));
    }
    for (axis, &d) in shape.iter().enumerate() {
        if d == 1 && r.shape()[axis] != 1 {
            r = r.sum_axis(Axis(axis)).insert_axis(Axis(axis));
        }
    }
    r
}

/// ∂L/∂x of a ReduceMean or ReduceSum of an input of `x_shape`: the output
/// gradient spread back over the reduced axes (divided by their size for a
/// mean).
pub(in crate::train) fn reduce_backward(
    r: &crate::ops::reduce::Reduce,
    x_shape: &[usize],
    gy: &ArrayD<f32>,
) -> Result<ArrayD<f32>, String> {
    use crate::ops::reduce::ReduceKind;
    let rank = x_shape.len();
    let mut axes: Vec<usize> = match &r.axes {
        None => (0..rank).collect(),
        Some(a) => a
            .iter()
            .map(|&v| crate::ops::layout::axis_index(v, rank))
            .collect::<Result<_, _>>()?,
    };
    axes.sort_unstable();
    axes.dedup();
    let count: usize = axes.iter().map(|&a| x_shape[a]).product();
    let factor = match r.kind {
        ReduceKind::Sum => 1.0,
        ReduceKind::Mean => 1.0 / count.max(1) as f32,
        ReduceKind::Max | ReduceKind::Min => {
            return Err("ReduceMax and ReduceMin do not train".into());
        }
    };
    let mut kept = gy.clone();
    if !r.keep_dims {
        for &a in &axes {
            kept = kept.insert_axis(Axis(a));
        }
    }
    let spread = kept
        .broadcast(ndarray::IxDyn(x_shape))
        .ok_or_else(|| format!("a gradient of {:?} for {x_shape:?}", gy.shape()))?;
    Ok(spread.mapv(|g| g * factor))
}
