"""Model families as data: where the blocks are and which linears, in which order.

To support a new family, add one row to ``FAMILIES``: the ``model_type`` values
from its ``config.json``, the dotted path of its list of decoder blocks, and
the block's linear layers grouped in true-sequential order (a group's members
read the same input; later groups read outputs of earlier ones).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str                          # dotted path to the nn.ModuleList of blocks
    sequential: tuple[tuple[str, ...], ...]

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for group in self.sequential for n in group)


_LLAMA = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3"), "model.layers", _LLAMA),
    Family("opt", ("opt",), "model.decoder.layers",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
            ("fc1",), ("fc2",))),
    Family("falcon", ("falcon",), "transformer.h",
           (("self_attention.query_key_value",), ("self_attention.dense",),
            ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))),
    Family("gptj", ("gptj",), "transformer.h",
           (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("attn.out_proj",),
            ("mlp.fc_in",), ("mlp.fc_out",))),
    Family("gpt2", ("gpt2",), "transformer.h",
           (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))),
)


def family_of(model: nn.Module) -> Family:
    """The Family row for ``model`` (by ``config.model_type``), or a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"no block layout is known for model_type={model_type!r} (known: {known}). To add it, append a "
        f"Family row to gptq_lab/arch.py FAMILIES: the path of its decoder-block list and its linear "
        f"layers in true-sequential order."
    )


def get_blocks(model: nn.Module, family: Family) -> nn.ModuleList:
    return model.get_submodule(family.blocks)


def block_linears(block: nn.Module, family: Family) -> dict[str, nn.Module]:
    """name -> module for the block's quantizable linears, in true-sequential order."""
    out = {}
    for name in family.linears:
        try:
            out[name] = block.get_submodule(name)
        except AttributeError:
            raise UnsupportedModelError(
                f"block has no submodule {name!r} expected for the {family.name} family; "
                f"its modules are {[n for n, _ in block.named_modules() if n][:20]}"
            ) from None
    return out


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: weight stored [in, out]."""
    return type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a view; Conv1D is transposed)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write an [out, in] matrix into the module in its own layout and dtype, in place."""
    target = module.weight.data
    target.copy_((w.t() if is_conv1d(module) else w).to(target.dtype))


def in_out_features(module: nn.Module) -> tuple[int, int]:
    n, k = weight_matrix(module).shape
    return k, n
