#!/usr/bin/env python3
"""Latency of ascend-quant's CPU engines against onnxruntime (1 thread and all threads).

Models: the digits CNN and MobileNetV2 from ../shared/data, and the detector-style
network of scripts/make_yolo_like.py (320×320), all batch 1. Our side runs
`cargo bench --bench engine` (release build, median of N runs after warm-up) for the
CPU executor users get (native kernels) and for the rten engine alone; onnxruntime
runs the same input with full graph optimisations, median of N runs. The three are
measured in turn, three rounds, and each figure is the median of its rounds, so a
drift of the machine's speed hits all three alike.

Usage: python3 scripts/bench_engine.py [--shared ../shared] [--runs 50]
Needs: onnxruntime, onnx, numpy.
"""
import argparse
import json
import os
import subprocess
import sys
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


def ours(model, x_path, runs, threads, engine="native"):
    env = dict(os.environ, ENGINE=engine)
    if threads:
        env["RTEN_NUM_THREADS"] = str(threads)
        env["RAYON_NUM_THREADS"] = str(threads)
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
    with tempfile.TemporaryDirectory() as tmp:
        yolo = os.path.join(tmp, "yolo_like.onnx")
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_yolo_like.py"), yolo],
                       check=True)
        cases = [
            ("digits", os.path.join(args.shared, "data", "digits", "digits_cnn.onnx"),
             np.load(os.path.join(args.shared, "data", "digits", "test_x.npy"))[:1]),
            ("mobilenet_v2", os.path.join(args.shared, "data", "imagenet-mobilenetv2", "mobilenet_v2.onnx"),
             mobilenet_input(args.shared)),
            ("yolo_like_320", yolo,
             np.random.default_rng(0).standard_normal((1, 3, 320, 320)).astype(np.float32)),
        ]
        print(f"{'model':<15}{'threads':>8}{'native ms':>11}{'rten ms':>9}{'ort ms':>8}"
              f"{'native/ort':>12}{'rten/ort':>10}")
        rows = []
        for name, model, x in cases:
            x_path = os.path.join(tmp, name + ".npy")
            np.save(x_path, x)
            for threads in (1, cores):
                rounds = [(ours(os.path.abspath(model), x_path, args.runs, threads),
                           ours(os.path.abspath(model), x_path, args.runs, threads, "rten"),
                           onnxruntime(model, x, args.runs, threads)) for _ in range(3)]
                a, b, c = (float(np.median([r[i] for r in rounds])) for i in range(3))
                print(f"{name:<15}{threads:>8}{a:>11.3f}{b:>9.3f}{c:>8.3f}{a / c:>12.2f}{b / c:>10.2f}")
                rows.append(dict(model=name, threads=threads, native_ms=a, rten_ms=b, ort_ms=c))
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
