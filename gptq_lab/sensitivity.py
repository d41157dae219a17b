"""Per-layer sensitivity to the bit width: the data a mixed-precision planner needs.

    hessians = collect_hessians(model, ids)                    # float model, cached
    sens = layer_sensitivity(model, hessians)                  # GPTQ loss of every layer at 2/3/4/8 bits
    output_sensitivity(model, sens, kl_ids, names=[...])       # optional: KL when only that layer is quantized

Two measures, both per (layer, bits):
- ``loss``: the GPTQ loss of re-solving the layer alone from its cached float-model Hessian,
  1/2 tr(dW H dW^T) with H = 2/n X^T X: the mean squared error of the layer's output over the
  calibration tokens. Cheap (one solve; the inverse-Hessian factor is shared by all bit widths).
- ``kl``: the mean over tokens of KL(float model || model with only this layer quantized) on
  held-out windows. Measures the effect on the output directly, at one forward per (layer, bits).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .arch import family_of, get_blocks, in_out_features, set_weight_matrix, weight_matrix
from .checks import linear_names
from .config import SUPPORTED_BITS, QuantConfig
from .errors import ConfigError
from .hessians import CachedLayer

Progress = Callable[[int, int, str], None]
DEFAULT_CONFIG = QuantConfig(bits=4, group_size=128, sym=True)


@dataclass
class Sensitivity:
    """Per-layer, per-bit-width damage measures of one model, plus what a planner needs."""

    names: list[str]                              # linears in block / true-sequential order
    bits: tuple[int, ...]
    shapes: dict[str, tuple[int, int]]            # name -> (out_features N, in_features K)
    groups: list[list[str]]                       # linears that read the same input (q/k/v, gate/up)
    config: QuantConfig                           # everything but bits (group size, sym, damp...)
    loss: dict[str, dict[int, float]]             # name -> bits -> GPTQ loss
    kl: dict[str, dict[int, float]] = field(default_factory=dict)   # name -> bits -> KL (nats/token)
    blocks_prefix: str = "model.layers"
    modules: tuple[str, ...] = ()
    layers: dict[str, CachedLayer] = field(default_factory=dict, repr=False)   # for re-solving

    def measure(self, what: str = "loss") -> dict[str, dict[int, float]]:
        """The damage table {name: {bits: value}} for ``what`` in ("loss", "kl")."""
        if what == "loss":
            return self.loss
        if what == "kl":
            missing = [n for n in self.names if n not in self.kl]
            if missing:
                raise ConfigError(f"KL sensitivity is missing for {len(missing)} layers (e.g. {missing[0]}); "
                                  f"run output_sensitivity(model, sens, ids) on all layers, or plan with "
                                  f"measure='loss'")
            return self.kl
        raise ConfigError(f"measure={what!r} is not known; use 'loss' or 'kl'")

    def split(self, name: str) -> tuple[int, str]:
        """'model.layers.3.mlp.down_proj' -> (3, 'mlp.down_proj')."""
        block, _, module = name[len(self.blocks_prefix) + 1:].partition(".")
        return int(block), module

    def matrix(self, bits: int, what: str = "loss") -> list[list[float]]:
        """[blocks, module types] of the measure at ``bits`` (NaN where not measured)."""
        values = self.loss if what == "loss" else self.kl
        n_blocks = 1 + max(self.split(n)[0] for n in self.names)
        m = [[math.nan] * len(self.modules) for _ in range(n_blocks)]
        for name, per_bits in values.items():
            b, mod = self.split(name)
            if bits in per_bits:
                m[b][self.modules.index(mod)] = per_bits[bits]
        return m

    def table(self) -> str:
        head = f"{'layer':<36}" + "".join(f"{f'loss {b}b':>12}" for b in self.bits) + \
            ("".join(f"{f'KL {b}b':>11}" for b in self.bits) if self.kl else "")
        lines = [head, "-" * len(head)]
        for n in self.names:
            kl = "".join(f"{self.kl[n][b]:>11.3g}" if n in self.kl else f"{'':>11}" for b in self.bits) \
                if self.kl else ""
            lines.append(f"{n:<36}" + "".join(f"{self.loss[n][b]:>12.4g}" for b in self.bits) + kl)
        return "\n".join(lines)


def layer_sensitivity(model: nn.Module, hessians: dict[str, torch.Tensor], bits: tuple[int, ...] = SUPPORTED_BITS,
                      config: QuantConfig = DEFAULT_CONFIG, names: list[str] | None = None,
                      progress: Progress | None = None) -> Sensitivity:
    """GPTQ loss of each linear at each bit width, re-solved from ``hessians`` ({name: [K, K]},
    from ``collect_hessians`` on the float ``model``) with ``config`` (bits replaced)."""
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if bad or not bits:
        raise ConfigError(f"bits={bits} must be a non-empty subset of {SUPPORTED_BITS}")
    family = family_of(model)
    names = names or linear_names(model)
    missing = [n for n in names if n not in hessians]
    if missing:
        raise ConfigError(f"no Hessian for {len(missing)} layers (e.g. {missing[0]}); collect_hessians(model, ids) "
                          f"first (with these names)")
    layers, loss, shapes = {}, {}, {}
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        k, n = in_out_features(module)
        shapes[name] = (n, k)
        layers[name] = CachedLayer(weight_matrix(module).detach().float(), hessians[name], cache_size=len(bits))
        cfg = config.for_module(name)
        loss[name] = {b: layers[name].solve(cfg.replace(bits=b)).loss for b in bits}
        if progress:
            progress(i + 1, len(names), name)
    groups = _input_groups(names, family, len(get_blocks(model, family)))
    return Sensitivity(list(names), tuple(bits), shapes, groups, config.replace(overrides={}), loss,
                       blocks_prefix=family.blocks, modules=family.linears, layers=layers)


def _input_groups(names: list[str], family, n_blocks: int) -> list[list[str]]:
    """Linears of one block that read the same input (a true-sequential group), among ``names``."""
    wanted, groups = set(names), []
    for i in range(n_blocks):
        for group in family.sequential:
            members = [f"{family.blocks}.{i}.{n}" for n in group if f"{family.blocks}.{i}.{n}" in wanted]
            if members:
                groups.append(members)
    return groups


@contextlib.contextmanager
def swapped_weight(module: nn.Module, weight: torch.Tensor):
    """Temporarily replace ``module``'s [out, in] weight; the original is restored on exit."""
    saved = module.weight.detach().clone()
    try:
        set_weight_matrix(module, weight)
        yield module
    finally:
        with torch.no_grad():
            module.weight.copy_(saved)


@torch.no_grad()
def output_sensitivity(model: nn.Module, sens: Sensitivity, ids: torch.Tensor, names: list[str] | None = None,
                       bits: tuple[int, ...] | None = None, batch_size: int = 4,
                       progress: Progress | None = None) -> dict[str, dict[int, float]]:
    """KL(float || only this layer quantized), mean over the tokens of ``ids`` [n, seqlen] (held-out
    text, not the evaluation windows), for ``names`` x ``bits`` (default: all of ``sens``).
    Fills and returns ``sens.kl``. The model is unchanged afterwards (weights swapped back).
    Costs one forward over ``ids`` per (layer, bits); the reference log-probabilities are kept
    in float32 on the model's device (n * seqlen * vocab * 4 bytes)."""
    names, bits = names or sens.names, bits or sens.bits
    device = next(model.parameters()).device
    batches = [ids[s:s + batch_size].to(device) for s in range(0, ids.shape[0], batch_size)]
    reference = [F.log_softmax(model(b, use_cache=False).logits.float(), -1) for b in batches]  # [B, T, V] each
    total, done = len(names) * len(bits), 0
    for name in names:
        module, layer = model.get_submodule(name), sens.layers[name]
        cfg = sens.config.for_module(name)
        for b in bits:
            deq = layer.solve(cfg.replace(bits=b)).dequantize()                                 # [N, K]
            with swapped_weight(module, deq):
                kl = sum(float(F.kl_div(F.log_softmax(model(x, use_cache=False).logits.float(), -1), ref,
                                        log_target=True, reduction="sum")) for x, ref in zip(batches, reference))
            sens.kl.setdefault(name, {})[b] = kl / ids.numel()
            done += 1
            if progress:
                progress(done, total, f"{name} {b}-bit")
    return sens.kl
