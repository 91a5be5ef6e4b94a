//! 3-D convolutions (5-D input) rewritten as 2-D ones, which the engine runs:
//! depth is padded explicitly, then for every kernel depth tap `k` the input
//! depth slices `k*dd, k*dd + sd, ...` are folded into the batch, convolved
//! in 2-D with that tap's weights, and the `kd` results summed:
//!
//! `y[n, m, o] = b[m] + Σ_k conv2d(x_pad[n, :, o*sd + k*dd], w[:, :, k])`.

use crate::onnx::attr::{attr_int, attr_ints};
use crate::onnx::builder::node;
use crate::onnx::graph::initializer;
use crate::onnx::proto::{AttributeProto, TensorProto};
use crate::onnx::{GraphProto, NodeProto, Storage, to_proto, to_tensor};
use crate::tensor::Tensor;
use ndarray::{ArrayD, Axis, IxDyn};

fn i64_init(name: &str, v: &[i64]) -> TensorProto {
    to_proto(
        name,
        &Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).expect("1-D")),
        Storage::Raw,
    )
}

/// Rewrites every Conv with a constant 5-D weight in `g`; returns how many.
pub fn lower_conv3d(g: &mut GraphProto) -> usize {
    let mut count = 0;
    let mut out: Vec<NodeProto> = Vec::with_capacity(g.node.len());
    let mut inits: Vec<TensorProto> = Vec::new();
    for n in std::mem::take(&mut g.node) {
        let weight = (n.op_type() == "Conv" && n.domain().is_empty())
            .then(|| n.input.get(1).and_then(|w| initializer(g, w)))
            .flatten()
            .filter(|t| t.dims.len() == 5)
            .and_then(|t| to_tensor(t).ok());
        // SAME padding or malformed attributes: left for the engine to refuse by name.
        let window = crate::ops::window::Window::parse(&n, 3);
        let (Some(Tensor::F32(w)), Ok(window)) = (weight, window) else {
            out.push(n);
            continue;
        };
        count += 1;
        let name = n.name().to_string();
        let p = |s: &str| format!("{name}.conv3d.{s}");
        let kd = w.shape()[2];
        let as_i64 = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
        let strides = as_i64(&window.strides);
        let dilations = as_i64(&window.dilations);
        let pads = as_i64(&window.pads);
        let group = window.group as i64;
        if n.input.first().is_none_or(|x| x.is_empty()) || n.output.is_empty() {
            // Malformed for a 3-D convolution: left for the engine to refuse by name.
            count -= 1;
            out.push(n);
            continue;
        }
        let (sd, dd) = (strides[0], dilations[0]);
        let c = (w.shape()[1] as i64) * group;
        let m = w.shape()[0] as i64;
        // Depth padding; height/width padding stays on the 2-D convolutions.
        inits.push(i64_init(
            &p("pads"),
            &[0, 0, pads[0], 0, 0, 0, 0, pads[3], 0, 0],
        ));
        out.push(node(
            "Pad",
            &p("pad"),
            &[&n.input[0], &p("pads")],
            &[&p("xp")],
            vec![],
        ));
        out.push(node(
            "Shape",
            &p("shape"),
            &[&p("xp")],
            &[&p("xp_shape")],
            vec![],
        ));
        for (k, v) in [
            ("i2", 2i64),
            ("i3", 3),
            ("i5", 5),
            ("i0", 0),
            ("i1", 1),
            ("i4", 4),
        ] {
            inits.push(i64_init(&p(k), &[v]));
        }
        // Output depth: (Dp - dd*(kd-1) - 1) / sd + 1, from the padded depth at run time.
        out.push(node(
            "Slice",
            &p("dp"),
            &[&p("xp_shape"), &p("i2"), &p("i3")],
            &[&p("dp_v")],
            vec![],
        ));
        inits.push(i64_init(&p("span"), &[dd * (kd as i64 - 1) + 1]));
        inits.push(i64_init(&p("sd"), &[sd]));
        out.push(node(
            "Sub",
            &p("dp_sub"),
            &[&p("dp_v"), &p("span")],
            &[&p("dp_rest")],
            vec![],
        ));
        out.push(node(
            "Div",
            &p("dp_div"),
            &[&p("dp_rest"), &p("sd")],
            &[&p("do_m1")],
            vec![],
        ));
        out.push(node(
            "Add",
            &p("do"),
            &[&p("do_m1"), &p("i1")],
            &[&p("do_v")],
            vec![],
        ));
        out.push(node(
            "Slice",
            &p("hw"),
            &[&p("xp_shape"), &p("i3"), &p("i5")],
            &[&p("hw_v")],
            vec![],
        ));
        inits.push(i64_init(&p("fold_head"), &[-1, c]));
        out.push(node(
            "Concat",
            &p("fold_shape"),
            &[&p("fold_head"), &p("hw_v")],
            &[&p("fold_shape_v")],
            vec![attr_int("axis", 0)],
        ));
        // Height and width stay on the 2-D convolutions.
        let conv_attrs: Vec<AttributeProto> = window.without_first_axis().attributes();
        let mut partials = Vec::new();
        for k in 0..kd {
            let q = |s: &str| p(&format!("{s}{k}"));
            // Depth slices k*dd, k*dd + sd, ... (Do of them).
            inits.push(i64_init(&q("start"), &[k as i64 * dd]));
            out.push(node(
                "Mul",
                &q("stop_mul"),
                &[&p("do_m1"), &p("sd")],
                &[&q("stop_a")],
                vec![],
            ));
            out.push(node(
                "Add",
                &q("stop_add"),
                &[&q("stop_a"), &q("start")],
                &[&q("stop_b")],
                vec![],
            ));
            out.push(node(
                "Add",
                &q("stop"),
                &[&q("stop_b"), &p("i1")],
                &[&q("stop_v")],
                vec![],
            ));
            out.push(node(
                "Slice",
                &q("slice"),
                &[&p("xp"), &q("start"), &q("stop_v"), &p("i2"), &p("sd")],
                &[&q("xs")],
                vec![],
            ));
            out.push(node(
                "Transpose",
                &q("to_batch"),
                &[&q("xs")],
                &[&q("xt")],
                vec![attr_ints("perm", &[0, 2, 1, 3, 4])],
            ));
            out.push(node(
                "Reshape",
                &q("fold"),
                &[&q("xt"), &p("fold_shape_v")],
                &[&q("x2")],
                vec![],
            ));
            let wk = w.index_axis(Axis(2), k).to_owned();
            inits.push(to_proto(&q("w"), &Tensor::F32(wk), Storage::Raw));
            out.push(node(
                "Conv",
                &q("conv"),
                &[&q("x2"), &q("w")],
                &[&q("y2")],
                conv_attrs.clone(),
            ));
            partials.push(q("y2"));
        }
        let mut sum = partials[0].clone();
        for (i, part) in partials.iter().enumerate().skip(1) {
            let next = p(&format!("sum{i}"));
            out.push(node(
                "Add",
                &p(&format!("add{i}")),
                &[&sum, part],
                &[&next],
                vec![],
            ));
            sum = next;
        }
        if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) {
            inits.push(i64_init(&p("bias_shape"), &[1, m, 1, 1]));
            out.push(node(
                "Reshape",
                &p("bias_r"),
                &[b, &p("bias_shape")],
                &[&p("bias4")],
                vec![],
            ));
            out.push(node(
                "Add",
                &p("bias_add"),
                &[&sum, &p("bias4")],
                &[&p("biased")],
                vec![],
            ));
            sum = p("biased");
        }
        // (N*Do, M, Ho, Wo) -> (N, Do, M, Ho, Wo) -> (N, M, Do, Ho, Wo)
        out.push(node(
            "Shape",
            &p("y_shape"),
            &[&sum],
            &[&p("y_shape_v")],
            vec![],
        ));
        out.push(node(
            "Slice",
            &p("y_hw"),
            &[&p("y_shape_v"), &p("i2"), &p("i4")],
            &[&p("y_hw_v")],
            vec![],
        ));
        out.push(node(
            "Slice",
            &p("n"),
            &[&p("xp_shape"), &p("i0"), &p("i1")],
            &[&p("n_v")],
            vec![],
        ));
        inits.push(i64_init(&p("m"), &[m]));
        out.push(node(
            "Concat",
            &p("unfold_shape"),
            &[&p("n_v"), &p("do_v"), &p("m"), &p("y_hw_v")],
            &[&p("unfold_v")],
            vec![attr_int("axis", 0)],
        ));
        out.push(node(
            "Reshape",
            &p("unfold"),
            &[&sum, &p("unfold_v")],
            &[&p("y5")],
            vec![],
        ));
        out.push(node(
            "Transpose",
            &p("back"),
            &[&p("y5")],
            &[&n.output[0]],
            vec![attr_ints("perm", &[0, 2, 1, 3, 4])],
        ));
    }
    g.node = out;
    g.initializer.extend(inits);
    count
}

#[cfg(test)]
mod tests {
    use crate::onnx::builder::node;
    use crate::onnx::proto::OperatorSetIdProto;
    use crate::onnx::{GraphProto, ModelProto, Storage, ValueInfoProto, to_proto};
    use crate::sim::{CpuExecutor, Executor, SessionOptions};
    use crate::tensor::Tensor;
    use ndarray::{ArrayD, IxDyn};

    fn values(seed: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed)) >> 20) as f32 / 4096.0
                    - 0.5
            })
            .collect()
    }

    /// y[n,m,d,h,w] = b[m] + Σ x[n, c, d*s - p + k*dl, ...] * w[m, c, k, ...] (group 1).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &ArrayD<f32>,
        w: &ArrayD<f32>,
        b: &[f32],
        s: [usize; 3],
        p: [usize; 3],
        dl: [usize; 3],
    ) -> ArrayD<f32> {
        let (n, c, d, h, wd) = (
            x.shape()[0],
            x.shape()[1],
            x.shape()[2],
            x.shape()[3],
            x.shape()[4],
        );
        let (m, kd, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3], w.shape()[4]);
        let out =
            |len: usize, k: usize, i: usize| (len + 2 * p[i] - dl[i] * (k - 1) - 1) / s[i] + 1;
        let (od, oh, ow) = (out(d, kd, 0), out(h, kh, 1), out(wd, kw, 2));
        let mut y = ArrayD::zeros(IxDyn(&[n, m, od, oh, ow]));
        for ni in 0..n {
            for mi in 0..m {
                for (a, bb, cc) in itertools(od, oh, ow) {
                    let mut acc = b[mi];
                    for ci in 0..c {
                        for z in 0..kd {
                            for yy in 0..kh {
                                for xx in 0..kw {
                                    let (iz, iy, ix) = (
                                        (a * s[0] + z * dl[0]) as isize - p[0] as isize,
                                        (bb * s[1] + yy * dl[1]) as isize - p[1] as isize,
                                        (cc * s[2] + xx * dl[2]) as isize - p[2] as isize,
                                    );
                                    if iz >= 0
                                        && iy >= 0
                                        && ix >= 0
                                        && (iz as usize) < d
                                        && (iy as usize) < h
                                        && (ix as usize) < wd
                                    {
                                        acc += x[[ni, ci, iz as usize, iy as usize, ix as usize]]
                                            * w[[mi, ci, z, yy, xx]];
                                    }
                                }
                            }
                        }
                    }
                    y[[ni, mi, a, bb, cc]] = acc;
                }
            }
        }
        y
    }

    fn itertools(a: usize, b: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).map(move |k| (i, j, k))))
    }

    #[test]
    fn lowered_3d_convolution_matches_the_direct_sum() {
        for (s, p, dl) in [
            ([1, 1, 1], [1, 1, 1], [1, 1, 1]),
            ([2, 1, 2], [0, 1, 1], [1, 1, 1]),
            ([1, 2, 1], [1, 0, 2], [2, 1, 2]),
        ] {
            let x = ArrayD::from_shape_vec(IxDyn(&[2, 3, 6, 5, 7]), values(1, 2 * 3 * 6 * 5 * 7))
                .unwrap();
            let w = ArrayD::from_shape_vec(IxDyn(&[4, 3, 3, 2, 3]), values(2, 4 * 3 * 3 * 2 * 3))
                .unwrap();
            let b = values(3, 4);
            let mut conv = node("Conv", "c3", &["x", "w", "b"], &["y"], vec![]);
            let a = |n: &str, v: &[usize]| {
                super::attr_ints(n, &v.iter().map(|&u| u as i64).collect::<Vec<_>>())
            };
            conv.attribute = vec![
                a("strides", &s),
                a("dilations", &dl),
                a("pads", &[p[0], p[1], p[2], p[0], p[1], p[2]]),
            ];
            let g = GraphProto {
                node: vec![conv],
                initializer: vec![
                    to_proto("w", &Tensor::F32(w.clone()), Storage::Raw),
                    to_proto(
                        "b",
                        &Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[4]), b.clone()).unwrap()),
                        Storage::Raw,
                    ),
                ],
                input: vec![ValueInfoProto {
                    name: Some("x".into()),
                    ..Default::default()
                }],
                output: vec![ValueInfoProto {
                    name: Some("y".into()),
                    ..Default::default()
                }],
                ..Default::default()
            };
            let m = ModelProto {
                ir_version: Some(8),
                opset_import: vec![OperatorSetIdProto {
                    domain: Some(String::new()),
                    version: Some(17),
                }],
                graph: Some(g),
                ..Default::default()
            };
            let session = CpuExecutor.prepare(&m, &SessionOptions::default()).unwrap();
            let got = session
                .run(&[("x", &Tensor::F32(x.clone()))], &["y"])
                .unwrap()
                .remove(0);
            let want = reference(&x, &w, &b, s, p, dl);
            let got = got.as_f32().unwrap();
            assert_eq!(got.shape(), want.shape(), "{s:?} {p:?} {dl:?}");
            for (u, v) in got.iter().zip(want.iter()) {
                assert!((u - v).abs() < 1e-4, "{s:?} {p:?} {dl:?}: {u} vs {v}");
            }
        }
    }
}
