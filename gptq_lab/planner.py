"""Mixed precision: choose each layer's bits to minimise predicted damage within a storage budget.

    sens = layer_sensitivity(model, hessians)                  # gptq_lab.sensitivity
    p = plan(sens, target_bits=3.5)                            # or budget_bytes=...
    quantize_model(model, ids, p.config())                     # QuantConfig with per-module overrides

The problem is a multiple-choice knapsack: every item (a layer, or a group of layers that read
the same input, tied by default) takes one bit width b from ``choices``, costing its storage
and predicting damage d(b); minimise the sum of d subject to the total storage <= budget.
``solve_mckp`` solves it exactly by dynamic programming over the budget discretised into
``resolution`` units, each item's cost rounded *up* to whole units so that the plan's real
storage never exceeds the budget (the loss of optimality is at most one unit per item).

Storage is counted as the GPTQ checkpoint stores it: packed codes (K*N*b bits), packed zero
points (G*N*b), fp16 scales (G*N*16) and the int32 ``g_idx`` (K*32); biases are left out
(the same for every choice). ``count="codes"`` counts the code bits K*N*b alone.

Damage is the sum over items of the chosen measure, unnormalised: the GPTQ loss of a layer is
the mean squared error of that layer's output over the calibration tokens, and for o_proj and
down_proj that error is added straight to the residual stream, so the losses share one unit
(squared residual-stream activation) and add up. Normalising by a layer's output energy would
give a layer with tiny outputs the weight of a large one. For q/k/v and gate/up the error
passes through attention or the gated MLP before it reaches the residual, so the sum is an
approximation there; ``measure="kl"`` (the measured effect on the model's output when only
that layer is quantized) avoids it, at one forward per layer and bit width.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .config import QuantConfig
from .errors import ConfigError
from .sensitivity import Sensitivity

# vLLM fuses these projections into one module; a dynamic override for the group also names it
_FUSED = {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "self_attn.qkv_proj",
          ("mlp.gate_proj", "mlp.up_proj"): "mlp.gate_up_proj"}


def storage_bits(bits: int, group_size: int, in_features: int, out_features: int, count: str = "storage") -> int:
    """Bits one quantized layer [N=out, K=in] takes in a GPTQ checkpoint (see the module doc)."""
    k, n = in_features, out_features
    if count == "codes":
        return k * n * bits
    if count != "storage":
        raise ConfigError(f"count={count!r} is not known; use 'storage' (codes + zeros + scales + g_idx) "
                          f"or 'codes'")
    groups = math.ceil(k / (k if group_size == -1 else group_size))
    return k * n * bits + groups * n * (bits + 16) + k * 32


@dataclass
class Plan:
    """Bits per layer, with what it costs and what it is predicted to cost in damage."""

    bits: dict[str, int]                  # layer name -> bits
    label: str
    predicted_damage: float               # sum of the measure over layers (inf if a choice was not measured)
    measure: str
    storage_bits: int                     # checkpoint storage of the planned layers (see storage_bits)
    code_bits: int                        # K*N*b summed
    n_weights: int
    base: QuantConfig
    groups: list[list[str]]               # linears that read the same input (one override each)
    target_bits: float | None = None      # the budget, as average bits per weight (of ``count``)
    count: str = "storage"

    @property
    def average_bits(self) -> float:
        """Average storage bits per weight (codes + zeros + scales + g_idx)."""
        return self.storage_bits / self.n_weights

    @property
    def average_code_bits(self) -> float:
        return self.code_bits / self.n_weights

    @property
    def storage_bytes(self) -> int:
        return math.ceil(self.storage_bits / 8)

    def histogram(self) -> dict[int, int]:
        """bits -> number of layers."""
        return dict(sorted(Counter(self.bits.values()).items()))

    def config(self, base: QuantConfig | None = None) -> QuantConfig:
        """A QuantConfig for ``quantize_model``: the most common bit width as ``bits``, one override
        per layer that differs (one per input group whose members agree), matching the exact names
        (and, for q/k/v and gate/up, vLLM's fused qkv_proj / gate_up_proj)."""
        base = (base or self.base).replace(overrides={})
        common = Counter(self.bits.values()).most_common(1)[0][0]
        overrides = {}
        for group in self.groups:
            chosen = {self.bits[n] for n in group}
            runs = [group] if len(chosen) == 1 else [[n] for n in group]
            for names in runs:
                if self.bits[names[0]] != common:
                    overrides[_pattern(names)] = {"bits": self.bits[names[0]]}
        return base.replace(bits=common, overrides=overrides)

    def summary(self) -> str:
        hist = ", ".join(f"{n} x {b}-bit" for b, n in self.histogram().items())
        target = f" (target {self.target_bits:g} {self.count} bits)" if self.target_bits else ""
        return (f"{self.label}: {self.average_bits:.3f} storage bits/weight, {self.average_code_bits:.3f} code "
                f"bits/weight{target}, {self.storage_bytes / 2**20:.2f} MiB; {hist}; predicted "
                f"{self.measure} {self.predicted_damage:.4g}")

    def __repr__(self) -> str:
        return f"Plan({self.summary()})"


def _pattern(names: list[str]) -> str:
    """Regex matching exactly ``names`` (full names), plus vLLM's fused module if they form one."""
    prefix = names[0].rpartition(".")[0]
    leaves = [n.rpartition(".")[2] for n in names]
    parent = prefix.rpartition(".")[2]
    fused = [v.rpartition(".")[2] for k, v in _FUSED.items()
             if [x.rpartition(".")[2] for x in k] == leaves and v.startswith(parent + ".")]
    alts = "|".join(re.escape(x) for x in leaves + fused)
    return f"{re.escape(prefix)}\\.(?:{alts})$" if len(leaves) + len(fused) > 1 else f"{re.escape(names[0])}$"


# ------------------------------------------------------------------------------ the knapsack

def solve_mckp(costs: np.ndarray, damages: np.ndarray, budget: float, resolution: int = 4096) -> list[int]:
    """Choose one option per item minimising sum(damages) with sum(costs) <= budget.

    costs, damages: float [items, options] (damage inf = option not allowed). Exact over the
    budget discretised into ``resolution`` units (costs rounded up). Returns the option per item.
    """
    costs, damages = np.asarray(costs, dtype=float), np.asarray(damages, dtype=float)
    if costs.shape != damages.shape or costs.ndim != 2:
        raise ConfigError(f"costs {costs.shape} and damages {damages.shape} must both be [items, options]")
    cheapest = float(costs.min(1).sum())
    if cheapest > budget:
        raise ConfigError(f"the budget ({budget:.6g}) is below the cheapest plan ({cheapest:.6g}): allow fewer "
                          f"bits or give a larger budget")
    unit = budget / resolution
    w = np.ceil(costs / unit - 1e-9).astype(np.int64)                        # [items, options] in units
    best = np.zeros(resolution + 1)                                          # min damage with capacity c
    choice = np.zeros((len(costs), resolution + 1), dtype=np.int8)
    for i in range(len(costs)):
        cand = np.full((costs.shape[1], resolution + 1), np.inf)
        for j in range(costs.shape[1]):
            if w[i, j] <= resolution:
                cand[j, w[i, j]:] = best[:resolution + 1 - w[i, j]] + damages[i, j]
        choice[i], best = cand.argmin(0), cand.min(0)
    if not np.isfinite(best[resolution]):                                    # only rounding can cause this
        raise ConfigError(f"no plan fits the budget at resolution={resolution}; raise the resolution")
    picks, c = [], resolution
    for i in range(len(costs) - 1, -1, -1):
        j = int(choice[i, c])
        picks.append(j)
        c -= int(w[i, j])
    return picks[::-1]


def _items(sens: Sensitivity, tie: bool) -> list[list[str]]:
    return [list(g) for g in sens.groups] if tie else [[n] for n in sens.names]


def _cost(sens: Sensitivity, name: str, bits: int, count: str) -> int:
    n, k = sens.shapes[name]
    return storage_bits(bits, sens.config.for_module(name).group_size, k, n, count)


def make_plan(sens: Sensitivity, bits: dict[str, int], label: str, measure: str = "loss",
              target_bits: float | None = None, count: str = "storage") -> Plan:
    """A Plan for a given {name: bits}, with its storage and predicted damage."""
    table = sens.loss if measure == "loss" else sens.kl
    damage = sum(table.get(n, {}).get(b, math.inf) for n, b in bits.items())
    return Plan(dict(bits), label, damage, measure, sum(_cost(sens, n, b, "storage") for n, b in bits.items()),
                sum(_cost(sens, n, b, "codes") for n, b in bits.items()),
                sum(sens.shapes[n][0] * sens.shapes[n][1] for n in bits), sens.config,
                [[n for n in g if n in bits] for g in sens.groups if any(n in bits for n in g)],
                target_bits, count)


def plan(sens: Sensitivity, target_bits: float | None = None, budget_bytes: int | None = None,
         measure: str = "loss", choices: tuple[int, ...] | None = None, tie: bool = True,
         count: str = "storage", resolution: int = 4096, damage: dict | None = None,
         label: str | None = None) -> Plan:
    """The bits per layer that minimise the predicted damage within the budget.

    target_bits: average bits per weight over the planned layers (``count``: "storage", the
        checkpoint's bytes including scales/zeros/g_idx, or "codes"); or budget_bytes: the
        planned layers' checkpoint bytes. measure: "loss" or "kl" (see ``Sensitivity``).
    tie: give linears that read the same input (q/k/v, gate/up) the same bits (vLLM fuses them).
    damage: {name: {bits: value}} to use instead of the measure (e.g. random, for a baseline).
    """
    if (target_bits is None) == (budget_bytes is None):
        raise ConfigError("give exactly one of target_bits (average bits per weight) or budget_bytes")
    choices = tuple(choices or sens.bits)
    table = damage if damage is not None else sens.measure(measure)
    n_weights = sum(sens.shapes[n][0] * sens.shapes[n][1] for n in sens.names)
    budget = target_bits * n_weights if target_bits is not None else budget_bytes * 8.0
    if budget_bytes is not None:
        count = "storage"
    items = _items(sens, tie)
    costs = np.array([[sum(_cost(sens, n, b, count) for n in it) for b in choices] for it in items], dtype=float)
    dmg = np.array([[sum(table[n].get(b, math.inf) for n in it) for b in choices] for it in items])
    picks = solve_mckp(costs, dmg, budget, resolution)
    bits = {n: choices[j] for it, j in zip(items, picks) for n in it}
    bits = {n: bits[n] for n in sens.names}
    what = f"{target_bits:g} bits" if target_bits is not None else f"{budget_bytes:,} bytes"
    p = make_plan(sens, bits, label or f"plan {what} ({measure})", measure, target_bits, count)
    if damage is not None:
        p.predicted_damage = make_plan(sens, bits, "", "loss").predicted_damage
        p.measure = "loss"
    return p


def uniform_plan(sens: Sensitivity, bits: int) -> Plan:
    return make_plan(sens, dict.fromkeys(sens.names, bits), f"uniform {bits}-bit")


def random_plan(sens: Sensitivity, target_bits: float, seed: int = 0, choices: tuple[int, ...] | None = None,
                tie: bool = True, count: str = "storage") -> Plan:
    """A random allocation that fills the same budget: the planner run on random damages
    w * n_weights * 4^-b, with one w per item drawn log-uniformly over six decades by
    ``random.Random(seed)`` (so it spends the budget like a plan, on randomly chosen layers)."""
    rng = random.Random(seed)
    weights = {n: 10 ** rng.uniform(-3, 3) for it in _items(sens, tie) for n in [it[0]]}
    owner = {n: it[0] for it in _items(sens, tie) for n in it}
    fake = {n: {b: weights[owner[n]] * sens.shapes[n][0] * sens.shapes[n][1] * 4.0 ** -b
                for b in (choices or sens.bits)} for n in sens.names}
    return plan(sens, target_bits, choices=choices, tie=tie, count=count, damage=fake,
                label=f"random {target_bits:g} bits (seed {seed})")
