"""Pick a kernel configuration per shape bucket, by timing a short candidate list once.

    cfg = select(x_kernel_ordered, prepared)      # cached per (M bucket, N, K', layer format)

The first call for a bucket times every candidate with ``triton.testing.do_bench`` (the L2
cache is flushed before each run, as in inference where weights are not cache-resident) and
keeps the fastest; later calls are a dict lookup. No timing happens under TRITON_INTERPRET,
while a CUDA graph is being captured, or with GPTQ_LAB_AUTOTUNE=0: then ``heuristic`` answers.
Warm each batch size up before capturing a CUDA graph so that its tuned choice is used.
"""
from __future__ import annotations

import os

import torch

from .triton_gemm import KernelConfig, check_config, compile_ahead, launch
from .triton_pack import PreparedGPTQ

_CHOSEN: dict[tuple, KernelConfig] = {}
TIMINGS: dict[tuple, dict[KernelConfig, float]] = {}     # key -> candidate -> ms (for benchmarks)


def m_bucket(m: int) -> int:
    """1, 2, 4, ..., 1024, then 2048 for anything larger."""
    return min(1 << max(m - 1, 0).bit_length(), 2048)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(ctas: int, k_tiles: int, sms: int, waves: tuple[int, ...] = (1, 2, 4)) -> list[int]:
    """1 and the split_k values that bring ctas * split near ``waves`` times the SM count."""
    out = {1}
    for w in waves:
        out.add(max(1, min(k_tiles // 4, -(-w * sms // ctas))))
    return sorted(out)


# Tensor-core tiles (64 weight columns, block_k=128, the weights as the wgmma's register operand,
# swap=True) that Triton 3.6 + ptxas compile without any full wgmma wait inside the K loop: up
# to 7 wgmmas stay in flight while the next tile is loaded and dequantized. The block_k=64
# tiles the large-batch list had, and most with 128+ columns, wait after every wgmma (ptxas
# warning C7515); swap=False tiles wait once per tile. benchmarks/triton_sass.py shows this
# without a GPU; a CPU test keeps it true. (block_m, warps):
RS_PIPELINED = ((64, 4), (128, 4), (256, 8))


def candidates(m: int, p: PreparedGPTQ, k_rows: int, sms: int) -> list[KernelConfig]:
    """Configurations worth timing for an [m, k_rows] x; each passes ``check_config``."""
    n, bucket = p.out_features, m_bucket(m)
    raw: list[KernelConfig] = []

    def add(kind, bm, bn, bk, warps, stages, deq=False, swap=True, splits=None, waves=(1, 2, 4)):
        ctas = -(-n // bn) * (m if kind == "gemv" else -(-m // bm))
        for s in splits or _splits(ctas, -(-k_rows // bk), sms, waves):
            raw.append(KernelConfig(kind, bm, bn, bk, s, deq, warps, stages, swap))

    if bucket <= 2:
        for bn, warps in ((128, 4), (256, 4), (256, 8), (512, 8)):
            for bk in (64, 128, 256):
                for stages in (1, 2, 3):
                    add("gemv", 16, bn, bk, warps, stages)
        add("gemm", 16, 64, 128, 4, 4)
        for stages in (4, 6):               # no wgmma wait in the K loop: loads stay in flight
            add("gemm", 16, 64, 128, 4, stages, deq=True)
    elif bucket <= 16:
        for bn in (64, 128, 256):
            for bk in (64, 128):
                add("gemm", 16, bn, bk, 4, 4)
        for bn in (64, 128):
            add("gemm", 16, bn, 128, 8, 4)
            add("gemm", 16, bn, 128, 4, 4, deq=True)
            add("gemm", 64, bn, 128, 4, 3, swap=False)
        add("gemm", 16, 64, 128, 8, 4, deq=True)          # RS_PIPELINED-like (16 rows)
        add("gemm", 16, 64, 128, 4, 6, deq=True)
    elif bucket <= 64:
        for bn in (64, 128):
            for bk in (64, 128):
                add("gemm", bucket, bn, bk, 4, 4)
            add("gemm", bucket, bn, 64, 4, 4, deq=True)
            add("gemm", bucket, bn, 128, 8, 4, deq=True)
            if bucket == 64:
                for deq in (False, True):
                    add("gemm", 64, bn, 64, 4, 3, deq=deq, swap=False)
        add("gemm", bucket, 64, 128, 4, 4, deq=True)          # an RS_PIPELINED tile
    else:
        for bm, bn, warps, swap in ((128, 64, 4, True), (256, 64, 4, True), (128, 128, 8, True),
                                    (256, 128, 8, True), (64, 128, 4, False),
                                    (128, 128, 8, False), (128, 256, 8, False)):
            if bm > max(bucket, 64):
                continue
            for deq in (True, False):
                ctas = -(-n // bn) * -(-m // bm)
                add("gemm", bm, bn, 64, warps, 3, deq=deq, swap=swap,
                    splits=[1] if ctas >= sms else [1, 2])
        for bm, warps in RS_PIPELINED:
            if bm <= max(bucket, 64):
                add("gemm", bm, 64, 128, warps, 3, deq=True, waves=(1,))
    if bucket >= 512:
        raw.append(KernelConfig("dequant"))
    out = [c for c in dict.fromkeys(raw) if check_config(c, p, k_rows) is None]
    return out or [heuristic(m, p, k_rows, sms)]


def heuristic(m: int, p: PreparedGPTQ, k_rows: int, sms: int) -> KernelConfig:
    """A configuration without timing anything: the most common winner per bucket on an H200."""
    def fit(bk: int) -> int:                       # largest of bk, bk/2, ... that tiles the groups
        while bk > 32 and p.group_size < k_rows and p.group_size % bk:
            bk //= 2
        return bk

    bucket, n = m_bucket(m), p.out_features
    if bucket <= 2:
        kind, bm, bn, bk, warps, stages, deq = "gemv", 16, 256, fit(128), 4, 2, False
    elif bucket <= 16:
        kind, bm, bn, bk, warps, stages, deq = "gemm", 16, 64, fit(128), 4, 4, True
    elif bucket <= 64:
        kind, bm, bn, bk, warps, stages, deq = "gemm", bucket, 64, fit(64), 4, 3, True
    else:
        kind, bm, bn, bk, warps, stages, deq = "gemm", min(bucket, 256), 64, fit(64), 4, 3, True
    ctas = -(-n // bn) * (m if kind == "gemv" else -(-m // bm))
    split = max(1, min(-(-k_rows // bk) // 4, -(-2 * sms // ctas)))
    return KernelConfig(kind, bm, bn, bk, split, deq, warps, stages)


def _tuning_allowed(x: torch.Tensor) -> bool:
    if x.device.type != "cuda" or os.environ.get("GPTQ_LAB_AUTOTUNE", "1") == "0":
        return False
    return not torch.cuda.is_current_stream_capturing()


def tuning_key(x: torch.Tensor, p: PreparedGPTQ) -> tuple:
    return (m_bucket(x.shape[0]), p.out_features, x.shape[1], p.group_size, p.bits, p.zero >= 0,
            x.dtype, x.device.index)


def select(x: torch.Tensor, p: PreparedGPTQ) -> KernelConfig:
    """The configuration for kernel-ordered x [M, K'] on ``p``: tuned once per key, then cached."""
    key = tuning_key(x, p)
    cfg = _CHOSEN.get(key)
    if cfg is not None:
        return cfg
    m, k_rows = x.shape
    sms = _sm_count(x.device)
    if not _tuning_allowed(x):
        return heuristic(m, p, k_rows, sms)
    from triton.runtime.errors import OutOfResources, PTXASError
    configs = candidates(m, p, k_rows, sms)
    compile_ahead(x, p, configs)
    times: dict[KernelConfig, float] = {}
    for c in configs:
        try:
            times[c] = gpu_time(lambda c=c: launch(x, p, c), warmup=5, rep=25)
        except (OutOfResources, PTXASError):          # too much shared memory / registers: skip
            continue
    TIMINGS[key] = times
    cfg = _CHOSEN[key] = min(times, key=times.get)
    return cfg


def gpu_time(fn, warmup: int = 10, rep: int = 60) -> float:
    """Median milliseconds of ``fn`` on the GPU alone: captured once in a CUDA graph, each
    replay timed after an L2 flush (so neither Python launch cost nor cached weights count)."""
    from triton.testing import do_bench
    fn()                                                           # compile, allocate
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
    finally:
        del graph


def clear() -> None:
    """Forget tuned choices (e.g. after changing GPU)."""
    _CHOSEN.clear()
    TIMINGS.clear()
