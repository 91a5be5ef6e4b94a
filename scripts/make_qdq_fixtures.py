#!/usr/bin/env python3
"""QDQ models made by onnxruntime's quantize_static, for `convert-qat`.

Writes, under tests/fixtures/qdq/ (committed; the tests read only these files):
  digits_qdq_pc.onnx      per-channel int8 weights, uint8 asymmetric activations (ORT's default)
  digits_qdq_pt.onnx      per-tensor int8 weights, int8 symmetric activations
  digits_qdq_pc_logits.npy / digits_qdq_pt_logits.npy
                          onnxruntime's outputs of each model on the 500 digits test images
Calibration: the first 64 rows of tests/fixtures/digits/calib_x.npy, MinMax.

With --mobilenet PATH it also writes a per-channel QDQ MobileNetV2 (32 calibration crops of
seed 3 from the shared make_crops.py) to PATH (not committed: 3.5 MB; used by
scripts/convert_qat_check.py).

    pip install numpy onnx onnxruntime
    python3 scripts/make_qdq_fixtures.py [--mobilenet /tmp/mnv2_qdq.onnx --shared ../shared]
"""
import argparse
import os
import sys

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "tests", "fixtures", "digits")
OUT = os.path.join(ROOT, "tests", "fixtures", "qdq")


class Reader(CalibrationDataReader):
    def __init__(self, name, x):
        self.rows = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.rows, None)


def run(model, x):
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def quantize(src, dst, x, per_channel, act_type):
    quantize_static(src, dst, Reader("x", x), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=act_type,
                    weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": act_type == QuantType.QInt8})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mobilenet", default=None)
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    src = os.path.join(DIGITS, "digits_cnn.onnx")
    calib = np.load(os.path.join(DIGITS, "calib_x.npy"))[:64]
    test = np.load(os.path.join(DIGITS, "test_x.npy"))
    for tag, pc, act in [("pc", True, QuantType.QUInt8), ("pt", False, QuantType.QInt8)]:
        dst = os.path.join(OUT, f"digits_qdq_{tag}.onnx")
        quantize(src, dst, calib, pc, act)
        np.save(os.path.join(OUT, f"digits_qdq_{tag}_logits.npy"), run(dst, test))
    if a.mobilenet:
        data = os.path.join(a.shared, "data", "imagenet-mobilenetv2")
        sys.path.insert(0, data)
        import make_crops
        mean = np.array([0.485, 0.456, 0.406], np.float32)
        std = np.array([0.229, 0.224, 0.225], np.float32)
        u8 = make_crops.crops(32, 3)
        x = ((u8.astype(np.float32) / np.float32(255.0) - mean) / std).transpose(0, 3, 1, 2)
        quantize(os.path.join(data, "mobilenet_v2.onnx"), a.mobilenet,
                 np.ascontiguousarray(x), True, QuantType.QUInt8)


if __name__ == "__main__":
    main()
