#!/usr/bin/env python3
"""Writes the conformance fixtures of tests/fixtures/ (committed; cargo test never runs this).

For every single-operator test case that onnx's Python package generates offline
(onnx.backend.test.case.node.collect_testcases) for the operators ascend-quant must
run, it saves the model, its inputs and onnxruntime's outputs. When onnxruntime
cannot run a case, the onnx package's own reference outputs are kept instead and
the manifest says so. It also copies the digits CNN with a few test images and
onnxruntime's logits for them.

Usage: python3 scripts/make_fixtures.py [--shared ../shared]
Needs: onnx, onnxruntime, numpy (pip install onnx onnxruntime numpy).
"""
import argparse
import json
import os
import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx.backend.test.case import node as node_cases

OPS = [
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Sub", "Div", "Relu",
    "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Tanh",
    "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten",
    "Reshape", "Transpose", "Concat", "Softmax", "Pad", "Resize", "Squeeze",
    "Unsqueeze", "Gather", "Slice", "Shape", "Cast", "QuantizeLinear", "DequantizeLinear",
]

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def ort_outputs(model, inputs):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: np.asarray(v) for i, v in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feed)


def save_case(out_dir, model, inputs, outputs):
    os.makedirs(out_dir, exist_ok=True)
    onnx.save(model, os.path.join(out_dir, "model.onnx"))
    for k, v in enumerate(inputs):
        np.save(os.path.join(out_dir, f"input_{k}.npy"), np.asarray(v))
    for k, v in enumerate(outputs):
        np.save(os.path.join(out_dir, f"output_{k}.npy"), np.asarray(v))


def node_fixtures():
    base = os.path.join(ROOT, "node")
    shutil.rmtree(base, ignore_errors=True)
    manifest = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases(None)
    for case in sorted(cases, key=lambda c: c.name):
        graph = case.model.graph
        if len(graph.node) != 1 or graph.node[0].op_type not in OPS or not case.data_sets:
            continue
        inputs, expected = case.data_sets[0]
        if any(np.asarray(v).dtype.kind in "OUS" for v in list(inputs) + list(expected)):
            continue  # string tensors: not a numeric operator test
        reference = "onnxruntime"
        try:
            outputs = ort_outputs(case.model, inputs)
        except Exception as e:  # onnxruntime lacks this case: keep onnx's reference
            reference = "onnx-reference (onnxruntime: %s)" % str(e).splitlines()[0][:120]
            outputs = expected
        name = case.name[len("test_"):] if case.name.startswith("test_") else case.name
        save_case(os.path.join(base, name), case.model, inputs, outputs)
        manifest.append({
            "name": name,
            "op_type": graph.node[0].op_type,
            "inputs": len(inputs),
            "outputs": len(outputs),
            "reference": reference,
        })
    with open(os.path.join(base, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def digits_fixture(shared):
    src = os.path.join(shared, "data", "digits")
    dst = os.path.join(ROOT, "digits")
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "digits_cnn.onnx"), os.path.join(dst, "digits_cnn.onnx"))
    for f in ["calib_x.npy", "test_x.npy", "test_y.npy"]:
        shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    x = np.load(os.path.join(src, "test_x.npy"))[:16]
    sess = ort.InferenceSession(os.path.join(src, "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.save(os.path.join(dst, "ort_x16.npy"), x)
    np.save(os.path.join(dst, "ort_logits16.npy"), logits)
    # Intermediate value after the first ReLU, for tap/replay tests.
    model = onnx.load(os.path.join(src, "digits_cnn.onnx"))
    relu = [n for n in model.graph.node if n.op_type == "Relu"][0].output[0]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(relu))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    tap = sess.run([relu], {"x": x[:1]})[0]
    np.save(os.path.join(dst, "ort_first_relu_x0.npy"), tap)
    with open(os.path.join(dst, "first_relu_name.txt"), "w") as f:
        f.write(relu)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    args = ap.parse_args()
    manifest = node_fixtures()
    digits_fixture(args.shared)
    by_ref = {}
    for m in manifest:
        by_ref[m["reference"].split(" ")[0]] = by_ref.get(m["reference"].split(" ")[0], 0) + 1
    print(f"{len(manifest)} node cases written ({by_ref}); onnx {onnx.__version__}, onnxruntime {ort.__version__}")


if __name__ == "__main__":
    main()
