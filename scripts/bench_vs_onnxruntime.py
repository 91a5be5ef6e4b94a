#!/usr/bin/env python3
"""Calibration speed, memory and accuracy: ascend-quant vs onnxruntime's quantize_static.

On MobileNetV2 from ../shared/data/imagenet-mobilenetv2 (32 calibration and 64 evaluation
crops), runs `ascend-quant calibrate` once per calibrator and onnxruntime's quantize_static
(MinMax, Percentile, Entropy; per-channel weights; QDQ), each in its own process under
/usr/bin/time -v, and prints wall time, peak RSS and the top-1 agreement of the quantized
model with the float model on the evaluation crops (all models evaluated by onnxruntime with
graph optimisations off, so the fake-quant arithmetic is exact).

Usage: python3 scripts/bench_vs_onnxruntime.py [--shared ../shared] [--batch-size 4]
Needs: onnxruntime, onnx, numpy, GNU time (apt-get install time).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

ORT_CHILD = r'''
import sys, numpy as np
from onnxruntime.quantization import quantize_static, CalibrationDataReader, QuantFormat, CalibrationMethod
model, calib, out, method = sys.argv[1:5]
x = np.load(calib)
class Reader(CalibrationDataReader):
    def __init__(self): self.i = 0
    def get_next(self):
        if self.i >= len(x): return None
        self.i += 1
        return {"x": x[self.i - 1:self.i]}
quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                calibrate_method=getattr(CalibrationMethod, method))
'''


def normalised(path):
    u8 = np.load(path)
    x = ((u8.astype(np.float32) / np.float32(255.0) - MEAN) / STD).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def timed(cmd):
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", r.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rss_mb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
    return seconds, rss_mb


def agreement(model, x, ref):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    top1 = np.array([s.run(None, {"x": x[i:i + 1]})[0].argmax() for i in range(len(x))])
    return float((top1 == ref).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--batch-size", type=int, default=1)
    args = ap.parse_args()
    data = os.path.join(args.shared, "data", "imagenet-mobilenetv2")
    model = os.path.join(data, "mobilenet_v2.onnx")
    subprocess.run(["cargo", "build", "-q", "--release"], cwd=ROOT, check=True)
    exe = os.path.join(ROOT, "target", "release", "ascend-quant")
    ref = np.load(os.path.join(data, "eval_ref_top1.npy"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = os.path.join(tmp, "calib.npy")
        np.save(calib, normalised(os.path.join(data, "calib_u8.npy")))
        x_eval = normalised(os.path.join(data, "eval_u8.npy"))
        cfg_path = os.path.join(tmp, "config.json")
        subprocess.run([exe, "config", "--model", model, "--output", cfg_path], check=True, capture_output=True)
        base = json.load(open(cfg_path))
        algos = {"ifmr": {}, "hfmg": {"num_of_bins": 4096}, "minmax": {}, "percentile": {"percentile": 99.999}, "kl": {"num_of_bins": 2048}}
        for algo, params in algos.items():
            cfg = dict(base)
            cfg["batch_num"] = 32 // args.batch_size
            for k, v in cfg.items():
                if isinstance(v, dict) and "activation_quant_params" in v:
                    v["activation_quant_params"] = {"num_bits": 8, "act_algo": algo, **params}
            path = os.path.join(tmp, f"{algo}.json")
            json.dump(cfg, open(path, "w"))
            prefix = os.path.join(tmp, f"aq_{algo}")
            t, rss = timed([exe, "calibrate", "--quiet", "--model", model, "--data", calib, "--config", path,
                            "--batch-size", str(args.batch_size), "--output", prefix])
            rows.append((f"ascend-quant {algo}", t, rss, agreement(prefix + "_fake_quant_model.onnx", x_eval, ref)))
        child = os.path.join(tmp, "ort_child.py")
        open(child, "w").write(ORT_CHILD)
        for method in ["MinMax", "Percentile", "Entropy"]:
            out = os.path.join(tmp, f"ort_{method}.onnx")
            t, rss = timed([sys.executable, child, model, calib, out, method])
            rows.append((f"onnxruntime {method}", t, rss, agreement(out, x_eval, ref)))
    print(f"{'tool':<28}{'wall s':>8}{'peak RSS MB':>13}{'top-1 agreement':>17}")
    for name, t, rss, acc in rows:
        print(f"{name:<28}{t:>8.2f}{rss:>13.0f}{acc:>17.3f}")


if __name__ == "__main__":
    main()
