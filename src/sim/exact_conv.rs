//! Exact int32 accumulation for a deploy model's Conv / ConvTranspose on
//! int8 inputs. The engine has no trustworthy integer convolution, so the
//! layer runs as float convolutions on integer values, which is exact while
//! every partial sum stays below 2^24: `|q − offset| ≤ 255` and `|w| ≤ 128`
//! bound one product by 2^15, so at most [`MAX_TERMS`] products may meet in
//! one float sum. A layer with more terms per output is split over its input
//! channels into chunks within that bound; each chunk's float result is an
//! exact integer, cast to int32, and the chunks and the int32 bias are added
//! in int32, as the device accumulates. Grouped layers are not split (a
//! group would need its own chunks; depthwise and the usual grouped layers
//! stay far below the bound): they keep one float convolution per layer.

use crate::onnx::attr::attr_int;
use crate::onnx::builder::node;
use crate::onnx::proto::TensorProto;
use crate::onnx::{NodeProto, Storage, to_proto};
use crate::tensor::Tensor;
use ndarray::{ArrayD, Axis, IxDyn, Slice};

/// Products one float sum may hold and stay exact: 512 · 2^15 = 2^24.
pub const MAX_TERMS: usize = 512;

const ONNX_INT32: i64 = 6;

/// Adds the exact lowering of `conv` (a Conv or ConvTranspose whose input
/// `x` already holds `q − offset` as float) with int8 weight `w` and int32
/// bias; the result, int32, is written to `conv.output[0]`.
pub fn lower(
    conv: &NodeProto,
    x: &str,
    w: &ArrayD<i8>,
    bias: Option<&ArrayD<i32>>,
    out: &mut Vec<NodeProto>,
    inits: &mut Vec<TensorProto>,
) {
    let name = conv.name().to_string();
    let p = |s: &str| format!("{name}.exact.{s}");
    let transpose = conv.op_type() == "ConvTranspose";
    let group = crate::ops::window::Window::group_of(conv);
    // The input-channel axis of the weight, and the terms per output per channel.
    let axis = if transpose { 0 } else { 1 };
    let cin = w.shape()[axis];
    let taps: usize = w.shape()[2..].iter().product::<usize>().max(1);
    let per_chunk = if group == 1 {
        (MAX_TERMS / taps).max(1)
    } else {
        cin
    };
    let chunks: Vec<(usize, usize)> = (0..cin)
        .step_by(per_chunk)
        .map(|s| (s, (s + per_chunk).min(cin)))
        .collect();
    let mut partials = Vec::new();
    for (k, &(start, end)) in chunks.iter().enumerate() {
        let (xin, win) = if chunks.len() == 1 {
            (x.to_string(), p("w"))
        } else {
            // Input channels start..end (axis 1 of the input).
            let starts = p(&format!("c{k}.starts"));
            let ends = p(&format!("c{k}.ends"));
            let axes = p(&format!("c{k}.axes"));
            for (n, v) in [(&starts, start as i64), (&ends, end as i64), (&axes, 1)] {
                let t = ArrayD::from_shape_vec(IxDyn(&[1]), vec![v]).expect("1-D");
                inits.push(to_proto(n, &Tensor::I64(t), Storage::Raw));
            }
            let xs = p(&format!("c{k}.x"));
            out.push(node(
                "Slice",
                &p(&format!("c{k}.slice")),
                &[x, &starts, &ends, &axes],
                &[&xs],
                vec![],
            ));
            (xs, p(&format!("c{k}.w")))
        };
        let part = w
            .slice_axis(Axis(axis), Slice::from(start..end))
            .mapv(f32::from);
        inits.push(to_proto(&win, &Tensor::F32(part), Storage::Raw));
        let mut c = conv.clone();
        c.name = Some(p(&format!("c{k}.conv")));
        c.input = vec![xin, win];
        let float_out = p(&format!("c{k}.float"));
        c.output = vec![float_out.clone()];
        out.push(c);
        let int_out = p(&format!("c{k}.int"));
        out.push(node(
            "Cast",
            &p(&format!("c{k}.cast")),
            &[&float_out],
            &[&int_out],
            vec![attr_int("to", ONNX_INT32)],
        ));
        partials.push(int_out);
    }
    if let Some(b) = bias {
        let n = p("bias");
        let shape: Vec<usize> = {
            let mut s = vec![1; 2 + (w.ndim() - 2)];
            s[1] = b.len();
            s
        };
        let reshaped = b
            .clone()
            .into_shape_with_order(IxDyn(&shape))
            .expect("same length");
        inits.push(to_proto(&n, &Tensor::I32(reshaped), Storage::Raw));
        partials.push(n);
    }
    // Sum the int32 partials into the layer's output.
    let mut acc = partials[0].clone();
    for (k, part) in partials.iter().enumerate().skip(1) {
        let last = k + 1 == partials.len();
        let o = if last {
            conv.output[0].clone()
        } else {
            p(&format!("sum{k}"))
        };
        out.push(node(
            "Add",
            &p(&format!("add{k}")),
            &[&acc, part],
            &[&o],
            vec![],
        ));
        acc = o;
    }
    if partials.len() == 1 {
        out.push(node(
            "Identity",
            &p("out"),
            &[&acc],
            &[&conv.output[0]],
            vec![],
        ));
    }
}
