#!/usr/bin/env python3
"""Writes ONNX models shaped the way real tool chains export them, for the
engine's benchmarks and tests (random weights, seed 0):

* `yolov8`: the detector of `make_yolo_like.py` with Ultralytics' real `Detect`
  head as `torch.onnx.export` writes it: per level a box branch (4 x 16 DFL
  bins) and a class branch, flattened with a shape computed by
  Shape/Gather/Unsqueeze/Concat, anchors and strides computed in the graph
  (Shape, Range, Expand, ConstantOfShape, Concat, Transpose), the DFL
  (Reshape, Transpose, Softmax, a 1x1 Conv over the bins), Split, the box
  decoding (Sub/Add/Div/Mul) and the class Sigmoid. Output [1, 4 + nc, A].
* `efficientnet_lite`: EfficientNet-Lite0 in timm's TF port style: every
  convolution is VALID and preceded by TensorFlow's "same" padding computed
  from the input's shape (Shape, Gather, Cast, Div, Ceil, Sub, Mul, Max,
  Unsqueeze, Concat, ConstantOfShape, Reshape, Slice, Transpose, Cast, Pad),
  as PyTorch exports `F.pad` with a computed size; ReLU6 as Clip; 1000
  classes.

    python3 scripts/make_export_like.py yolov8 OUT.onnx [--size 320] [--width 16] [--classes 80]
    python3 scripts/make_export_like.py efficientnet_lite OUT.onnx [--size 224] [--width 1.0]
        [--classes 1000]
    ... --reference N PREFIX    also writes N random inputs (PREFIX_input.npy,
                                [N, 1, 3, S, S]) and onnxruntime's outputs for each
                                (PREFIX_output.npy, [N, 1, ...]) for tests
Needs: numpy, onnx (onnxruntime for --reference).
"""
import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_yolo_like import Builder  # noqa: E402

I64 = np.int64


class Graph(Builder):
    """`make_yolo_like`'s builder with the shape arithmetic PyTorch exports."""

    def ints(self, values):
        return self.const("c", np.asarray(values, I64))

    def scalar(self, value, dtype=I64):
        return self.const("c", np.asarray(value, dtype))

    def dim(self, x, axis):
        """x.size(axis) as PyTorch exports it: Shape, then Gather of a scalar index."""
        return self.op("Gather", [self.op("Shape", [x]), self.scalar(axis)], axis=0)

    def unsqueeze0(self, s):
        return self.op("Unsqueeze", [s, self.ints([0])])


# ---------------------------------------------------------------- YOLOv8 ---

def make_anchors(g, feats, strides):
    """Ultralytics' make_anchors, computed in the graph from each level's shape."""
    points, stride_parts = [], []
    for x, stride in zip(feats, strides):
        h, w = g.dim(x, 2), g.dim(x, 3)
        axis = []
        for n in (w, h):
            r = g.op("Range", [g.scalar(0), n, g.scalar(1)])
            r = g.op("Cast", [r], to=TensorProto.FLOAT)
            axis.append(g.op("Add", [r, g.scalar(0.5, np.float32)]))
        sx, sy = axis
        hw = g.op("Concat", [g.unsqueeze0(h), g.unsqueeze0(w)], axis=0)
        # torch.meshgrid(sy, sx, indexing="ij") exports as Reshape + Expand.
        sy = g.op("Expand", [g.op("Reshape", [sy, g.ints([-1, 1])]), hw])
        sx = g.op("Expand", [g.op("Reshape", [sx, g.ints([1, -1])]), hw])
        stacked = g.op("Concat", [g.op("Unsqueeze", [sx, g.ints([-1])]),
                                  g.op("Unsqueeze", [sy, g.ints([-1])])], axis=-1)
        points.append(g.op("Reshape", [stacked, g.ints([-1, 2])]))
        count = g.op("Mul", [h, w])
        full = g.op("Concat", [g.unsqueeze0(count), g.ints([1])], axis=0)
        stride_parts.append(g.op(
            "ConstantOfShape", [full],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [float(stride)])))
    anchors = g.op("Transpose", [g.op("Concat", points, axis=0)], perm=[1, 0])
    strides_t = g.op("Transpose", [g.op("Concat", stride_parts, axis=0)], perm=[1, 0])
    return anchors, strides_t


def detect_head(g, feats, channels, nc, strides, reg_max=16):
    c2 = max(16, channels[0] // 4, reg_max * 4)
    c3 = max(channels[0], min(nc, 100))
    no = nc + 4 * reg_max
    levels = []
    for x, c in zip(feats, channels):
        box = g.conv(g.conv(g.conv(x, c, c2, 3), c2, c2, 3), c2, 4 * reg_max, act=False)
        cls = g.conv(g.conv(g.conv(x, c, c3, 3), c3, c3, 3), c3, nc, act=False)
        levels.append(g.op("Concat", [box, cls], axis=1))
    batch = g.unsqueeze0(g.dim(levels[0], 0))
    flat_shape = g.op("Concat", [batch, g.ints([no]), g.ints([-1])], axis=0)
    x_cat = g.op("Concat", [g.op("Reshape", [xi, flat_shape]) for xi in levels], axis=2)
    anchors, strides_t = make_anchors(g, levels, strides)
    box = g.name("split")
    cls = g.name("split")
    g.nodes.append(helper.make_node(
        "Split", [x_cat, g.ints([4 * reg_max, nc])], [box, cls], name=box, axis=1))
    # DFL: softmax over the 16 bins, expectation by a fixed 1x1 convolution.
    count = g.unsqueeze0(g.dim(box, 2))
    bins_shape = g.op("Concat", [batch, g.ints([4, reg_max]), count], axis=0)
    bins = g.op("Transpose", [g.op("Reshape", [box, bins_shape])], perm=[0, 2, 1, 3])
    soft = g.op("Softmax", [bins], axis=1)
    dfl_w = g.const("dfl", np.arange(reg_max, dtype=np.float32).reshape(1, reg_max, 1, 1))
    dfl = g.op("Conv", [soft, dfl_w], kernel_shape=[1, 1])
    dist = g.op("Reshape", [dfl, g.op("Concat", [batch, g.ints([4]), count], axis=0)])
    lt, rb = g.name("split"), g.name("split")
    g.nodes.append(helper.make_node("Split", [dist, g.ints([2, 2])], [lt, rb], name=lt, axis=1))
    x1y1 = g.op("Sub", [anchors, lt])
    x2y2 = g.op("Add", [anchors, rb])
    c_xy = g.op("Div", [g.op("Add", [x1y1, x2y2]), g.scalar(2.0, np.float32)])
    wh = g.op("Sub", [x2y2, x1y1])
    dbox = g.op("Mul", [g.op("Concat", [c_xy, wh], axis=1), strides_t])
    return g.op("Concat", [dbox, g.op("Sigmoid", [cls])], axis=1)


def yolov8(size, width, nc):
    g = Graph(0)
    w = width
    x = g.conv("images", 3, w, 3, 2)
    x = g.conv(x, w, 2 * w, 3, 2)
    x = g.c2f(x, 2 * w)
    x = g.conv(x, 2 * w, 4 * w, 3, 2)
    p3 = g.c2f(x, 4 * w, 2)
    x = g.conv(p3, 4 * w, 8 * w, 3, 2)
    p4 = g.c2f(x, 8 * w, 2)
    x = g.conv(p4, 8 * w, 16 * w, 3, 2)
    x = g.c2f(x, 16 * w)
    p5 = g.sppf(x, 16 * w)
    up = g.upsample(p5)
    n4 = g.c2f(g.conv(g.op("Concat", [up, p4], axis=1), 24 * w, 8 * w), 8 * w)
    up = g.upsample(n4)
    n3 = g.c2f(g.conv(g.op("Concat", [up, p3], axis=1), 12 * w, 4 * w), 4 * w)
    d4 = g.c2f(g.conv(g.op("Concat", [g.conv(n3, 4 * w, 4 * w, 3, 2), n4], axis=1),
                      12 * w, 8 * w), 8 * w)
    d5 = g.c2f(g.conv(g.op("Concat", [g.conv(d4, 8 * w, 8 * w, 3, 2), p5], axis=1),
                      24 * w, 16 * w), 16 * w)
    y = detect_head(g, [n3, d4, d5], [4 * w, 8 * w, 16 * w], nc, [8, 16, 32])
    anchors = sum((size // s) ** 2 for s in (8, 16, 32))
    return finish(g, "yolov8_like", "images", size, y, [1, 4 + nc, anchors])


# ------------------------------------------------------ EfficientNet-Lite ---

def same_pad(g, x, k, s):
    """timm's pad_same (TensorFlow "same") as PyTorch exports F.pad of computed sizes."""
    pads = []
    for axis in (3, 2):  # torch's F.pad order: last axis first
        n = g.dim(x, axis)
        nf = g.op("Cast", [n], to=TensorProto.FLOAT)
        out = g.op("Cast", [g.op("Ceil", [g.op("Div", [nf, g.scalar(float(s), np.float32)])])],
                   to=TensorProto.INT64)
        total = g.op("Sub", [g.op("Add", [g.op("Mul", [g.op("Sub", [out, g.scalar(1)]),
                                                       g.scalar(s)]),
                                          g.scalar(k)]), n])
        total = g.op("Max", [total, g.scalar(0)])
        begin = g.op("Div", [total, g.scalar(2)])
        pads += [g.unsqueeze0(begin), g.unsqueeze0(g.op("Sub", [total, begin]))]
    torch_pads = g.op("Concat", pads, axis=0)
    # torch.onnx's _prepare_onnx_paddings: append zeros for N and C, then
    # reverse the (begin, end) pairs and transpose to ONNX's order.
    rest = g.op("ConstantOfShape", [g.ints([4])],
                value=helper.make_tensor("v", TensorProto.INT64, [1], [0]))
    full = g.op("Concat", [torch_pads, rest], axis=0)
    pairs = g.op("Reshape", [full, g.ints([-1, 2])])
    rev = g.op("Slice", [pairs, g.ints([-1]), g.ints([-(2 ** 63)]), g.ints([0]), g.ints([-1])])
    onnx_pads = g.op("Cast", [g.op("Reshape", [g.op("Transpose", [rev], perm=[1, 0]),
                                               g.ints([-1])])], to=TensorProto.INT64)
    return g.op("Pad", [x, onnx_pads, g.scalar(0.0, np.float32)], mode="constant")


def conv_same(g, x, c_in, c_out, k, s, group=1, act=True):
    w = g.rng.standard_normal((c_out, c_in // group, k, k)).astype(np.float32)
    w *= np.sqrt(2.0 / (c_in // group * k * k))
    b = (0.1 * g.rng.standard_normal(c_out)).astype(np.float32)
    y = g.name("conv")
    g.nodes.append(helper.make_node(
        "Conv", [same_pad(g, x, k, s), g.const("w", w), g.const("b", b)], [y], name=y,
        kernel_shape=[k, k], strides=[s, s], group=group))
    if not act:
        return y
    return g.op("Clip", [y, g.scalar(0.0, np.float32), g.scalar(6.0, np.float32)])


def efficientnet_lite(size, width, nc):
    g = Graph(0)
    ch = lambda c: max(8, int(c * width + 4) // 8 * 8)  # noqa: E731
    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    c = ch(32)
    x = conv_same(g, "images", 3, c, 3, 2)
    for expand, k, stride, c_out, repeats in stages:
        for r in range(repeats):
            s = stride if r == 0 else 1
            h = x
            mid = c * expand
            if expand != 1:
                h = conv_same(g, h, c, mid, 1, 1)
            h = conv_same(g, h, mid, mid, k, s, group=mid)
            h = conv_same(g, h, mid, ch(c_out), 1, 1, act=False)
            if s == 1 and c == ch(c_out):
                h = g.op("Add", [h, x])
            x, c = h, ch(c_out)
    x = conv_same(g, x, c, 1280, 1, 1)
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    wf = (g.rng.standard_normal((nc, 1280)) * np.sqrt(1.0 / 1280)).astype(np.float32)
    y = g.op("Gemm", [x, g.const("fc", wf), g.const("fcb", np.zeros(nc, np.float32))],
             transB=1)
    return finish(g, "efficientnet_lite_like", "images", size, y, [1, nc])


def finish(g, name, inp, size, out, out_shape):
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info(inp, TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["yolov8", "efficientnet_lite"])
    ap.add_argument("out")
    ap.add_argument("--size", type=int)
    ap.add_argument("--width", type=float)
    ap.add_argument("--classes", type=int)
    ap.add_argument("--reference", nargs=2, metavar=("N", "PREFIX"))
    a = ap.parse_args()
    if a.kind == "yolov8":
        model = yolov8(a.size or 320, int(a.width or 16), a.classes or 80)
        size = a.size or 320
    else:
        model = efficientnet_lite(a.size or 224, a.width or 1.0, a.classes or 1000)
        size = a.size or 224
    onnx.save(model, a.out)
    if a.reference:
        import onnxruntime as ort
        n = int(a.reference[0])
        x = np.random.default_rng(1).standard_normal((n, 1, 3, size, size)).astype(np.float32)
        s = ort.InferenceSession(a.out, providers=["CPUExecutionProvider"])
        y = np.stack([s.run(None, {"images": xi})[0] for xi in x])
        np.save(a.reference[1] + "_input.npy", x)
        np.save(a.reference[1] + "_output.npy", y)


if __name__ == "__main__":
    main()
