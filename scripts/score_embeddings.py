#!/usr/bin/env python3
"""Scores quantized sentence encoders against their float model with onnxruntime: the
cosine of each sentence embedding with its float embedding (mean and minimum) and the
nearest-neighbour agreement (for each sentence, is its most similar other sentence the
same under both models?). Inputs come from an .npz whose arrays are named like the
model's inputs; sentences are fed one at a time. Prints one JSON line per model.

    python3 scripts/score_embeddings.py --float minilm.onnx --eval eval.npz \
        --output 461 a_fake_quant_model.onnx ...

`--ort-baseline DIR` also builds onnxruntime's `quantize_static` models (MinMax and
Percentile, per-channel weights, MatMul/Gemm/Conv only) from `--calib` and scores them.
"""
import argparse
import json
import os
import time

import numpy as np


def embeddings(model, feeds, output):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    n = len(feeds[names[0]])
    return np.concatenate([s.run([output], {k: feeds[k][i:i + 1] for k in names})[0]
                           for i in range(n)]).reshape(n, -1)


def nearest(e):
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def score(ref, q):
    cos = np.sum(ref * q, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(q, axis=1))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "nn_agreement": float((nearest(ref) == nearest(q)).mean())}


def ort_baselines(model, calib, out_dir):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(next(iter(calib.values())))
            self.rows = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)])

        def get_next(self):
            return next(self.rows, None)

    os.makedirs(out_dir, exist_ok=True)
    made = []
    for method in (CalibrationMethod.MinMax, CalibrationMethod.Percentile):
        out = os.path.join(out_dir, f"ort_{method.name.lower()}.onnx")
        start = time.time()
        quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True, calibrate_method=method,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"])
        made.append((out, time.time() - start))
    return made


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--float", required=True)
    ap.add_argument("--eval", required=True, help=".npz named like the model's inputs")
    ap.add_argument("--output", required=True, help="the sentence-embedding output's name")
    ap.add_argument("--reference", help=".npy of the float embeddings (else computed)")
    ap.add_argument("--calib", help=".npz for --ort-baseline")
    ap.add_argument("--ort-baseline", metavar="DIR")
    ap.add_argument("models", nargs="*")
    a = ap.parse_args()
    feeds = dict(np.load(a.eval))
    ref = np.load(a.reference) if a.reference else embeddings(a.float, feeds, a.output)
    models = [(m, None) for m in a.models]
    if a.ort_baseline:
        models += ort_baselines(a.float, dict(np.load(a.calib)), a.ort_baseline)
    for m, seconds in models:
        row = dict(model=m, **score(ref, embeddings(m, feeds, a.output)))
        if seconds is not None:
            row["quantize_static_s"] = round(seconds, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
