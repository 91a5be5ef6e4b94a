#!/usr/bin/env python3
"""Writes a detector-style ONNX model for engine benchmarks: the operator mix of
YOLOv8n (Conv + SiLU as Sigmoid·Mul, residual bottlenecks, Concat, an SPPF block
of three 5×5 MaxPools, nearest 2× Resize in a top-down neck, two 1×1 heads), with
random weights (He-scaled, seed 0). Input [1, 3, SIZE, SIZE] (default 320).

    python3 scripts/make_yolo_like.py OUT.onnx [--size 320] [--width 16]
Needs: numpy, onnx.
"""
import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, kind):
        self.n += 1
        return f"{kind}_{self.n}"

    def const(self, kind, array):
        name = self.name(kind)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def conv(self, x, c_in, c_out, k=1, s=1, act=True):
        w = self.rng.standard_normal((c_out, c_in, k, k)).astype(np.float32)
        w *= np.sqrt(2.0 / (c_in * k * k))
        b = (0.1 * self.rng.standard_normal(c_out)).astype(np.float32)
        y = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const("w", w), self.const("b", b)], [y], name=y,
            kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4))
        if not act:
            return y
        sig, out = self.name("sigmoid"), self.name("silu")
        self.nodes.append(helper.make_node("Sigmoid", [y], [sig], name=sig))
        self.nodes.append(helper.make_node("Mul", [y, sig], [out], name=out))
        return out

    def op(self, op, inputs, **attrs):
        y = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [y], name=y, **attrs))
        return y

    def c2f(self, x, c, n=1):
        """Two 1×1 branches, n residual 3×3 bottlenecks on one, all concatenated."""
        a = self.conv(x, c, c // 2)
        b = self.conv(x, c, c // 2)
        parts = [a, b]
        for _ in range(n):
            h = self.conv(self.conv(b, c // 2, c // 2, 3), c // 2, c // 2, 3)
            b = self.op("Add", [b, h])
            parts.append(b)
        return self.conv(self.op("Concat", parts, axis=1), (2 + n) * c // 2, c)

    def sppf(self, x, c):
        h = self.conv(x, c, c // 2)
        p1 = self.op("MaxPool", [h], kernel_shape=[5, 5], strides=[1, 1], pads=[2] * 4)
        p2 = self.op("MaxPool", [p1], kernel_shape=[5, 5], strides=[1, 1], pads=[2] * 4)
        p3 = self.op("MaxPool", [p2], kernel_shape=[5, 5], strides=[1, 1], pads=[2] * 4)
        return self.conv(self.op("Concat", [h, p1, p2, p3], axis=1), 2 * c, c)

    def upsample(self, x):
        roi = self.const("roi", np.zeros(0, np.float32))
        scales = self.const("scales", np.array([1, 1, 2, 2], np.float32))
        return self.op("Resize", [x, roi, scales], mode="nearest",
                       coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def build(size, width):
    g = Builder(0)
    w = width
    x = g.conv("images", 3, w, 3, 2)            # /2
    x = g.conv(x, w, 2 * w, 3, 2)               # /4
    x = g.c2f(x, 2 * w)
    x = g.conv(x, 2 * w, 4 * w, 3, 2)           # /8
    p3 = g.c2f(x, 4 * w, 2)
    x = g.conv(p3, 4 * w, 8 * w, 3, 2)          # /16
    p4 = g.c2f(x, 8 * w, 2)
    x = g.conv(p4, 8 * w, 16 * w, 3, 2)         # /32
    x = g.c2f(x, 16 * w)
    p5 = g.sppf(x, 16 * w)
    up = g.upsample(p5)                          # /16
    n4 = g.c2f(g.conv(g.op("Concat", [up, p4], axis=1), 24 * w, 8 * w), 8 * w)
    up = g.upsample(n4)                          # /8
    n3 = g.c2f(g.conv(g.op("Concat", [up, p3], axis=1), 12 * w, 4 * w), 4 * w)
    head3 = g.conv(n3, 4 * w, 84, act=False)
    head4 = g.conv(n4, 8 * w, 84, act=False)
    graph = helper.make_graph(
        g.nodes, "yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(head3, TensorProto.FLOAT, [1, 84, size // 8, size // 8]),
         helper.make_tensor_value_info(head4, TensorProto.FLOAT, [1, 84, size // 16, size // 16])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--width", type=int, default=16)
    a = ap.parse_args()
    onnx.save(build(a.size, a.width), a.out)


if __name__ == "__main__":
    main()
