#!/usr/bin/env python3
"""convert-qat on MobileNetV2: a QDQ model made by onnxruntime's quantize_static
(per-channel int8 weights, uint8 activations, 32 calibration crops of seed 3), converted
with `ascend-quant convert-qat`, its deploy model run on our simulator over 512
evaluation crops (seed 303), compared element by element with onnxruntime running the
QDQ model: the fraction of logits within one quantization step of the QDQ model's
output, the largest difference in steps, top-1 agreement, and both models' agreement
with the float model. For scale, the same figures for our fake-quant model and for
onnxruntime running the QDQ model without its graph optimizations (float fake
quantization instead of its integer kernels). Prints one JSON object.

    pip install numpy onnx onnxruntime pillow scikit-image scikit-learn
    python3 scripts/convert_qat_check.py --shared ../shared
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


def main():
    import onnx
    import onnxruntime as ort
    from qat_vs_ptq import crops
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--n-eval", type=int, default=512)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="convert-qat-")
    os.makedirs(work, exist_ok=True)
    exe = os.path.join(ROOT, "target", "release", "ascend-quant")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    qdq = os.path.join(work, "mnv2_qdq.onnx")
    if not os.path.exists(qdq):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_qdq_fixtures.py"),
                        "--mobilenet", qdq, "--shared", a.shared], check=True)
    ev = os.path.join(work, "eval.npy")
    if not os.path.exists(ev):
        crops(a.shared, a.n_eval, 303, ev)
    x = np.load(ev)
    t = time.time()
    r = subprocess.run([exe, "convert-qat", "--model", qdq, "--output",
                        os.path.join(work, "conv"), "--quiet"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr)
    convert_s = time.time() - t
    report = json.load(open(os.path.join(work, "conv_quant_report.json")))

    def ort_logits(model, optimize=True):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])

    ref_qdq = ort_logits(qdq)
    # The same QDQ model, executed by onnxruntime without its integer fusions
    # (QDQ as float fake quantization): how far two faithful executions differ.
    ref_plain = ort_logits(qdq, optimize=False)
    fake = ort_logits(os.path.join(work, "conv_fake_quant_model.onnx"))
    ref_float = ort_logits(os.path.join(a.shared, "data", "imagenet-mobilenetv2", "mobilenet_v2.onnx"))
    ours = []
    for i in range(0, len(x), 64):
        chunk = os.path.join(work, "chunk.npy")
        np.save(chunk, x[i:i + 64])
        out = os.path.join(work, "run")
        subprocess.run([exe, "run", os.path.join(work, "conv_deploy_model.onnx"), "-i",
                        "x=" + chunk, "--output-dir", out], check=True, capture_output=True)
        ours.append(np.load(os.path.join(out, "y.npy")))
    ours = np.concatenate(ours)
    m = onnx.load(qdq)
    out_q = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.output[0]
             and any(d.input and d.output and d.input[0] == n.output[0] and d.output[0] == "y"
                    for d in m.graph.node)]
    step = float(onnx.numpy_helper.to_array(
        [i for i in m.graph.initializer if i.name == out_q[0].input[1]][0]))
    d = np.abs(ours - ref_qdq)

    def vs_qdq(p):
        e = np.abs(p - ref_qdq)
        return {"within_one_step": float((e <= step).mean()), "max_diff_steps": float(e.max() / step),
                "top1_agreement": float((p.argmax(1) == ref_qdq.argmax(1)).mean())}

    def cos(p, q):
        return float((np.sum(p * q, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(q, axis=1))).mean())

    print(json.dumps({
        "eval_crops": len(x),
        "convert_s": convert_s,
        "int8_layers": len(report["layers"]), "tensor_quantize": len(report["tensor_quantize"]),
        "float_ops": len(report["float_ops"]),
        "output_step": step,
        "within_one_step": float((d <= step).mean()),
        "max_diff_steps": float(d.max() / step),
        "mean_diff_steps": float(d.mean() / step),
        "top1_agreement_with_qdq": float((ours.argmax(1) == ref_qdq.argmax(1)).mean()),
        "logit_cosine_with_qdq": cos(ours, ref_qdq),
        "our_fake_quant_vs_qdq": vs_qdq(fake),
        "onnxruntime_unoptimized_vs_qdq": vs_qdq(ref_plain),
        "ours_vs_our_fake_quant_top1": float((ours.argmax(1) == fake.argmax(1)).mean()),
        "qdq_top1_agreement_with_float": float((ref_qdq.argmax(1) == ref_float.argmax(1)).mean()),
        "ours_top1_agreement_with_float": float((ours.argmax(1) == ref_float.argmax(1)).mean()),
    }, indent=1))


if __name__ == "__main__":
    main()
