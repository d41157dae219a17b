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
- the layers that share that Hessian (a true-sequential group such as q/k/v or up/gate; the
  whole block without true_sequential) are dealt out whole to ranks (``assign``: greedy
  longest-processing-time on ``layer_cost``). Each rank solves its own layers with the full
  Hessian, exactly as one process does (bitwise, given the Hessian), and each result is then
  broadcast from its owner (``solve_layers``), so every rank continues with the same quantized
  block. A group of one layer (o_proj, down_proj) runs on one rank while the others wait; with
  more ranks than layers in a group, some ranks idle. A NumericalError of a solve is raised on
  every rank.
Any number of ranks works (1, 2, 3, ...). Without an initialised process group (or with one
rank) nothing is communicated.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from .errors import CalibrationError, ConfigError, NumericalError
from .gptq import GPTQResult, HessianAccumulator


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


def layer_cost(out_features: int, in_features: int) -> float:
    """Estimated solve time of a weight [N, K], in arbitrary units: the lazy updates of the
    column loop (K * K * N) plus the factorisation of the Hessian (K^3 / 3)."""
    n, k = out_features, in_features
    return k * k * n + k ** 3 / 3


def assign(costs: list[float], size: int) -> list[int]:
    """The owner rank (in [0, size)) of each item: greedy longest-processing-time. Items in
    decreasing cost (ties: in list order) each go to the least-loaded rank (ties: the lowest).
    Pure and deterministic, so every rank computes the same assignment."""
    loads = [0.0] * size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(size), key=loads.__getitem__)
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def solve_layers(weights: dict[str, torch.Tensor],
                 solve_one: Callable[[str, torch.Tensor], GPTQResult]) -> dict[str, GPTQResult]:
    """name -> ``solve_one(name, weight)`` for layers that share one Hessian, each solved on one
    rank; every rank gets every result, in the order of ``weights``.

    weights: name -> [N, K] on this rank's device (the device that carries the broadcasts: CUDA
    under NCCL). solve_one holds the Hessian and the config; it runs only on the layer's owner.
    """
    rank, size = world()
    if size == 1:
        return {name: solve_one(name, w) for name, w in weights.items()}
    names = list(weights)
    owners = assign([layer_cost(*w.shape) for w in weights.values()], size)
    mine: dict[str, GPTQResult] = {}
    error = None
    try:
        for name, owner in zip(names, owners):
            if owner == rank:
                mine[name] = solve_one(name, weights[name])
    except NumericalError as e:          # raised below on every rank, or the others would wait forever
        error = e
    described: list = [None] * size
    dist.all_gather_object(described, str(error) if error else {n: _describe(r) for n, r in mine.items()})
    failed = [d for d in described if isinstance(d, str)]
    if failed:
        raise error if error else NumericalError(failed[0])
    fields = {name: d[name] for d in described for name in d}
    device = next(iter(weights.values())).device
    return {name: _broadcast(fields[name], mine.get(name), owner, device)
            for name, owner in zip(names, owners)}


class _Spec(NamedTuple):
    """A tensor field of a result, as sent ahead of the tensor itself."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_cpu: bool


def _describe(result: GPTQResult) -> dict:
    """The result's fields, each tensor replaced by its _Spec (small, picklable)."""
    return {f: _Spec(tuple(v.shape), v.dtype, v.device.type == "cpu") if isinstance(v, torch.Tensor) else v
            for f, v in vars(result).items()}


def _broadcast(fields: dict, result: GPTQResult | None, owner: int, device: torch.device) -> GPTQResult:
    """The owner's ``result`` on every rank: each tensor broadcast from the owner (on ``device``),
    the other fields from ``fields``. The owner gets its own object back."""
    received = {}
    for f, spec in fields.items():
        if not isinstance(spec, _Spec):
            received[f] = spec
            continue
        t = (getattr(result, f).to(device).contiguous() if result is not None
             else torch.empty(spec.shape, dtype=spec.dtype, device=device))
        dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src=owner)
        received[f] = t.cpu() if spec.on_cpu else t
    return result if result is not None else GPTQResult(**received)
