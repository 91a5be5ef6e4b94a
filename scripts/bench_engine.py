#!/usr/bin/env python3
"""Latency of ascend-quant's CPU simulator against onnxruntime (1 thread and all threads).

Models: the digits CNN and MobileNetV2 from ../shared/data (batch 1, as exported).
Our side runs `cargo bench --bench engine` (release build, median of N runs after warm-up);
onnxruntime runs the same input with full graph optimisations, median of N runs.

Usage: python3 scripts/bench_engine.py [--shared ../shared] [--runs 50]
Needs: onnxruntime, numpy.
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def mobilenet_input(shared):
    u8 = np.load(os.path.join(shared, "data", "imagenet-mobilenetv2", "calib_u8.npy"))[:1]
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    x = ((u8.astype(np.float32) / np.float32(255.0) - mean) / std).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def ours(model, x_path, runs, threads):
    env = dict(os.environ)
    if threads:
        env["RTEN_NUM_THREADS"] = str(threads)
    out = subprocess.run(
        ["cargo", "bench", "-q", "--bench", "engine", "--", model, x_path, str(runs)],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["median_ms"]


def onnxruntime(model, x, runs, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(5):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "-q", "--release", "--benches"], cwd=ROOT, check=True)
    cores = os.cpu_count()
    cases = [
        ("digits", os.path.join(args.shared, "data", "digits", "digits_cnn.onnx"),
         np.load(os.path.join(args.shared, "data", "digits", "test_x.npy"))[:1]),
        ("mobilenet_v2", os.path.join(args.shared, "data", "imagenet-mobilenetv2", "mobilenet_v2.onnx"),
         mobilenet_input(args.shared)),
    ]
    print(f"{'model':<14}{'threads':>8}{'ours ms':>10}{'ort ms':>10}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, x in cases:
            x_path = os.path.join(tmp, name + ".npy")
            np.save(x_path, x)
            for threads in (1, cores):
                a = ours(os.path.abspath(model), x_path, args.runs, threads)
                b = onnxruntime(model, x, args.runs, threads)
                print(f"{name:<14}{threads:>8}{a:>10.3f}{b:>10.3f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
