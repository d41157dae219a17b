"""Per-linear Hessians of a float model, and a cached layer that re-solves in well under a second.

    hessians = collect_hessians(model, ids)            # {full_name: H [K, K] float32, CPU}
    layer = CachedLayer(weight, hessians[name])        # weight [N, K], H [K, K]
    result = layer.solve(QuantConfig(bits=3))          # GPTQResult, as gptq.solve returns

``collect_hessians`` runs the *float* model block by block (as the pipeline does: a copy of
one block at a time on ``device`` in ``compute_dtype``), with scoped pre-hooks on every
linear; the model itself is never modified, and an exception (e.g. raised by ``progress``)
leaves no hook behind. Linears that read the same input (q/k/v) share one Hessian tensor.

``CachedLayer`` solves with the same algorithm and the same inverse-Hessian factor as
``gptq.solve`` (dead channels, act-order, static groups, damping with escalation, lazy
blocks aligned to groups), but caches the factor per (damp, act_order), runs the column
loop on a transposed, contiguous copy of the weight with in-place rank-1 updates, and does
all of it on one intra-op thread (on a busy 2-core CPU, torch's 2-thread small ops are
5-50x slower). Codes agree with ``gptq.solve`` up to rounding ties; the eigendecomposition
(spectrum, exact condition number) is computed once per layer, on first use.
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
from .config import QuantConfig
from .gptq import GPTQResult, HessianAccumulator, _damped_inverse_cholesky, one_thread, rtn_result
from .pipeline import (
    _check_calibration,
    _default_compute_dtype,
    _run_block,
    _to,
    capture_block_inputs,
    check_model,
    scoped_hooks,
)
from .quant import compute_qparams, maxq

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
                     absmax: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Hessians H = 2/n X^T X of the float model's linears: {full_name: [K, K] float32 on CPU}.

    ids: int64 [n_samples, seqlen]. names: the full linear names to keep (default: all).
    progress(done, total, message) is called after each block. ``absmax``, if given, is
    filled with {full_name: [K] float32}, the largest |input| seen per input channel.
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
    inputs = capture_block_inputs(model, blocks[0], _check_calibration(model, ids), batch_size, device)
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(blocks[:last + 1]):
        prefix = f"{family.blocks}.{i}"
        groups = [g for g in family.sequential if any(f"{prefix}.{n}" in wanted for n in g)]
        work = copy.deepcopy(block).to(device=device, dtype=dtype)
        inputs = [(h.to(dtype), {k: _to(v, device, dtype) for k, v in kw.items()}) for h, kw in inputs]
        accs, maxes = _block_hessians(work, family, groups, inputs)
        del work
        for g in groups:
            h = accs[g[0]].hessian().cpu()
            for n in g:
                if f"{prefix}.{n}" in wanted:
                    out[f"{prefix}.{n}"] = h
                    if absmax is not None:
                        absmax[f"{prefix}.{n}"] = maxes[g[0]].cpu()
        if progress:
            progress(i + 1, last + 1, f"block {i}")
    return out


def _block_hessians(work, family, groups, inputs):
    """One float pass of the block over every batch; returns (accumulators, |x| maxima) by the
    first name of each group. ``inputs`` is replaced in place by the block's outputs."""
    linears = block_linears(work, family)
    accs = {g[0]: HessianAccumulator(in_out_features(linears[g[0]])[0], inputs[0][0].device)
            for g in groups}
    maxes = {n: torch.zeros(acc.hessian_sum.shape[0], device=inputs[0][0].device) for n, acc in accs.items()}

    def make_hook(name):
        def hook(_mod, args):
            x = args[0]
            accs[name].add(x)
            seen = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()     # [K]
            maxes[name] = torch.maximum(maxes[name], seen)
        return hook

    with scoped_hooks(lambda: [linears[n].register_forward_pre_hook(make_hook(n)) for n in accs]):
        for j, (hidden, kwargs) in enumerate(inputs):
            inputs[j] = (_run_block(work, hidden, kwargs), kwargs)
    return accs, maxes


# ---------------------------------------------------------------------------- layer errors

def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per input column j, its share of the layer-output error 1/2 tr(dW H dW^T), [K] float32.

    dW = weight - dequantized [N, K]; with H = 2/n X^T X the total is the mean over tokens of
    ||dW x||^2. The shares sum to the total; one column's share can be negative (GPTQ's
    compensation makes errors cancel). Dead channels (H_jj = 0) contribute nothing.
    """
    dw = weight.float() - dequantized.float()                   # [N, K]
    return 0.5 * (dw * (dw @ hessian.float())).sum(0)          # [K]


# ---------------------------------------------------------------------------- cached layer

@dataclass
class _Factor:
    hinv_chol: torch.Tensor   # [K, K] upper Cholesky factor of the damped inverse, solve order
    perm: torch.Tensor | None
    damp_abs: float
    escalations: int
    condition_number: float   # gptq.condition_estimate of the damped Hessian


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

    def factor(self, damp: float, act_order: bool) -> _Factor:
        key = (float(damp), bool(act_order))
        if key not in self._factors:
            self._factors[key] = self._factor(*key)
            _trim(self._factors, self.cache_size)
        self._factors.move_to_end(key)
        return self._factors[key]

    def _factor(self, damp: float, act_order: bool) -> _Factor:
        h = self.hessian.clone()
        h[self.dead, self.dead] = 1
        perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
        if perm is not None:
            h = h[perm][:, perm]
        with one_thread():
            hinv_chol, damp_abs, escalations, cond = _damped_inverse_cholesky(h, damp)
        return _Factor(hinv_chol, perm, damp_abs, escalations, cond)

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
        k = self.weight.shape[1]
        w = self.weight.clone()
        w[:, self.dead] = 0
        static = None
        if config.static_groups and config.group_size != -1:
            static = [compute_qparams(w[:, s:s + config.group_size], config.bits, config.sym)
                      for s in range(0, k, config.group_size)]
        f = self.factor(config.damp, config.act_order)
        if f.perm is not None:
            w = w[:, f.perm]
        wt = w.t().contiguous()                                      # [K, N], solve order
        with one_thread():
            codes_t, err_t, scales, zeros, g_of_col = _columns(wt, f.hinv_chol, config, f.perm, static)
        column_loss = (err_t ** 2).sum(1) / 2                        # [K]
        codes = codes_t.t().to(torch.uint8)                          # [N, K]
        if f.perm is not None:
            inv = torch.argsort(f.perm)
            codes, column_loss, g_of_col = codes[:, inv], column_loss[inv], g_of_col[inv]
        notes = []
        if f.escalations:
            notes.append(f"Cholesky failed with damp={config.damp}; succeeded after raising damping "
                         f"{f.escalations} time(s) to {f.damp_abs:.3g} (absolute)")
        if bool(self.dead.all()):
            notes.append("every input channel is dead (always zero); quantized to zero")
        return GPTQResult(
            codes=codes.contiguous(), scales=scales, zeros=zeros.round().to(torch.int32),
            g_idx=g_of_col.to(torch.int32), column_loss=column_loss, perm=f.perm, damp_used=f.damp_abs,
            damp_escalations=f.escalations, dead_channels=self.dead.clone(),
            condition_number=f.condition_number, bits=config.bits, group_size=config.group_size,
            sym=config.sym, notes=notes)


def _columns(wt, hinv, config, perm, static):
    """The GPTQ column loop on wt [K, N] (solve order, modified in place) with upper factor hinv.
    Returns codes_t [K, N] float, err_t [K, N] ((w - q) / d per column), scales/zeros [N, G], g [K]."""
    k, n = wt.shape
    per_channel = config.group_size == -1
    group = k if per_channel else config.group_size
    n_groups = math.ceil(k / group)
    scales, zeros = torch.zeros(n, n_groups), torch.zeros(n, n_groups)
    g_of_col = torch.zeros(k, dtype=torch.int64)
    if per_channel:
        block = config.block_size
        scales[:, 0], zeros[:, 0] = compute_qparams(wt.t(), config.bits, config.sym)
    else:
        block = max(1, config.block_size // group) * group if group <= config.block_size else group
    if static is not None:
        for gi, (s, z) in enumerate(static):
            scales[:, gi], zeros[:, gi] = s, z
    if not per_channel and static is None:
        g_of_col = torch.arange(k) // group
    elif static is not None:
        g_of_col = (perm if perm is not None else torch.arange(k)) // group
    codes_t, err_t = torch.empty(k, n), torch.empty(k, n)
    top = float(maxq(config.bits))
    scale = zero = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, h1 = wt[i1:i2], hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(g_of_col[col])
            if per_channel or static is not None:
                scale, zero = scales[:, gi], zeros[:, gi]
            elif col % group == 0:
                scale, zero = compute_qparams(w1[i:i + group].t(), config.bits, config.sym)
                scales[:, gi], zeros[:, gi] = scale, zero
            wc = w1[i]
            c = torch.clamp(torch.round(wc / scale) + zero, 0, top)
            e = (wc - scale * (c - zero)) / h1[i, i]
            codes_t[col], err_t[col] = c, e
            if i + 1 < i2 - i1:
                w1[i + 1:].addr_(h1[i, i + 1:], e, alpha=-1)
        if i2 < k:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err_t[i1:i2], alpha=-1)
    return codes_t, err_t, scales, zeros, g_of_col


def _config_key(config: QuantConfig) -> tuple:
    return (config.bits, config.group_size, config.sym, config.act_order, config.static_groups,
            float(config.damp), config.block_size)


def _trim(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)
