#!/usr/bin/env python3
"""Scores quantized models against their float model with onnxruntime: mean logit
cosine and top-1 agreement on an evaluation set (.npy, axis 0 = samples, fed one at
a time so fixed-batch models work). Prints one JSON line per model.

    python3 scripts/score.py --float mobilenet_v2.onnx --eval eval.npy a_fake_quant_model.onnx ...
"""
import argparse
import json

import numpy as np


def logits(model, x):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def score(ref, q):
    cos = np.sum(ref * q, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(q, axis=1))
    return {"logit_cosine": float(cos.mean()),
            "top1_agreement": float((ref.argmax(1) == q.argmax(1)).mean())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--float", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("models", nargs="+")
    a = ap.parse_args()
    x = np.load(a.eval)
    ref = logits(a.float, x)
    for m in a.models:
        print(json.dumps(dict(model=m, **score(ref, logits(m, x)))), flush=True)


if __name__ == "__main__":
    main()
