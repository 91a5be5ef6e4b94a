#!/usr/bin/env python3
"""Per-image cost of `ascend-quant run` as users call it, against onnxruntime.

For each model: `ascend-quant run` (release build) on 4 and on 36 random samples,
each the best of --reps processes; the per-image slope (t36 - t4) / 32 takes out
the process's start and the model's loading. onnxruntime: one session (default
threads, all graph optimisations), the median of --runs single-image runs after
warm-up, measured in the same run of this script. Prints one line per model:
slope, onnxruntime's latency and their ratio.

Models: MobileNetV2 (../shared/data/imagenet-mobilenetv2, fixed batch 1) and the
two exports of scripts/make_export_like.py (YOLOv8 320 with its Detect head,
EfficientNet-Lite0 224 with TF-style computed padding) and a ViT-S/16 224 of
scripts/make_vit_like.py (12 blocks, width 384, bicubic position embeddings),
written to a temporary folder.

With --minilm MODEL --minilm-data eval.npz (../shared/data/minilm-l3: run its fetch.sh),
also the MiniLM-L3 sentence encoder on 4 and 36 of those sentences (64 tokens each).
--threads N runs both engines on N threads (RAYON_NUM_THREADS for ascend-quant,
intra_op_num_threads for onnxruntime); default: each engine's own default.

Usage: python3 scripts/bench_run_vs_onnxruntime.py [--shared ../shared] [--reps 3] [--runs 50]
       [--only NAME] [--threads N] [--minilm M.onnx --minilm-data eval.npz]
Needs: onnxruntime, onnx, numpy; cargo build --release first.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BIN = os.path.join(ROOT, "target", "release", "ascend-quant")


def run_cli(model, data, out, reps, threads=None):
    env = dict(os.environ)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run([BIN, "run", model, "--input", data, "--output-dir", out],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        best = min(best, time.perf_counter() - t)
    return best


def ort_latency(model, x, runs, threads=None):
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    feeds = x if isinstance(x, dict) else {s.get_inputs()[0].name: x}
    for _ in range(5):
        s.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--only")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--minilm")
    ap.add_argument("--minilm-data")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    if a.minilm and (not a.only or a.only == "minilm"):
        bench_minilm(a, tmp)
        if a.only == "minilm":
            return
    models = {"mobilenetv2": (os.path.join(a.shared, "data", "imagenet-mobilenetv2",
                                           "mobilenet_v2.onnx"), 224)}
    for kind, size in (("yolov8", 320), ("efficientnet_lite", 224)):
        path = os.path.join(tmp, kind + ".onnx")
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_export_like.py"),
                        kind, path], check=True)
        models[kind] = (path, size)
    path = os.path.join(tmp, "vit_s.onnx")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_vit_like.py"), path],
                   check=True)
    models["vit_s"] = (path, 224)
    rng = np.random.default_rng(0)
    for name, (path, size) in models.items():
        if a.only and name != a.only:
            continue
        data = {}
        for n in (4, 36):
            data[n] = os.path.join(tmp, f"{name}_{n}.npy")
            np.save(data[n], rng.standard_normal((n, 3, size, size)).astype(np.float32))
        out = os.path.join(tmp, "out")
        os.makedirs(out, exist_ok=True)
        t4 = run_cli(path, data[4], out, a.reps, a.threads)
        t36 = run_cli(path, data[36], out, a.reps, a.threads)
        slope = (t36 - t4) / 32
        x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        ref = ort_latency(path, x, a.runs, a.threads)
        print(f"{name:18} run slope {slope * 1e3:7.2f} ms/image  (4: {t4:.3f} s, 36: {t36:.3f} s)"
              f"  onnxruntime {ref * 1e3:6.2f} ms  ratio {slope / ref:5.2f}x", flush=True)


def bench_minilm(a, tmp):
    d = np.load(a.minilm_data)
    data = {}
    for n in (4, 36):
        data[n] = os.path.join(tmp, f"minilm_{n}.npz")
        np.savez(data[n], **{k: d[k][:n] for k in d.files})
    out = os.path.join(tmp, "out")
    os.makedirs(out, exist_ok=True)
    t4 = run_cli(a.minilm, data[4], out, a.reps, a.threads)
    t36 = run_cli(a.minilm, data[36], out, a.reps, a.threads)
    slope = (t36 - t4) / 32
    ref = ort_latency(a.minilm, {k: d[k][:1] for k in d.files}, a.runs, a.threads)
    print(f"{'minilm':18} run slope {slope * 1e3:7.2f} ms/sentence (4: {t4:.3f} s, 36: {t36:.3f} s)"
          f"  onnxruntime {ref * 1e3:6.2f} ms  ratio {slope / ref:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
