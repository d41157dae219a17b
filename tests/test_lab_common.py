"""Shared helpers for the lab tests (no tests here): a tiny Llama and a byte tokenizer."""
from __future__ import annotations

import torch
import transformers as tf

from gptq_lab import QuantConfig

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 40
OTHER = ("def main():\n    for i in range(10):\n        print(i * i)\n    return None\n") * 60
CONFIG = QuantConfig(bits=4, group_size=32)


class TinyTokenizer:
    """Bytes -> ids 1..127; 0 is EOS. Enough of the HF tokenizer surface for the lab."""

    name_or_path = "tiny-bytes"
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [1 + b % 127 for b in text.encode("utf-8")]}

    def decode(self, ids):
        return "".join(chr(32 + int(i) % 95) for i in ids)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def calibrator(text=TEXT, **kw):
    from gptq_lab.lab import Calibrator
    return Calibrator(TinyTokenizer(), {"austen": [text]}, n_samples=kw.pop("n_samples", 8),
                      seqlen=kw.pop("seqlen", 32), **kw)
