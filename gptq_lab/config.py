"""QuantConfig: what to quantize and how. Validates itself, round-trips to a dict.

Per-module overrides map a regular expression (matched with ``re.search`` against
the module's full name, e.g. ``model.layers.3.mlp.down_proj``) to a dict of fields
that differ for those modules. The first matching pattern wins, in insertion order.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field, fields

from .errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
_OVERRIDABLE = ("bits", "group_size", "sym", "act_order", "static_groups", "damp")


@dataclass(frozen=True)
class QuantConfig:
    """GPTQ settings.

    bits: 2, 3, 4 or 8.
    group_size: columns (input features) sharing one scale and zero point, or -1
        for one scale per output channel. Where it does not divide a layer's
        in_features the last group is shorter (as in the reference algorithm).
    sym: symmetric grid (zero point fixed at the middle code) or asymmetric.
    act_order: solve columns in order of decreasing Hessian diagonal ("desc_act");
        the checkpoint then carries a non-trivial ``g_idx``.
    static_groups: with act_order, fix every group's scale from the original
        weights before solving, so groups stay contiguous in the original order.
    damp: fraction of the mean Hessian diagonal added to the diagonal ("damp_percent").
    block_size: columns per lazy-batch block of the solver (speed only).
    true_sequential: quantize a block's linears in dependency order, re-collecting
        inputs after each stage, instead of all at once from the float block.
    overrides: {regex: {field: value}} for per-module settings (mixed precision).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_fields(self)
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"overrides={self.overrides!r} must be a dict {{regex: {{field: value}}}}, "
                              f"e.g. {{'down_proj': {{'bits': 8}}}}")
        for pattern, values in self.overrides.items():
            if not isinstance(pattern, str):
                raise ConfigError(f"override pattern {pattern!r} must be a regex string such as 'down_proj'")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"override pattern {pattern!r} is not a valid regex: {e}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"override {pattern!r} must map to a dict of fields, got {values!r}")
            unknown = set(values) - set(_OVERRIDABLE)
            if unknown:
                raise ConfigError(
                    f"override {pattern!r} sets {sorted(unknown, key=repr)}, which cannot vary per module; "
                    f"allowed: {list(_OVERRIDABLE)}"
                )
            try:
                dataclasses.replace(self, overrides={}, **values)
            except ConfigError as e:
                raise ConfigError(f"override {pattern!r}: {e}") from None

    def for_module(self, name: str) -> QuantConfig:
        """The config that applies to the module called ``name`` (overrides resolved)."""
        for pattern, values in self.overrides.items():
            if re.search(pattern, name):
                return dataclasses.replace(self, overrides={}, **values)
        return dataclasses.replace(self, overrides={}) if self.overrides else self

    def check_layer(self, name: str, in_features: int) -> list[str]:
        """Validate this config against one layer; return warnings (also issued)."""
        cfg = self.for_module(name)
        notes = []
        if cfg.group_size > in_features:
            raise ConfigError(
                f"group_size={cfg.group_size} is larger than {name}'s in_features={in_features}; "
                f"use group_size <= {in_features} or -1 (per-channel)"
            )
        if cfg.group_size > 0 and in_features % cfg.group_size:
            sizes = [cfg.group_size] * (in_features // cfg.group_size) + [in_features % cfg.group_size]
            notes.append(
                f"{name}: in_features={in_features} is not a multiple of group_size={cfg.group_size}; "
                f"groups are {sizes}. GPTQ checkpoints hold this, but some serving kernels "
                f"(vLLM Marlin/Exllama) need divisibility: group_size=64 divides it."
                if in_features % 64 == 0 else
                f"{name}: in_features={in_features} is not a multiple of group_size={cfg.group_size}; "
                f"the last group has {in_features % cfg.group_size} columns."
            )
        return notes

    def unused_overrides(self, names: list[str]) -> list[str]:
        """Override patterns that match none of ``names``."""
        return [p for p in self.overrides if not any(re.search(p, n) for n in names)]

    def n_groups(self, in_features: int) -> int:
        g = in_features if self.group_size == -1 else self.group_size
        return math.ceil(in_features / g)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"QuantConfig.from_dict needs a dict of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown QuantConfig fields {sorted(unknown, key=repr)}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> QuantConfig:
        return dataclasses.replace(self, **changes)


def _check_fields(cfg: QuantConfig) -> None:
    def bad(msg):
        raise ConfigError(msg)

    if not isinstance(cfg.bits, int) or isinstance(cfg.bits, bool) or cfg.bits not in SUPPORTED_BITS:
        bad(f"bits={cfg.bits!r} is not supported; use 2, 3, 4 or 8")
    if isinstance(cfg.group_size, bool) or not isinstance(cfg.group_size, int):
        bad(f"group_size={cfg.group_size!r} must be an int: a positive size or -1 for per-channel")
    if cfg.group_size == 0 or cfg.group_size < -1:
        bad(f"group_size={cfg.group_size} is invalid; use a positive size such as 128, or -1 for per-channel")
    if cfg.group_size > 0 and cfg.group_size % 8 and cfg.group_size < 32:
        warnings.warn(f"group_size={cfg.group_size} is unusual; kernels are tuned for 32, 64, 128", stacklevel=3)
    for name in ("sym", "act_order", "static_groups", "true_sequential"):
        if not isinstance(getattr(cfg, name), bool):
            bad(f"{name}={getattr(cfg, name)!r} must be True or False")
    if not isinstance(cfg.damp, (int, float)) or isinstance(cfg.damp, bool) or not math.isfinite(cfg.damp):
        bad(f"damp={cfg.damp!r} must be a number, a fraction of the mean Hessian diagonal such as 0.01")
    if not 0 <= cfg.damp <= 1:
        bad(f"damp={cfg.damp} is outside [0, 1]; it is a fraction of the mean Hessian diagonal, typically 0.01")
    if not isinstance(cfg.block_size, int) or isinstance(cfg.block_size, bool) or cfg.block_size < 1:
        bad(f"block_size={cfg.block_size!r} must be a positive int, typically 128")
    if cfg.static_groups and cfg.group_size == -1:
        bad("static_groups=True needs grouped quantization; set group_size (e.g. 128) or static_groups=False")
