"""Test helpers: tiny models, and GPTQ checkpoints written straight from the format description.

The writer here shares no code with gptq_lab: it packs with its own Python loop, following
the format as documented (DESIGN.md, "The checkpoint format"):
  qweight int32 [K*bits/32, N]: for each output column n, the codes of k = 0..K-1 form one
      little-endian bit stream (code k at bit k*bits), cut into 32-bit words.
  qzeros  int32 [G, N*bits/32]: for each group g, the zero points of n = 0..N-1, same way;
      checkpoint_format "gptq" stores zero - 1, "gptq_v2" the zero itself.
  scales fp16 [G, N], g_idx int32 [K]; W[n, k] = scales[g_idx[k], n] * (code - zero).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf
from safetensors.torch import save_file

V = 128


def tiny_config(family: str, **kw):
    """Configs of tiny models (in_features 64/128, multiples of 32 for 3-bit packing)."""
    if family == "llama":
        return tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              rope_theta=10000.0, **kw)
    if family == "opt":
        return tf.OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, **kw)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=0, eos_token_id=0, **kw)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tiny_config(family, **kw)).eval()


def token_ids(n: int = 4, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def to_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def pack_stream(values: list[int], bits: int) -> list[int]:
    """Values -> int32 words of their little-endian bit stream (the format's layout)."""
    stream = 0
    for i, v in enumerate(values):
        stream |= int(v) << (i * bits)
    n_words = len(values) * bits // 32
    return [to_int32((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(n_words)]


def pack_columns(matrix: torch.Tensor, bits: int) -> torch.Tensor:
    """[L, C] ints -> int32 [L*bits/32, C], each column packed as one stream down L."""
    cols = [pack_stream(matrix[:, c].tolist(), bits) for c in range(matrix.shape[1])]
    return torch.tensor(cols, dtype=torch.int64).t().to(torch.int32).contiguous()


def random_layer(k: int, n: int, bits: int, group_size: int, act_order: bool, gen: torch.Generator):
    """Random codes [N, K], true zeros [N, G] in [1, maxq] (so v1 can store them), scales, g_idx."""
    top = (1 << bits) - 1
    groups = -(-k // group_size)
    codes = torch.randint(0, top + 1, (n, k), generator=gen)
    zeros = torch.randint(1, top + 1, (n, groups), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).half()
    g_idx = torch.arange(k) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return codes, zeros, scales, g_idx.to(torch.int32)


def write_fixture(model: torch.nn.Module, linears: list[str], directory: Path, checkpoint_format: str,
                  bits: int = 4, group_size: int = 32, act_order: bool = True, seed: int = 0) -> dict:
    """Write ``model`` with random quantized ``linears`` as a GPTQ checkpoint; return
    name -> float weight [N, K] each layer dequantizes to (for a float reference model)."""
    gen = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, weights = {}, {}
    state = model.state_dict()
    for key, t in state.items():
        if key.rpartition(".")[0] not in linears and not (key == "lm_head.weight" and
                                                          model.config.tie_word_embeddings):
            tensors[key] = t.detach().clone().contiguous()
    for name in linears:
        module = model.get_submodule(name)
        k, n = (module.weight.shape if type(module).__name__ == "Conv1D" else module.weight.shape[::-1])
        codes, zeros, scales, g_idx = random_layer(k, n, bits, group_size, act_order, gen)
        stored = (zeros - 1) if checkpoint_format == "gptq" else zeros
        tensors[f"{name}.qweight"] = pack_columns(codes.t(), bits)           # [K*bits/32, N]
        tensors[f"{name}.qzeros"] = pack_columns(stored, bits).t().contiguous()  # [G, N*bits/32]
        tensors[f"{name}.scales"] = scales.t().contiguous()                   # [G, N] fp16
        tensors[f"{name}.g_idx"] = g_idx
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().half()
        gi = g_idx.long()
        weights[name] = scales.float()[:, gi] * (codes - zeros[:, gi]).float()  # [N, K]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
          "sym": False, "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
          "checkpoint_format": checkpoint_format}
    config = {**model.config.to_dict(), "quantization_config": qc}
    (directory / "config.json").write_text(json.dumps(config, default=str))
    (directory / "quantize_config.json").write_text(json.dumps(qc))
    return weights


def reference_model(model: torch.nn.Module, weights: dict) -> torch.nn.Module:
    """``model`` with each quantized linear's float weight set to its dequantized value; linear
    biases rounded to fp16 as the checkpoint stores them."""
    with torch.no_grad():
        for name, w in weights.items():
            module = model.get_submodule(name)
            module.weight.copy_(w.t() if type(module).__name__ == "Conv1D" else w)
            if module.bias is not None:
                module.bias.copy_(module.bias.half().float())
    return model
