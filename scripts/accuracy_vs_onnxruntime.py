#!/usr/bin/env python3
"""Accuracy of `calibrate` (plain and --optimize) against onnxruntime's quantize_static
(MinMax, Percentile, Entropy; per-channel int8 weights, uint8 activations, QDQ) on
MobileNetV2: the same 32 calibration crops (seed 3), 512 held-out evaluation crops
(seed 303), every model scored by onnxruntime against the float model (mean logit
cosine, top-1 agreement), wall time of each calibration. Prints one JSON object.

    pip install numpy onnx onnxruntime pillow scikit-image scikit-learn
    python3 scripts/accuracy_vs_onnxruntime.py --shared ../shared
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from qat_vs_ptq import crops  # noqa: E402
from score import logits, score  # noqa: E402


def main():
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self, x):
            self.rows = iter([{"x": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.rows, None)

    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--n-eval", type=int, default=512)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="accuracy-")
    os.makedirs(work, exist_ok=True)
    model = os.path.join(a.shared, "data", "imagenet-mobilenetv2", "mobilenet_v2.onnx")
    calib, ev = os.path.join(work, "calib.npy"), os.path.join(work, "eval.npy")
    if not os.path.exists(calib):
        crops(a.shared, 32, 3, calib)
    if not os.path.exists(ev):
        crops(a.shared, a.n_eval, 303, ev)
    x, c = np.load(ev), np.load(calib)
    ref = logits(model, x)
    out = {"calibration_crops": 32, "eval_crops": len(x), "onnxruntime": {}, "ascend_quant": {}}
    for method in ["MinMax", "Percentile", "Entropy"]:
        dst = os.path.join(work, f"ort_{method}.onnx")
        t = time.time()
        quantize_static(model, dst, Reader(c), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
        out["onnxruntime"][method] = dict(score(ref, logits(dst, x)), wall_s=time.time() - t)
    exe = os.path.join(ROOT, "target", "release", "ascend-quant")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    for tag, extra in [("plain", []), ("optimize", ["--optimize"])]:
        prefix = os.path.join(work, f"ours_{tag}")
        t = time.time()
        subprocess.run([exe, "calibrate", "--model", model, "--data", calib, "--batch-num", "32",
                        "--backend", "cpu", "--quiet", "--output", prefix] + extra, check=True)
        wall = time.time() - t
        out["ascend_quant"][tag] = dict(
            score(ref, logits(prefix + "_fake_quant_model.onnx", x)), wall_s=wall)
    best = max(out["onnxruntime"].values(), key=lambda r: r["top1_agreement"])
    out["onnxruntime_best_top1_agreement"] = best["top1_agreement"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
