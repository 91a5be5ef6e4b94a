//! Operators of the training graph that pick values: Gather of a float
//! table by integer indices (embeddings), Where by a boolean mask, and the
//! backward pass of every layout operator the engine evaluates (Slice,
//! Expand, Unsqueeze, …): run on the positions of its input instead of its
//! values, the operator says where each output value came from.

use crate::onnx::NodeProto;
use crate::ops::layout::axis_index;
use crate::ops::{eval_constant, ints_of};
use crate::tensor::Tensor;
use ndarray::{ArrayD, Axis, IxDyn};

/// Indices of an integer tensor as positions along an axis of `len`
/// (negative ones count from the end), checked.
fn positions(indices: &Tensor, len: usize) -> Result<Vec<usize>, String> {
    ints_of(indices)?
        .into_iter()
        .map(|i| {
            let p = if i < 0 { i + len as i64 } else { i };
            usize::try_from(p)
                .ok()
                .filter(|&p| p < len)
                .ok_or_else(|| format!("index {i} is outside an axis of {len}"))
        })
        .collect()
}

/// Gather of `data` along `axis` by `indices` (ONNX's Gather).
pub(in crate::train) fn gather(
    data: &ArrayD<f32>,
    indices: &Tensor,
    axis: i64,
) -> Result<ArrayD<f32>, String> {
    let ax = axis_index(axis, data.ndim())?;
    let picked = positions(indices, data.shape()[ax])?;
    let mut shape = data.shape()[..ax].to_vec();
    shape.extend(indices.shape());
    shape.extend(&data.shape()[ax + 1..]);
    data.select(Axis(ax), &picked)
        .into_shape_with_order(IxDyn(&shape))
        .map_err(|e| e.to_string())
}

/// ∂L/∂data of [`gather`]: each output's gradient added to the row it came from.
pub(in crate::train) fn gather_backward(
    data_shape: &[usize],
    indices: &Tensor,
    axis: i64,
    gy: &ArrayD<f32>,
) -> Result<ArrayD<f32>, String> {
    let ax = axis_index(axis, data_shape.len())?;
    let picked = positions(indices, data_shape[ax])?;
    let mut stacked = data_shape.to_vec();
    stacked[ax] = picked.len();
    let g = gy.to_shape(IxDyn(&stacked)).map_err(|e| e.to_string())?;
    let mut gx = ArrayD::<f32>::zeros(IxDyn(data_shape));
    for (k, &p) in picked.iter().enumerate() {
        let mut dst = gx.index_axis_mut(Axis(ax), p);
        dst += &g.index_axis(Axis(ax), k);
    }
    Ok(gx)
}

/// The boolean mask of a Where, broadcast to `shape`.
fn mask(cond: &Tensor, shape: &[usize]) -> Result<ArrayD<bool>, String> {
    let Tensor::Bool(c) = cond else {
        return Err(format!("its condition is {}, not bool", cond.dtype()));
    };
    c.broadcast(IxDyn(shape))
        .map(|v| v.to_owned())
        .ok_or_else(|| format!("cannot broadcast {:?} to {shape:?}", c.shape()))
}

/// The broadcast shape of `shapes` (NumPy's rule).
fn broadcast_shape(shapes: &[&[usize]]) -> Result<Vec<usize>, String> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    (0..rank)
        .map(|i| {
            shapes.iter().try_fold(1usize, |acc, s| {
                let d = (i + s.len()).checked_sub(rank).map_or(1, |j| s[j]);
                match (acc, d) {
                    (a, b) if a == b => Ok(a),
                    (1, b) => Ok(b),
                    (a, 1) => Ok(a),
                    _ => Err(format!("shapes {shapes:?} do not broadcast")),
                }
            })
        })
        .collect()
}

/// Where(cond, x, y).
pub(in crate::train) fn where_(
    cond: &Tensor,
    x: &ArrayD<f32>,
    y: &ArrayD<f32>,
) -> Result<ArrayD<f32>, String> {
    let shape = broadcast_shape(&[cond.shape(), x.shape(), y.shape()])?;
    let c = mask(cond, &shape)?;
    let (xb, yb) = (
        x.broadcast(IxDyn(&shape)).ok_or("x does not broadcast")?,
        y.broadcast(IxDyn(&shape)).ok_or("y does not broadcast")?,
    );
    Ok(ndarray::Zip::from(&c)
        .and(&xb)
        .and(&yb)
        .map_collect(|&c, &a, &b| if c { a } else { b }))
}

/// (∂L/∂x, ∂L/∂y) of [`where_`], each summed back to its input's shape.
pub(in crate::train) fn where_backward(
    cond: &Tensor,
    x_shape: &[usize],
    y_shape: &[usize],
    gy: &ArrayD<f32>,
) -> Result<(ArrayD<f32>, ArrayD<f32>), String> {
    let c = mask(cond, gy.shape())?;
    let pick = |keep: bool| {
        ndarray::Zip::from(&c)
            .and(gy)
            .map_collect(|&c, &g| if c == keep { g } else { 0.0 })
    };
    Ok((
        super::ops_layout::reduce_to(&pick(true), x_shape),
        super::ops_layout::reduce_to(&pick(false), y_shape),
    ))
}

/// Whether [`index_map_backward`] back-propagates through `op`'s first input:
/// the operator only moves, repeats or drops that input's values.
pub(in crate::train) fn moves_values(op: &str) -> bool {
    matches!(
        op,
        "Identity"
            | "Reshape"
            | "Flatten"
            | "Unsqueeze"
            | "Squeeze"
            | "Transpose"
            | "Slice"
            | "Gather"
            | "Expand"
            | "Tile"
            | "Trilu"
            | "Split"
            | "Pad"
    )
}

/// ∂L/∂(input 0) of a value-moving layout operator: the node evaluated on
/// the positions 1…n of its first input (0 where it writes a constant, as
/// Trilu's zeros and Pad's border) tells which input value each value of
/// its output `part` is.
pub(in crate::train) fn index_map_backward(
    node: &NodeProto,
    opset: i64,
    inputs: &[Option<&Tensor>],
    part: usize,
    x_shape: &[usize],
    gy: &ArrayD<f32>,
) -> Result<ArrayD<f32>, String> {
    let n: usize = x_shape.iter().product();
    let positions = Tensor::I64(
        ArrayD::from_shape_vec(IxDyn(x_shape), (1..=n as i64).collect())
            .map_err(|e| e.to_string())?,
    );
    let no_position = Tensor::I64(ArrayD::from_elem(IxDyn(&[]), 0));
    let mut args: Vec<Option<&Tensor>> = inputs.to_vec();
    args[0] = Some(&positions);
    if node.op_type() == "Pad" && args.get(2).is_some_and(Option::is_some) {
        args[2] = Some(&no_position); // the border holds no input value
    }
    let moved = match eval_constant(node, opset, &args) {
        Some(r) => r?,
        None => return Err("its positions cannot be traced".into()),
    };
    let Some(Tensor::I64(src)) = moved.into_iter().nth(part) else {
        return Err("its positions came back as another type".into());
    };
    if src.len() != gy.len() {
        return Err(format!(
            "{} positions for an output gradient of {}",
            src.len(),
            gy.len()
        ));
    }
    let mut gx = vec![0f32; n];
    for (&p, &g) in src.iter().zip(gy.iter()) {
        if p > 0 {
            gx[(p - 1) as usize] += g;
        }
    }
    ArrayD::from_shape_vec(IxDyn(x_shape), gx).map_err(|e| e.to_string())
}
