#!/usr/bin/env python3
"""NUQ vs uniform int8 on MobileNetV2 and digits (the AMCT-parity issue's figures).

Calibrates each model uniformly (ARQ) and with NUQ (16 and 32 levels, 0 and 1
refinement passes), then scores every fake-quant model with onnxruntime against
the float model: MobileNetV2 on a 512-crop evaluation set made with the reference
data's make_crops.py (seed 303; calibration on 32 crops of seed 3), digits on its
500 labelled test images. Compression figures come from each run's report (entropy
of the int8 weights of the NUQ layers). Prints one JSON object.

    pip install numpy pillow scikit-image scikit-learn onnxruntime
    python3 scripts/nuq_vs_uniform.py --shared ../shared
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
from qat_vs_ptq import crops  # noqa: E402  (the same crops as the QAT benchmark)
from score import logits, score as score_pair  # noqa: E402
VARIANTS = {
    "uniform": None,
    "nuq32_it1": (32, 1),
    "nuq32_it0": (32, 0),
    "nuq16_it1": (16, 1),
    "nuq16_it0": (16, 0),
}


def score(ref, q, labels=None):
    out = score_pair(ref, q)
    if labels is not None:
        out["top1_accuracy"] = float((q.argmax(1) == labels).mean())
    return out


def run_variants(exe, model, data, work, tag, extra):
    results = {}
    for name, nuq in VARIANTS.items():
        prefix = os.path.join(work, f"{tag}_{name}")
        cmd = [exe, "calibrate", "--model", model, "--data", data, "--backend", "cpu",
               "--quiet", "--output", prefix] + extra
        if nuq:
            cfg = prefix + ".cfg"
            with open(cfg, "w") as f:
                f.write("nuq_config { nuq_quantize { num_steps: %d num_of_iteration: %d } }\n" % nuq)
            cmd += ["--simple-config", cfg]
        t = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
        wall = time.time() - t
        report = json.load(open(prefix + "_quant_report.json"))
        taken = [l["nuq"] for l in report["layers"] if l.get("nuq") and not l["nuq"].get("note")]
        kept = [l["name"] for l in report["layers"] if l.get("nuq") and l["nuq"].get("note")]
        entry = {"wall_s": wall}
        if taken:
            n = sum(t["weights"] for t in taken)
            entry.update({
                "nuq_layers": len(taken), "uniform_layers_with_note": len(kept),
                "nuq_weights": n,
                "bits_per_weight_uniform": sum(t["weights"] * t["bits_per_weight"][0] for t in taken) / n,
                "bits_per_weight_nuq": sum(t["weights"] * t["bits_per_weight"][1] for t in taken) / n,
            })
        results[name] = (prefix + "_fake_quant_model.onnx", entry)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--n-eval", type=int, default=512)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="nuq-bench-")
    os.makedirs(work, exist_ok=True)
    exe = os.path.join(ROOT, "target", "release", "ascend-quant")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    out = {}
    # MobileNetV2
    model = os.path.join(a.shared, "data", "imagenet-mobilenetv2", "mobilenet_v2.onnx")
    calib, ev = os.path.join(work, "calib.npy"), os.path.join(work, "eval.npy")
    if not os.path.exists(calib):
        crops(a.shared, 32, 3, calib)
    if not os.path.exists(ev):
        crops(a.shared, a.n_eval, 303, ev)
    x = np.load(ev)
    ref = logits(model, x)
    res = run_variants(exe, model, calib, work, "mnv2", ["--batch-num", "32"])
    out["mobilenet_v2"] = {k: dict(score(ref, logits(p, x)), **e) for k, (p, e) in res.items()}
    # digits
    d = os.path.join(ROOT, "tests", "fixtures", "digits")
    model = os.path.join(d, "digits_cnn.onnx")
    x, y = np.load(os.path.join(d, "test_x.npy")), np.load(os.path.join(d, "test_y.npy"))
    ref = logits(model, x)
    res = run_variants(exe, model, os.path.join(d, "calib_x.npy"), work, "digits", [])
    out["digits"] = {"float_accuracy": float((ref.argmax(1) == y).mean())}
    out["digits"].update({k: dict(score(ref, logits(p, x), y), **e) for k, (p, e) in res.items()})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
