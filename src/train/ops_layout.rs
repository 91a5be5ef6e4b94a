//! Shape and layout helpers of the training graph: axes, permutations,
//! MatMul shapes, Reshape targets, softmax, and summing broadcast gradients.

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

/// (rows, k) of `a @ b` with `a` of any rank ≥ 1 and `b` 2-D.
pub(in crate::train) fn matmul_shape(
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
) -> Result<(usize, usize), String> {
    if b.ndim() != 2 || a.ndim() < 2 {
        return Err(format!(
            "MatMul of {:?} by {:?}: only an N-D input times a 2-D weight trains",
            a.shape(),
            b.shape()
        ));
    }
    let k = a.shape()[a.ndim() - 1];
    if k != b.shape()[0] {
        return Err(format!("MatMul of {:?} by {:?}", a.shape(), b.shape()));
    }
    Ok((a.len() / k.max(1), k))
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
