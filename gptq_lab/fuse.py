"""Fuse the quantized linears that read the same input into one matmul, for inference.

    report = fuse_model(model)      # q/k/v -> one QuantLinear, gate/up -> one, in every block
    prepare_model(model)            # then prepare, as usual (or prepare_model(model, fuse=True))

A decode step then launches one int4 kernel for q/k/v instead of three and one for gate/up
instead of two: small matmuls spend much of their time ramping up, so one [K, 3N] kernel is
faster than three [K, N] ones. The fused layer's checkpoint tensors are the members'
concatenated along N (dim 1): qweight [K*b/32, N], scales [G, N], qzeros [G, N*b/32] (packed
along N, so each member's N is a multiple of 32 // bits, as QuantLinear requires), bias [N].

How the parent module runs it: the fused QuantLinear lives in a ``FusedGroup`` registered on
the parent (``self_attn.fused_q_proj_k_proj_v_proj``); each member is replaced by a
``FusedSlice`` (no weights: ``start:end`` of the fused output) and the parent's ``forward`` is
wrapped so that, before the original forward runs, the group computes ``fused(x)`` on the
parent's first argument ``x``. A slice called with that same tensor returns its columns of the
stored output; called with any other input it computes ``fused(input)`` itself and slices it,
so the answer never depends on the parent passing ``x`` straight to its members (only the
saving does). The stored tensors are dropped when the parent's forward returns.

Trade-offs: the fused output of a group lives until the parent's forward returns (for gate/up
at a 2048-token prefill that is [2048, 2 * 11008] per layer, one layer at a time); slices are
views with the fused row stride (``.view`` that splits the last dimension works, a
``.view`` merging it with the rows would not); the model's state_dict names change, so a
fused model runs but cannot be saved as a GPTQ checkpoint (``gptq_lab.save`` refuses it;
save before fusing or reload the checkpoint). Copy (``copy.deepcopy``) works; pickling the
whole model does not (the wrapped forward).
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import family_of, get_blocks
from .errors import UnsupportedModelError
from .qlinear import QuantLinear

_SAME = ("in_features", "bits", "group_size", "sym")


def fuse_quant_linears(layers: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear whose output [..., sum(N)] is the layers' outputs concatenated along N.

    The layers must agree on in_features, bits, group_size, sym, device and scales dtype and
    have equal g_idx; otherwise ValueError says which differs. Layers whose checkpoint tensors
    were released (``prepare(release_checkpoint=True)``) are refused; fuse before preparing. A
    prepared layer may be fused (its tensors are read, not its kernel layout); the fused layer
    is not prepared: ``prepare()`` it. Bias: concatenated, zeros for members without one if any
    has one, None if none has.
    """
    if not layers or not all(isinstance(m, QuantLinear) for m in layers):
        raise ValueError(f"fuse_quant_linears needs a non-empty list of QuantLinear, got "
                         f"{[type(m).__name__ for m in layers]}")
    if any(m._released for m in layers):
        raise ValueError("a layer's checkpoint tensors were released by prepare(release_checkpoint=True); "
                         "fuse before preparing (prepare_model(model, fuse=True) does)")
    first = layers[0]
    for attr in _SAME:
        values = [getattr(m, attr) for m in layers]
        if len(set(values)) > 1:
            raise ValueError(f"{attr} differs between the layers: {values}")
    for what, values in (("device", [m.qweight.device for m in layers]),
                         ("scales dtype", [m.scales.dtype for m in layers])):
        if len(set(values)) > 1:
            raise ValueError(f"{what} differs between the layers: {[str(v) for v in values]}")
    if not all(torch.equal(m.g_idx, first.g_idx) for m in layers[1:]):
        raise ValueError("g_idx differs between the layers (act-order with different permutations); "
                         "they cannot share one matmul")
    has_bias = any(m.bias is not None for m in layers)
    n = sum(m.out_features for m in layers)
    fused = QuantLinear(first.in_features, n, first.bits, first.group_size, first.sym, has_bias, device="meta")
    for name in ("qweight", "qzeros", "scales"):
        setattr(fused, name, torch.cat([getattr(m, name) for m in layers], dim=1))
    fused.g_idx = first.g_idx.clone()
    if has_bias:
        like = next(m.bias for m in layers if m.bias is not None)
        fused.bias = torch.cat([m.bias if m.bias is not None else like.new_zeros(m.out_features)
                                for m in layers])
    fused.cache_weight = all(m.cache_weight for m in layers)
    return fused


class FusedGroup(nn.Module):
    """Holds the fused QuantLinear of a parent's member linears and, during the parent's
    forward, the input it was run on and its output (plain attributes, not buffers)."""

    def __init__(self, fused: QuantLinear, members: tuple[str, ...]):
        super().__init__()
        self.fused = fused
        self.members = members            # the replaced children's names, in column order
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def columns(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """fused(x)[..., start:end]: the stored output when ``x`` is the stored input."""
        out = self.output if x is self.input else self.fused(x)
        return out[..., start:end]

    def extra_repr(self) -> str:
        return f"members={list(self.members)}"


class FusedSlice(nn.Module):
    """Stands in for one member of a FusedGroup: x [..., K] -> fused(x)[..., start:end]."""

    def __init__(self, group: FusedGroup, start: int, end: int):
        super().__init__()
        object.__setattr__(self, "group", group)     # not registered: the parent owns the group
        self.start, self.end = start, end
        self.in_features, self.out_features = group.fused.in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.columns(x, self.start, self.end)

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.end} of the fused {self.group.members}"


def _forward_with_fused_groups(self: nn.Module, *args, **kwargs):
    """The parent's forward: run every fused group on the first argument, then the original."""
    x = args[0] if args else kwargs.get(self._fused_input_name)
    groups = [getattr(self, name) for name in self._fused_groups]
    try:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            for g in groups:
                if x.shape[-1] == g.fused.in_features:
                    g.input, g.output = x, g.fused(x)
        return self._forward_before_fusion(*args, **kwargs)
    finally:
        for g in groups:
            g.input = g.output = None


def _group_name(leaves) -> str:
    """The parent's attribute holding the group of its children ``leaves``."""
    return "fused_" + "_".join(leaves)


def _install(parent: nn.Module, leaves: tuple[str, ...], fused: QuantLinear) -> str:
    """Register the group on ``parent``, replace the members by slices, wrap the forward."""
    name = _group_name(leaves)
    group = FusedGroup(fused, leaves)
    parent.add_module(name, group)
    start = 0
    for leaf in leaves:
        end = start + getattr(parent, leaf).out_features
        setattr(parent, leaf, FusedSlice(group, start, end))
        start = end
    if "_fused_groups" not in vars(parent):
        original = parent.forward
        parent._fused_input_name = next(iter(inspect.signature(original).parameters), None)
        parent._forward_before_fusion = original
        parent._fused_groups = ()
        parent.forward = types.MethodType(_forward_with_fused_groups, parent)
    parent._fused_groups = (*parent._fused_groups, name)
    return name


@dataclass
class FusionReport:
    """What ``fuse_model`` did: fused group module name -> its members' full names, and the
    groups left as they were -> why."""
    family: str | None
    fused: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)     # "a, b, c" -> reason


def _why_not(block: nn.Module, names: tuple[str, ...]) -> str | None:
    """Why the block's linears ``names`` cannot be fused, or None."""
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) > 1:
        return f"the members have different parent modules {sorted(parents)}"
    for n in names:
        try:
            m = block.get_submodule(n)
        except AttributeError:
            return f"the block has no {n}"
        if isinstance(m, FusedSlice):
            return "already fused"
        if not isinstance(m, QuantLinear):
            return f"{n} is a {type(m).__name__}, not a QuantLinear"
    parent = block.get_submodule(parents.pop())
    if hasattr(parent, _group_name(n.rpartition(".")[2] for n in names)):
        return "the parent already has an attribute of the fused group's name"
    return None


def fuse_model(model: nn.Module) -> FusionReport:
    """Fuse, in every block, each true-sequential group of several QuantLinear children of one
    parent (``arch.Family.sequential``: Llama q/k/v and gate/up; OPT and GPT-J q/k/v), in place.
    Groups that cannot fuse (mixed bits or group size, different g_idx, a float member...) are
    left as they are and reported with the reason; a model of unknown family is left alone."""
    try:
        family = family_of(model)
    except UnsupportedModelError:
        return FusionReport(family=None)
    report = FusionReport(family=family.name)
    for i, block in enumerate(get_blocks(model, family)):
        prefix = f"{family.blocks}.{i}"
        for names in (g for g in family.sequential if len(g) > 1):
            full = [f"{prefix}.{n}" for n in names]
            reason = _why_not(block, names)
            if reason is None:
                try:
                    fused = fuse_quant_linears([block.get_submodule(n) for n in names])
                except ValueError as e:
                    reason = str(e)
            if reason is not None:
                report.skipped[", ".join(full)] = reason
                continue
            parent_name = names[0].rpartition(".")[0]
            group = _install(block.get_submodule(parent_name), tuple(n.rpartition(".")[2] for n in names),
                             fused)
            report.fused[".".join(filter(None, (prefix, parent_name, group)))] = full
    return report


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedGroup) for m in model.modules())
