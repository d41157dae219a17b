"""Quantization across processes with torch.distributed (e.g. ``torchrun --nproc-per-node N``).

    torch.distributed.init_process_group("nccl")        # or "gloo" on CPU
    torch.cuda.set_device(local_rank)
    results = quantize_model(model, ids, config, device=f"cuda:{local_rank}")   # on every rank

Every rank calls ``quantize_model`` with the same model, calibration and config; nothing else
changes. Inside:
- the calibration samples are split across ranks (``shard_calibration``: contiguous shares,
  as even as possible, any number of ranks up to the number of samples);
- each rank accumulates Hessian *sums* (sum of x x^T and the token count) for its share; the
  sums and counts are all-reduced, so every rank holds the Hessian of the whole calibration
  set (the same as one process, up to the order of floating-point additions);
- each layer's solve is split across ranks by output rows (GPTQ treats rows independently:
  every row sees the same Hessian), and each rank's rows are broadcast to all, so every rank
  continues with the same quantized block. This spreads every solve, including a block's
  single-layer groups (o_proj, down_proj), over all ranks.
Without an initialised process group (or with one rank) every function here is a no-op.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .config import QuantConfig
from .errors import CalibrationError, ConfigError
from .gptq import GPTQResult, HessianAccumulator
from .gptq import solve as gptq_solve


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items (the first n % size ranks get one more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_calibration(ids: torch.Tensor) -> torch.Tensor:
    """This rank's share of the calibration samples ids [n_samples, seqlen]."""
    rank, size = world()
    if size == 1:
        return ids
    if ids.shape[0] < size:
        raise CalibrationError(f"{ids.shape[0]} calibration samples cannot be split across {size} ranks; "
                               f"use at least {size} samples or fewer processes")
    start, stop = share(ids.shape[0], rank, size)
    return ids[start:stop]


def refuse(feature: str) -> None:
    if world()[1] > 1:
        raise ConfigError(f"{feature} is not supported under torch.distributed yet; run it in one process")


def all_reduce_hessian(acc: HessianAccumulator) -> None:
    """Sum the accumulator's x x^T sums and row counts over all ranks (in place)."""
    if world()[1] == 1:
        return
    dist.all_reduce(acc.hessian_sum)
    n = torch.tensor([acc.n_rows], dtype=torch.float64, device=acc.hessian_sum.device)
    dist.all_reduce(n)
    acc.n_rows = int(n.item())


def solve(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig,
          solve_one: Callable[..., GPTQResult] = gptq_solve) -> GPTQResult:
    """``solve_one`` (gptq.solve) of ``weight`` [N, K], rows split across ranks, the result on every rank."""
    rank, size = world()
    if size == 1:
        return solve_one(weight, hessian, config)
    n = weight.shape[0]
    start, stop = share(n, rank, size)
    mine = solve_one(weight[start:stop], hessian, config)
    parts = {"codes": [], "scales": [], "zeros": [], "losses": []}
    for src in range(size):
        a, b = share(n, src, size)
        k, g = mine.codes.shape[1], mine.scales.shape[1]
        dev = mine.codes.device
        tensors = {"codes": mine.codes, "scales": mine.scales, "zeros": mine.zeros,
                   "losses": mine.column_loss[None]} if src == rank else {
            "codes": torch.empty(b - a, k, dtype=mine.codes.dtype, device=dev),
            "scales": torch.empty(b - a, g, dtype=mine.scales.dtype, device=dev),
            "zeros": torch.empty(b - a, g, dtype=mine.zeros.dtype, device=dev),
            "losses": torch.empty(1, k, dtype=mine.column_loss.dtype, device=dev)}
        for key, t in tensors.items():
            t = t.contiguous()
            if b > a or key == "losses":
                dist.broadcast(t, src=src)
            parts[key].append(t)
    return GPTQResult(
        codes=torch.cat(parts["codes"]), scales=torch.cat(parts["scales"]), zeros=torch.cat(parts["zeros"]),
        g_idx=mine.g_idx, column_loss=torch.cat(parts["losses"]).sum(0), perm=mine.perm,
        damp_used=mine.damp_used, damp_escalations=mine.damp_escalations,
        dead_channels=mine.dead_channels, condition_number=mine.condition_number, bits=mine.bits,
        group_size=mine.group_size, sym=mine.sym, notes=mine.notes)
