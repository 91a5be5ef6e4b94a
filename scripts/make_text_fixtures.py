#!/usr/bin/env python3
"""Builds tests/fixtures/texts: a small BERT-style WordPiece tokenizer (lower-casing,
[CLS] ... [SEP], [PAD] = 0) saved as tokenizer.json by Hugging Face `tokenizers`, a few
sentences, and what that library makes of them at max length 8 (input_ids,
attention_mask, token_type_ids as int64 .npy): the independent reference of
`--texts` (tests/texts.rs).

    pip install tokenizers numpy
    python3 scripts/make_text_fixtures.py
"""
import os

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "tests", "fixtures", "texts")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "model", "quant", "##ize", "##s",
         "int", "##8", "weights", "on", "ascend", ",", "."]
SENTENCES = [
    "The model quantizes weights.",
    "Ascend, INT8 weights on the model",
    "the the the the the the the the the the",
    "Unknown words stay unknown",
]


def main():
    os.makedirs(OUT, exist_ok=True)
    t = Tokenizer(WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    t.save(os.path.join(OUT, "tokenizer.json"))
    with open(os.path.join(OUT, "sentences.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(SENTENCES) + "\n")
    t.enable_truncation(8)
    t.enable_padding(length=8, pad_id=0, pad_token="[PAD]")
    enc = t.encode_batch(SENTENCES)
    for name, key in [("input_ids", "ids"), ("attention_mask", "attention_mask"),
                      ("token_type_ids", "type_ids")]:
        np.save(os.path.join(OUT, f"{name}.npy"),
                np.array([getattr(e, key) for e in enc], dtype=np.int64))


if __name__ == "__main__":
    main()
