#!/usr/bin/env python3
"""Builds tests/fixtures/transformer: a one-block BERT-style sentence encoder laid out
as PyTorch's exporter writes Hugging Face models (int64 token ids and mask; word and
position embeddings by Gather, the position ids Sliced from a buffer by the sequence
length read through Shape; LayerNormalization; Q/K/V MatMuls with `Add(bias, MatMul)`;
heads split by a Reshape whose shape is computed by Shape/Gather/Unsqueeze/Concat;
QKᵀ and softmax·V MatMuls of two values; the additive mask `(1 - mask) * -3.4e38`;
a Where masked_fill; Erf GELU; a decomposed LayerNorm (ReduceMean, Sub, Pow, Sqrt,
Div); mean pooling over the mask (Unsqueeze, Expand, Cast, ReduceSum, Clip, Div)),
with random weights, and onnxruntime's outputs on a few padded sentences: the
independent reference of the trainer's forward pass (tests/train_transformer.rs).

    pip install onnx onnxruntime numpy
    python3 scripts/make_transformer_fixture.py
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "tests", "fixtures", "transformer")
VOCAB, HIDDEN, HEADS, FFN, MAX_POS = 40, 16, 2, 32, 12
HEAD = HIDDEN // HEADS


def main():
    rng = np.random.default_rng(7)
    inits, nodes = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(name, shape, scale):
        return const(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def dense(x, prefix, n_in, n_out):
        w = weight(f"{prefix}.weight", (n_in, n_out), 1.0 / np.sqrt(n_in))
        b = weight(f"{prefix}.bias", (n_out,), 0.1)
        return node("Add", [b, node("MatMul", [x, w], f"{prefix}/MatMul")], f"{prefix}/Add")

    i64 = lambda *v: np.array(v, dtype=np.int64)
    f32 = lambda v: np.array(v, dtype=np.float32)
    # Embeddings: word + position (ids Sliced from a buffer by the sequence length).
    shape_ids = node("Shape", ["input_ids"], "emb/Shape")
    seq = node("Gather", [shape_ids, const("c1", np.array(1, np.int64))], "emb/Gather_len")
    seq1 = node("Unsqueeze", [seq, const("ax0", i64(0))], "emb/Unsqueeze_len")
    pos_ids = node("Slice", [const("position_ids", i64(*range(MAX_POS)).reshape(1, -1)),
                             const("zero1", i64(0)), seq1, const("one1", i64(1))], "emb/Slice")
    words = node("Gather", [weight("word_embeddings", (VOCAB, HIDDEN), 1.0), "input_ids"],
                 "emb/word/Gather")
    pos = node("Gather", [weight("position_embeddings", (MAX_POS, HIDDEN), 0.5), pos_ids],
               "emb/pos/Gather")
    emb = node("Add", [words, pos], "emb/Add")
    h = node("LayerNormalization", [emb, const("ln0.g", f32(1 + 0.1 * rng.standard_normal(HIDDEN))),
                                    const("ln0.b", f32(0.1 * rng.standard_normal(HIDDEN)))],
             "emb/LayerNorm", axis=-1, epsilon=1e-12)

    # Heads: [B, S, H] -> [B, heads, S, head] by a computed shape.
    def split_heads(x, prefix, perm):
        s = node("Shape", [x], f"{prefix}/Shape")
        b = node("Unsqueeze", [node("Gather", [s, const(f"{prefix}.i0", np.array(0, np.int64))], f"{prefix}/G0"),
                               const(f"{prefix}.a0", i64(0))], f"{prefix}/U0")
        t = node("Unsqueeze", [node("Gather", [s, const(f"{prefix}.i1", np.array(1, np.int64))], f"{prefix}/G1"),
                               const(f"{prefix}.a1", i64(0))], f"{prefix}/U1")
        target = node("Concat", [b, t, const(f"{prefix}.heads", i64(HEADS, HEAD))],
                      f"{prefix}/Concat", axis=0)
        return node("Transpose", [node("Reshape", [x, target], f"{prefix}/Reshape")],
                    f"{prefix}/Transpose", perm=perm)

    q = split_heads(dense(h, "attn.query", HIDDEN, HIDDEN), "q", [0, 2, 1, 3])
    k = split_heads(dense(h, "attn.key", HIDDEN, HIDDEN), "k", [0, 2, 3, 1])
    v = split_heads(dense(h, "attn.value", HIDDEN, HIDDEN), "v", [0, 2, 1, 3])
    scores = node("Div", [node("MatMul", [q, k], "attn/MatMul_qk"), const("sqrt_d", f32(np.sqrt(HEAD)))],
                  "attn/Div")
    # The additive mask, as BERT exports it.
    m4 = node("Unsqueeze", ["attention_mask", const("ax12", i64(1, 2))], "mask/Unsqueeze")
    mf = node("Cast", [m4], "mask/Cast", to=TensorProto.FLOAT)
    add_mask = node("Mul", [node("Sub", [const("one_f", f32(1.0)), mf], "mask/Sub"),
                            const("neg", f32(-3.4028234663852886e38))], "mask/Mul")
    scores = node("Add", [scores, add_mask], "attn/Add_mask")
    # A masked_fill as newer exports write it: Where(mask == 0, -1e4, scores).
    is_pad = node("Equal", [m4, const("zero_i", i64(0))], "mask/Equal")
    scores = node("Where", [is_pad, const("fill", f32(-1e4)), scores], "attn/Where")
    probs = node("Softmax", [scores], "attn/Softmax", axis=-1)
    ctx = node("Transpose", [node("MatMul", [probs, v], "attn/MatMul_pv")], "ctx/Transpose",
               perm=[0, 2, 1, 3])
    s = node("Shape", [ctx], "ctx/Shape")
    bs = node("Slice", [s, const("c0", i64(0)), const("c2", i64(2))], "ctx/Slice")
    ctx = node("Reshape", [ctx, node("Concat", [bs, const("hidden", i64(HIDDEN))], "ctx/Concat",
                                     axis=0)], "ctx/Reshape")
    x = node("Add", [dense(ctx, "attn.output", HIDDEN, HIDDEN), h], "attn/residual")
    # The decomposed LayerNorm of TF-style exports.
    axes = const("last", i64(-1))
    mean = node("ReduceMean", [x, axes], "ln1/ReduceMean")
    d = node("Sub", [x, mean], "ln1/Sub")
    var = node("ReduceMean", [node("Pow", [d, const("two", f32(2.0))], "ln1/Pow"), axes],
               "ln1/ReduceMean_var")
    std = node("Sqrt", [node("Add", [var, const("eps", f32(1e-6))], "ln1/Add_eps")], "ln1/Sqrt")
    x = node("Add", [node("Mul", [node("Div", [d, std], "ln1/Div"),
                                  const("ln1.g", f32(1 + 0.1 * rng.standard_normal(HIDDEN)))],
                          "ln1/Mul"), const("ln1.b", f32(0.1 * rng.standard_normal(HIDDEN)))],
             "ln1/Add")
    # FFN with the Erf GELU.
    f = dense(x, "ffn.in", HIDDEN, FFN)
    erf = node("Erf", [node("Div", [f, const("sqrt2", f32(1.4142135))], "gelu/Div")], "gelu/Erf")
    g = node("Mul", [node("Mul", [f, node("Add", [erf, const("one_g", f32(1.0))], "gelu/Add")],
                          "gelu/Mul"), const("half", f32(0.5))], "gelu/Mul_half")
    x = node("Add", [dense(g, "ffn.out", FFN, HIDDEN), x], "ffn/residual")
    tokens = node("LayerNormalization", [x, const("ln2.g", f32(1 + 0.1 * rng.standard_normal(HIDDEN))),
                                         const("ln2.b", f32(0.1 * rng.standard_normal(HIDDEN)))],
                  "out/LayerNorm", axis=-1, epsilon=1e-12)
    # Mean pooling over the mask.
    me = node("Cast", [node("Expand", [node("Unsqueeze", ["attention_mask", const("axm1", i64(-1))],
                                            "pool/Unsqueeze"),
                                       node("Shape", [tokens], "pool/Shape")], "pool/Expand")],
              "pool/Cast", to=TensorProto.FLOAT)
    summed = node("ReduceSum", [node("Mul", [tokens, me], "pool/Mul"), const("ax1", i64(1))],
                  "pool/ReduceSum", keepdims=0)
    count = node("Clip", [node("ReduceSum", [me, const("ax1b", i64(1))], "pool/ReduceSum_mask",
                               keepdims=0), const("tiny", f32(1e-9))], "pool/Clip")
    pooled = node("Div", [summed, count], "pool/Div")
    nodes.append(helper.make_node("Identity", [tokens], ["tokens"], name="tokens/Identity"))
    nodes.append(helper.make_node("Identity", [pooled], ["pooled"], name="pooled/Identity"))

    ids_in = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask_in = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    outs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", HIDDEN]),
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    graph = helper.make_graph(nodes, "tiny_bert", [ids_in, mask_in], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    os.makedirs(OUT, exist_ok=True)
    onnx.save(model, os.path.join(OUT, "tiny_bert.onnx"))

    # Sentences of 3 to 8 tokens, padded to 8: [CLS]=2 ... [SEP]=3, [PAD]=0.
    lengths = [8, 5, 3, 6, 7, 4, 8, 5, 6, 3, 7, 4, 5, 8, 6, 4]
    ids = np.zeros((len(lengths), 8), np.int64)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = [2] + list(rng.integers(4, VOCAB, n - 2)) + [3]
        mask[r, :n] = 1
    import onnxruntime as ort
    sess = ort.InferenceSession(os.path.join(OUT, "tiny_bert.onnx"),
                                providers=["CPUExecutionProvider"])
    pooled_out, tokens_out = sess.run(["pooled", "tokens"],
                                      {"input_ids": ids, "attention_mask": mask})
    np.savez(os.path.join(OUT, "sentences.npz"), input_ids=ids, attention_mask=mask)
    np.save(os.path.join(OUT, "ort_pooled.npy"), pooled_out.astype(np.float32))
    np.save(os.path.join(OUT, "ort_tokens.npy"), tokens_out.astype(np.float32))
    print("wrote", OUT, pooled_out.shape, tokens_out.shape)


if __name__ == "__main__":
    main()
