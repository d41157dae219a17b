"""Per-linear Hessians of a float model, and a cached layer that re-solves in well under a second.

    hessians = collect_hessians(model, ids)            # {full_name: H [K, K] float32, CPU}
    layer = CachedLayer(weight, hessians[name])        # weight [N, K], H [K, K]
    result = layer.solve(QuantConfig(bits=3))          # GPTQResult, as gptq.solve returns

``collect_hessians`` runs the *float* model block by block (as the pipeline does: a copy of
one block at a time on ``device`` in ``compute_dtype``), with scoped pre-hooks on every
linear; the model itself is never modified, and an exception (e.g. raised by ``progress``)
leaves no hook behind. Linears that read the same input (q/k/v) share one Hessian tensor.

``CachedLayer`` solves with ``gptq.solve`` itself, passing the inverse-Hessian factor
(``gptq.inverse_factor``) that it caches per (damp, act_order), so a re-solve with other bits
or group sizes is one pass of the column loop; the eigendecomposition (spectrum, exact
condition number) is computed once per layer, on first use.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .arch import block_linears, family_of, get_blocks, in_out_features
from .checks import check_calibration, check_model
from .config import QuantConfig
from .gptq import (
    GPTQResult,
    HessianAccumulator,
    InverseFactor,
    inverse_factor,
    one_thread,
    rtn_result,
    solve,
)
from .pipeline import _default_compute_dtype, _run_block, _to, capture_block_inputs, scoped_hooks

Progress = Callable[[int, int, str], None]


# ------------------------------------------------------------------------------- collection

@dataclass
class MemoryEstimate:
    """Bytes ``collect_hessians`` will hold at its peak (CPU Hessians + one block's activations)."""

    hessian_bytes: int      # all cached Hessians (float32), shared ones counted once
    activation_bytes: int   # block inputs + outputs for the whole calibration set
    block_bytes: int        # one block's working copy

    @property
    def total_bytes(self) -> int:
        return self.hessian_bytes + self.activation_bytes + self.block_bytes

    def __str__(self) -> str:
        mb = 2 ** 20
        return (f"~{self.total_bytes / mb:,.1f} MiB: Hessians {self.hessian_bytes / mb:,.1f} MiB, "
                f"activations {self.activation_bytes / mb:,.1f} MiB, "
                f"one block {self.block_bytes / mb:,.1f} MiB")


def estimate_memory(model: nn.Module, n_samples: int, seqlen: int,
                    compute_dtype: torch.dtype = torch.bfloat16) -> MemoryEstimate:
    family = family_of(model)
    blocks = get_blocks(model, family)
    per_block = 0
    for group in family.sequential:
        k, _ = in_out_features(block_linears(blocks[0], family)[group[0]])
        per_block += k * k * 4
    hidden = model.get_input_embeddings().embedding_dim
    item = torch.empty(0, dtype=compute_dtype).element_size()
    acts = 2 * n_samples * seqlen * hidden * item
    block = sum(p.numel() for p in blocks[0].parameters()) * item
    return MemoryEstimate(per_block * len(blocks), acts, block)


@torch.no_grad()
def collect_hessians(model: nn.Module, ids: torch.Tensor, names: list[str] | None = None,
                     batch_size: int | None = None, device: str | torch.device | None = None,
                     compute_dtype: torch.dtype | None = None, progress: Progress | None = None,
                     absmax: dict[str, torch.Tensor] | None = None,
                     means: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Hessians H = 2/n X^T X of the float model's linears: {full_name: [K, K] float32 on CPU}.

    ids: int64 [n_samples, seqlen]. names: the full linear names to keep (default: all).
    progress(done, total, message) is called after each block. ``absmax``, if given, is
    filled with {full_name: [K] float32}, the largest |input| seen per input channel;
    ``means`` with the mean input per channel (for ``constant_shift``).
    """
    check_model(model)
    family = family_of(model)
    blocks = get_blocks(model, family)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = compute_dtype or _default_compute_dtype(model, device)
    block_of = {f"{family.blocks}.{i}.{n}": i for i in range(len(blocks)) for n in family.linears}
    wanted = set(block_of) if names is None else set(names)
    if wanted - set(block_of) or not wanted:
        raise KeyError(f"no quantizable linear called {sorted(wanted - set(block_of))[:3]}; names look like "
                       f"{next(iter(block_of))!r}")
    last = max(block_of[n] for n in wanted)                 # stop after the last block needed
    inputs = capture_block_inputs(model, blocks[0], check_calibration(model, ids), batch_size, device)
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(blocks[:last + 1]):
        prefix = f"{family.blocks}.{i}"
        groups = [g for g in family.sequential if any(f"{prefix}.{n}" in wanted for n in g)]
        work = copy.deepcopy(block).to(device=device, dtype=dtype)
        inputs = [(h.to(dtype), {k: _to(v, device, dtype) for k, v in kw.items()}) for h, kw in inputs]
        accs, maxes, sums = _block_hessians(work, family, groups, inputs)
        del work
        for g in groups:
            h = accs[g[0]].hessian().cpu()
            for n in g:
                if f"{prefix}.{n}" in wanted:
                    out[f"{prefix}.{n}"] = h
                    if absmax is not None:
                        absmax[f"{prefix}.{n}"] = maxes[g[0]].cpu()
                    if means is not None:
                        means[f"{prefix}.{n}"] = (sums[g[0]] / accs[g[0]].n_rows).cpu()
        if progress:
            progress(i + 1, last + 1, f"block {i}")
    return out


def _block_hessians(work, family, groups, inputs):
    """One float pass of the block over every batch; returns (accumulators, |x| maxima, x sums)
    by the first name of each group. ``inputs`` is replaced in place by the block's outputs."""
    linears = block_linears(work, family)
    accs = {g[0]: HessianAccumulator(in_out_features(linears[g[0]])[0], inputs[0][0].device)
            for g in groups}
    maxes = {n: torch.zeros(acc.hessian_sum.shape[0], device=inputs[0][0].device) for n, acc in accs.items()}
    sums = {n: torch.zeros_like(m) for n, m in maxes.items()}

    def make_hook(name):
        def hook(_mod, args):
            x = args[0].detach()
            accs[name].add(x)
            flat = x.reshape(-1, x.shape[-1])
            maxes[name] = torch.maximum(maxes[name], flat.abs().amax(0).float())      # [K]
            sums[name] += flat.float().sum(0)
        return hook

    with scoped_hooks(lambda: [linears[n].register_forward_pre_hook(make_hook(n)) for n in accs]):
        for j, (hidden, kwargs) in enumerate(inputs):
            inputs[j] = (_run_block(work, hidden, kwargs), kwargs)
    return accs, maxes, sums


# ---------------------------------------------------------------------------- layer errors

def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per input column j, its share of the layer-output error 1/2 tr(dW H dW^T), [K] float32.

    dW = weight - dequantized [N, K]; with H = 2/n X^T X the total is the mean over tokens of
    ||dW x||^2. The shares sum to the total; one column's share can be negative (GPTQ's
    compensation makes errors cancel). Dead channels (H_jj = 0) contribute nothing.
    """
    dw = weight.float() - dequantized.float()                   # [N, K]
    return 0.5 * (dw * (dw @ hessian.float())).sum(0)          # [K]


def constant_shift(weight: torch.Tensor, dequantized: torch.Tensor, mean: torch.Tensor) -> float:
    """||dW mean(x)||^2: the part of the output error E||dW x||^2 (``output_error``'s total) that
    the mean input alone causes, a constant shift of the layer's output. The rest,
    E||dW (x - mean)||^2, is what varies with the input. GPTQ can make the shift cancel at the
    calibration data's mean (errors sent through a large, nearly constant input channel); a
    large share on other data means the result depends on the calibration domain
    (benchmarks/domain_shift.py)."""
    dw = weight.float() - dequantized.float()
    return float((dw @ mean.float()).pow(2).sum())


def constant_shift_share(weight: torch.Tensor, dequantized: torch.Tensor, mean: torch.Tensor,
                         total: float) -> float:
    """``constant_shift`` / ``total``: the fraction of a layer's output error that its mean input
    causes. ``total`` is E||dW x||^2 on the same inputs, ``output_error(weight, dequantized,
    hessian).sum()`` with the Hessian whose inputs have mean ``mean`` [K]; the fraction lies in
    [0, 1] (up to rounding), as E||dW x||^2 = ||dW mean||^2 + E||dW (x - mean)||^2.
    NaN where ``total`` <= 0 (no error to share)."""
    if not total > 0:
        return math.nan
    return constant_shift(weight, dequantized, mean) / total


# ---------------------------------------------------------------------------- cached layer

class CachedLayer:
    """One linear's float32 weight [N, K] and Hessian [K, K], re-solvable with any config.

    Each (damp, act_order) costs the damped inverse's Cholesky factor (cached), each config
    one pass of the column loop; results are kept (LRU). The eigendecomposition of the live
    part of H (dead channels removed), for the spectrum and the exact condition number, is
    computed once on first use (about a second for K = 1536 on one CPU thread).
    """

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, cache_size: int = 16):
        k = weight.shape[1]
        if hessian.shape != (k, k):
            raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight in_features={k}")
        self.weight = weight.detach().float().cpu()            # [N, K]
        self.hessian = hessian.detach().float().cpu()          # [K, K]
        self.dead = torch.diag(self.hessian) == 0             # [K] bool
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None
        self._factors: OrderedDict = OrderedDict()
        self._results: OrderedDict = OrderedDict()
        self.cache_size = cache_size

    @property
    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues [L] ascending, eigenvectors [L, L]) of H restricted to live channels."""
        if self._eig is None:
            live = ~self.dead
            h = self.hessian[live][:, live]                      # [L, L]
            # float64 where it is cheap; float32 (seconds for L = 1536 on a laptop CPU) above
            with one_thread():
                vals, vecs = torch.linalg.eigh(h.double() if h.shape[0] <= 512 else h)
            self._eig = (vals.float(), vecs.float())
        return self._eig

    def spectrum(self) -> torch.Tensor:
        """Eigenvalues of H, descending, [K] (dead channels contribute zeros)."""
        vals = torch.cat([self.eig[0], torch.zeros(int(self.dead.sum()))])
        return vals.sort(descending=True).values

    def damp_abs(self, damp: float) -> float:
        """Absolute damping for a relative ``damp`` (dead diagonal entries count as 1, as in solve)."""
        diag = torch.diag(self.hessian).clone()
        diag[self.dead] = 1
        return damp * max(float(diag.mean()), 1e-12)

    def factor(self, damp: float, act_order: bool) -> InverseFactor:
        key = (float(damp), bool(act_order))
        if key not in self._factors:
            self._factors[key] = self._factor(*key)
            _trim(self._factors, self.cache_size)
        self._factors.move_to_end(key)
        return self._factors[key]

    def _factor(self, damp: float, act_order: bool) -> InverseFactor:
        with one_thread():
            return inverse_factor(self.hessian, damp, act_order)

    def condition_number(self, damp_abs: float) -> float:
        """Exact condition number of the damped Hessian (dead diagonal entries set to 1)."""
        vals = self.eig[0]
        lo = [float(vals.min())] if vals.numel() else []
        hi = [float(vals.max())] if vals.numel() else []
        if self.dead.any():
            lo, hi = lo + [1.0], hi + [1.0]
        return (max(hi) + damp_abs) / (min(lo) + damp_abs)

    def solve(self, config: QuantConfig) -> GPTQResult:
        """GPTQ with ``config`` (bits, group_size, sym, act_order, static_groups, damp, block_size)."""
        key = _config_key(config)
        if key not in self._results:
            self._results[key] = self._solve(config)
            _trim(self._results, self.cache_size)
        self._results.move_to_end(key)
        return self._results[key]

    def rtn(self, config: QuantConfig) -> GPTQResult:
        """Round-to-nearest of the same weight (dead channels not zeroed, as rtn_result)."""
        key = ("rtn", config.bits, config.group_size, config.sym)
        if key not in self._results:
            with one_thread():
                self._results[key] = rtn_result(self.weight, config)
            _trim(self._results, self.cache_size)
        return self._results[key]

    def output_error(self, result: GPTQResult) -> torch.Tensor:
        """[K] per-column shares of 1/2 tr(dW H dW^T) for ``result`` against the float weight."""
        with one_thread():
            return output_error(self.weight, result.dequantize(), self.hessian)

    def _solve(self, config: QuantConfig) -> GPTQResult:
        return solve(self.weight, self.hessian, config, factor=self.factor(config.damp, config.act_order))


def _config_key(config: QuantConfig) -> tuple:
    return (config.bits, config.group_size, config.sym, config.act_order, config.static_groups,
            float(config.damp), config.block_size)


def _trim(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)
