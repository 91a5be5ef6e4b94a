#!/usr/bin/env python3
"""Writes a ViT in the shape timm and Hugging Face exports take (random
weights, seed 0), for the engine's tests and benchmarks:

* patch embedding: a Conv with stride = patch, flattened by Reshape and
  Transpose to tokens, a class token joined by Concat;
* position embeddings trained at another grid and adapted to the image by
  bicubic interpolation, as `interpolate_pos_encoding` exports it (Slice,
  Reshape, Transpose, Resize cubic with pytorch_half_pixel coordinates and
  cubic_coeff_a -0.75, Transpose, Reshape, Concat);
* blocks with LayerNorm decomposed as older exports write it (ReduceMean,
  Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add), attention with
  two-input MatMuls (q @ k^T scaled, Softmax, @ v; qkv split by Reshape,
  Transpose and Gather), the exact GELU through Erf, residual Adds;
* a final LayerNormalization (opset 17 operator), the class token taken by
  Gather, a linear head.

    python3 scripts/make_vit_like.py OUT.onnx [--size 224] [--patch 16] [--dim 384]
        [--heads 6] [--depth 12] [--trained-grid 12] [--classes 1000]
        [--reference N PREFIX]   also writes N random inputs (PREFIX_input.npy,
                                 [N, 1, 3, S, S]) and onnxruntime's outputs
                                 (PREFIX_output.npy, [N, 1, classes])
Needs: numpy, onnx (onnxruntime for --reference).
"""
import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(size, patch, dim, heads, depth, trained_grid, classes):
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    count = [0]

    def name(base):
        count[0] += 1
        return f"/{base}_{count[0]}"

    def const(base, array):
        n = name(base)
        inits.append(numpy_helper.from_array(np.asarray(array), n))
        return n

    def weight(base, shape, scale):
        return const(base, (rng.standard_normal(shape) * scale).astype(np.float32))

    def op(kind, inputs, base=None, **attrs):
        out = name(base or kind.lower())
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def layer_norm(x):
        mean = op("ReduceMean", [x], axes=[-1], keepdims=1)
        centred = op("Sub", [x, mean])
        var = op("ReduceMean", [op("Pow", [centred, const("two", np.float32(2.0))])],
                 axes=[-1], keepdims=1)
        std = op("Sqrt", [op("Add", [var, const("eps", np.float32(1e-6))])])
        normed = op("Div", [centred, std])
        gamma = const("gamma", (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        beta = const("beta", (0.1 * rng.standard_normal(dim)).astype(np.float32))
        return op("Add", [op("Mul", [normed, gamma]), beta])

    def linear(x, fan_in, fan_out):
        w = weight("weight", (fan_in, fan_out), 1.0 / np.sqrt(fan_in))
        b = weight("bias", (fan_out,), 0.02)
        return op("Add", [op("MatMul", [x, w]), b])

    grid = size // patch
    tokens = grid * grid + 1
    head_dim = dim // heads
    x = op("Conv", ["pixel_values", weight("patch_w", (dim, 3, patch, patch), 0.05),
                    weight("patch_b", (dim,), 0.02)],
           kernel_shape=[patch, patch], strides=[patch, patch])
    x = op("Reshape", [x, const("shape", np.array([1, dim, grid * grid], np.int64))])
    x = op("Transpose", [x], perm=[0, 2, 1])
    cls = weight("cls_token", (1, 1, dim), 0.02)
    x = op("Concat", [cls, x], axis=1)
    # Position embeddings trained at trained_grid, interpolated bicubically.
    pos = weight("pos_embed", (1, 1 + trained_grid * trained_grid, dim), 0.02)
    pos_cls = op("Slice", [pos, const("start", np.array([0], np.int64)),
                           const("end", np.array([1], np.int64)),
                           const("axis", np.array([1], np.int64))])
    pos_grid = op("Slice", [pos, const("start", np.array([1], np.int64)),
                            const("end", np.array([1 << 62], np.int64)),
                            const("axis", np.array([1], np.int64))])
    pos_grid = op("Reshape", [pos_grid, const("shape", np.array(
        [1, trained_grid, trained_grid, dim], np.int64))])
    pos_grid = op("Transpose", [pos_grid], perm=[0, 3, 1, 2])
    pos_grid = op("Resize", [pos_grid, "", "", const("sizes", np.array(
        [1, dim, grid, grid], np.int64))], mode="cubic",
        coordinate_transformation_mode="pytorch_half_pixel", cubic_coeff_a=-0.75,
        nearest_mode="floor")
    pos_grid = op("Transpose", [pos_grid], perm=[0, 2, 3, 1])
    pos_grid = op("Reshape", [pos_grid, const("shape", np.array([1, grid * grid, dim], np.int64))])
    x = op("Add", [x, op("Concat", [pos_cls, pos_grid], axis=1)])
    for _ in range(depth):
        h = layer_norm(x)
        qkv = linear(h, dim, 3 * dim)
        qkv = op("Reshape", [qkv, const("shape", np.array(
            [1, tokens, 3, heads, head_dim], np.int64))])
        qkv = op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
        q, k, v = (op("Gather", [qkv, const("index", np.array(i, np.int64))], axis=0)
                   for i in range(3))
        att = op("MatMul", [q, op("Transpose", [k], perm=[0, 1, 3, 2])])
        att = op("Mul", [att, const("scale", np.float32(head_dim ** -0.5))])
        att = op("Softmax", [att], axis=-1)
        h = op("MatMul", [att, v])
        h = op("Transpose", [h], perm=[0, 2, 1, 3])
        h = op("Reshape", [h, const("shape", np.array([1, tokens, dim], np.int64))])
        x = op("Add", [x, linear(h, dim, dim)])
        h = linear(layer_norm(x), dim, 4 * dim)
        erf = op("Erf", [op("Div", [h, const("sqrt2", np.float32(np.sqrt(2.0)))])])
        h = op("Mul", [op("Mul", [h, op("Add", [erf, const("one", np.float32(1.0))])]),
                       const("half", np.float32(0.5))])
        x = op("Add", [x, linear(h, 4 * dim, dim)])
    x = op("LayerNormalization", [x, const("gamma", np.ones(dim, np.float32)),
                                  const("beta", np.zeros(dim, np.float32))],
           axis=-1, epsilon=1e-6)
    x = op("Gather", [x, const("index", np.array(0, np.int64))], axis=1)
    logits = linear(x, dim, classes)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))
    graph = helper.make_graph(
        nodes, "vit_like",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="pytorch", producer_version="2.5.0")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--trained-grid", type=int, default=12)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--reference", nargs=2, metavar=("N", "PREFIX"))
    a = p.parse_args()
    model = build(a.size, a.patch, a.dim, a.heads, a.depth, a.trained_grid, a.classes)
    onnx.save(model, a.out)
    print(f"wrote {a.out}: {len(model.graph.node)} nodes")
    if a.reference:
        import onnxruntime as ort
        n, prefix = int(a.reference[0]), a.reference[1]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(a.out, opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1)
        xs = rng.standard_normal((n, 1, 3, a.size, a.size)).astype(np.float32)
        ys = np.stack([sess.run(None, {"pixel_values": x})[0] for x in xs])
        np.save(f"{prefix}_input.npy", xs)
        np.save(f"{prefix}_output.npy", ys)
        print(f"wrote {prefix}_input.npy {xs.shape}, {prefix}_output.npy {ys.shape}")


if __name__ == "__main__":
    main()
