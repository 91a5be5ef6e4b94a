//! MatMul of the training graph, forward and backward, in NumPy's
//! semantics for inputs of rank ≥ 2: a value times a 2-D weight (a layer,
//! rows flattened into one GEMM) and a value times a value with broadcast
//! batch axes (attention's QKᵀ and softmax·V), one GEMM per batch entry.

use super::ops_layout::reduce_to;
use ndarray::{Array3, ArrayD, ArrayView2, Axis, Ix2, IxDyn};
use rayon::prelude::*;

/// `a @ b`.
pub(in crate::train) fn matmul(a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>, String> {
    if b.ndim() == 2 && a.ndim() >= 2 {
        let (rows, k) = (a.len() / a.shape()[a.ndim() - 1].max(1), inner(a, b)?);
        let a2 = a.to_shape((rows, k)).map_err(|e| e.to_string())?;
        let b2 = b
            .view()
            .into_dimensionality::<Ix2>()
            .map_err(|e| e.to_string())?;
        let mut shape = a.shape().to_vec();
        *shape.last_mut().expect("rank ≥ 2") = b2.ncols();
        return a2
            .dot(&b2)
            .into_shape_with_order(IxDyn(&shape))
            .map_err(|e| e.to_string());
    }
    let p = Batched::of(a, b)?;
    let (a3, b3) = (p.stack(a, p.m, p.k)?, p.stack(b, p.k, p.n)?);
    let mut out = Array3::<f32>::zeros((p.batch(), p.m, p.n));
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(i, mut o)| {
            o.assign(&a3.index_axis(Axis(0), i).dot(&b3.index_axis(Axis(0), i)))
        });
    out.into_shape_with_order(IxDyn(&p.out_shape()))
        .map_err(|e| e.to_string())
}

/// (∂L/∂a, ∂L/∂b) of `a @ b` given ∂L/∂(a @ b), each only when `wanted`.
pub(in crate::train) fn matmul_backward(
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
    gy: &ArrayD<f32>,
    wanted: [bool; 2],
) -> Result<[Option<ArrayD<f32>>; 2], String> {
    if b.ndim() == 2 && a.ndim() >= 2 {
        let k = inner(a, b)?;
        let rows = a.len() / k.max(1);
        let a2 = a.to_shape((rows, k)).map_err(|e| e.to_string())?;
        let b2 = b
            .view()
            .into_dimensionality::<Ix2>()
            .map_err(|e| e.to_string())?;
        let g2 = gy.to_shape((rows, b2.ncols())).map_err(|e| e.to_string())?;
        let ga = wanted[0]
            .then(|| g2.dot(&b2.t()).into_shape_with_order(a.raw_dim()))
            .transpose()
            .map_err(|e| e.to_string())?;
        let gb = wanted[1].then(|| a2.t().dot(&g2).into_dyn());
        return Ok([ga, gb]);
    }
    let p = Batched::of(a, b)?;
    let (a3, b3) = (p.stack(a, p.m, p.k)?, p.stack(b, p.k, p.n)?);
    let g3 = gy
        .to_shape((p.batch(), p.m, p.n))
        .map_err(|e| e.to_string())?;
    let each = |rows: usize, cols: usize, f: &(dyn Fn(usize) -> ndarray::Array2<f32> + Sync)| {
        let mut out = Array3::<f32>::zeros((p.batch(), rows, cols));
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(i, mut o)| o.assign(&f(i)));
        out
    };
    let t = |v: ArrayView2<'_, f32>| v.t().to_owned();
    let ga = if wanted[0] {
        let full = each(p.m, p.k, &|i| {
            g3.index_axis(Axis(0), i).dot(&t(b3.index_axis(Axis(0), i)))
        });
        let mut shape = p.batch_shape.clone();
        shape.extend([p.m, p.k]);
        let full = full
            .into_shape_with_order(IxDyn(&shape))
            .map_err(|e| e.to_string())?;
        Some(reduce_to(&full, a.shape()))
    } else {
        None
    };
    let gb = if wanted[1] {
        let full = each(p.k, p.n, &|i| {
            t(a3.index_axis(Axis(0), i)).dot(&g3.index_axis(Axis(0), i))
        });
        let mut shape = p.batch_shape.clone();
        shape.extend([p.k, p.n]);
        let full = full
            .into_shape_with_order(IxDyn(&shape))
            .map_err(|e| e.to_string())?;
        Some(reduce_to(&full, b.shape()))
    } else {
        None
    };
    Ok([ga, gb])
}

/// The shared length of `a`'s last axis and `b`'s first, checked.
fn inner(a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<usize, String> {
    let k = a.shape()[a.ndim() - 1];
    if k != b.shape()[0] {
        return Err(format!("MatMul of {:?} by {:?}", a.shape(), b.shape()));
    }
    Ok(k)
}

/// The shapes of a batched MatMul: broadcast batch axes, then m×k by k×n.
struct Batched {
    batch_shape: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
}

impl Batched {
    fn of(a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<Batched, String> {
        let bad = || format!("MatMul of {:?} by {:?}", a.shape(), b.shape());
        if a.ndim() < 2 || b.ndim() < 2 {
            return Err(format!(
                "{}: 1-D operands do not train; reshape them to 2-D",
                bad()
            ));
        }
        let (sa, sb) = (a.shape(), b.shape());
        let (m, k) = (sa[sa.len() - 2], sa[sa.len() - 1]);
        let (k2, n) = (sb[sb.len() - 2], sb[sb.len() - 1]);
        if k != k2 {
            return Err(bad());
        }
        let (ba, bb) = (&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
        let rank = ba.len().max(bb.len());
        let at = |s: &[usize], i: usize| (i + s.len()).checked_sub(rank).map_or(1, |j| s[j]);
        let batch_shape = (0..rank)
            .map(|i| match (at(ba, i), at(bb, i)) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(bad()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batched {
            batch_shape,
            m,
            k,
            n,
        })
    }

    fn batch(&self) -> usize {
        self.batch_shape.iter().product()
    }

    fn out_shape(&self) -> Vec<usize> {
        let mut s = self.batch_shape.clone();
        s.extend([self.m, self.n]);
        s
    }

    /// `x` broadcast over the batch axes, as [batch, rows, cols].
    fn stack(&self, x: &ArrayD<f32>, rows: usize, cols: usize) -> Result<Array3<f32>, String> {
        let mut shape = self.batch_shape.clone();
        shape.extend([rows, cols]);
        let view = x
            .broadcast(IxDyn(&shape))
            .ok_or_else(|| format!("cannot broadcast {:?} to {shape:?}", x.shape()))?;
        view.as_standard_layout()
            .into_owned()
            .into_shape_with_order((self.batch(), rows, cols))
            .map_err(|e| e.to_string())
    }
}
