#!/usr/bin/env python3
"""QAT vs PTQ on MobileNetV2, measured side by side (the QAT issue's benchmark).

Makes a training set and a separate evaluation set of photo crops with the reference
data's make_crops.py (seeds of our choice), runs `ascend-quant calibrate` (PTQ) and
`ascend-quant qat` (distillation, one epoch) on the training crops, and scores both
fake-quant models with onnxruntime on the evaluation crops against the float model:
mean logit cosine and top-1 agreement. Prints one JSON object; also wall time and peak
RSS of each command (from /usr/bin/time if present, else resource usage of children).

    pip install numpy pillow scikit-image scikit-learn onnxruntime
    python3 scripts/qat_vs_ptq.py --shared ../shared --n-train 512 --n-eval 512
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from score import logits, score  # noqa: E402
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def crops(shared, n, seed, out):
    data = os.path.join(shared, "data", "imagenet-mobilenetv2")
    sys.path.insert(0, data)
    import make_crops  # the reference data's own script
    u8 = make_crops.crops(n, seed)
    x = ((u8.astype(np.float32) / np.float32(255.0) - MEAN) / STD).transpose(0, 3, 1, 2)
    np.save(out, np.ascontiguousarray(x, dtype=np.float32))


def timed(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall, after.ru_maxrss / 1024.0, (after.ru_utime - before.ru_utime)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=512)
    ap.add_argument("--train-seed", type=int, default=101)
    ap.add_argument("--eval-seed", type=int, default=202)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", default="1e-5")
    ap.add_argument("--clip-lr", default="1e-3")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="qat-bench-")
    os.makedirs(work, exist_ok=True)
    model = os.path.join(a.shared, "data", "imagenet-mobilenetv2", "mobilenet_v2.onnx")
    train, ev = os.path.join(work, "train.npy"), os.path.join(work, "eval.npy")
    if not os.path.exists(train):
        crops(a.shared, a.n_train, a.train_seed, train)
    if not os.path.exists(ev):
        crops(a.shared, a.n_eval, a.eval_seed, ev)
    exe = os.path.join(ROOT, "target", "release", "ascend-quant")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    ptq = timed([exe, "calibrate", "--model", model, "--data", train, "--batch-num", "32",
                 "--backend", "cpu", "--quiet", "--output", os.path.join(work, "ptq")])
    qat = timed([exe, "qat", "--model", model, "--data", train, "--epochs", "1",
                 "--batch-size", str(a.batch_size), "--lr", a.lr, "--clip-lr", a.clip_lr,
                 "--quiet", "--output", os.path.join(work, "qat")])
    x = np.load(ev)
    ref = logits(model, x)
    report = json.load(open(os.path.join(work, "qat_qat_report.json")))
    out = {
        "train_crops": a.n_train, "eval_crops": a.n_eval,
        "seeds": [a.train_seed, a.eval_seed],
        "ptq": dict(score(ref, logits(os.path.join(work, "ptq_fake_quant_model.onnx"), x)),
                    wall_s=ptq[0]),
        "qat": dict(score(ref, logits(os.path.join(work, "qat_fake_quant_model.onnx"), x)),
                    wall_s=qat[0], training_s=report["seconds"]["training"],
                    images_per_s=a.n_train / report["seconds"]["training"],
                    first_loss=report["loss_per_step"][0], last_loss=report["loss_per_step"][-1]),
        "peak_rss_mb_children": max(ptq[1], qat[1]),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
