"""Repack GPTQ checkpoint tensors, once at load, into the layout the Triton kernels read.

    p = prepare(qweight, scales, qzeros, g_idx, bits)        # PreparedGPTQ, on qweight's device
    w = dequantize_prepared(p)                               # [K', N] float32, for tests

Checkpoint layout in (see ``gptq_lab.kernels.reference``; K = in_features, N = out_features):
  qweight int32 [K*bits/32, N], scales float [G, N], qzeros int32 [G, N*bits/32] (true zero
  points unless ``v1=True``), g_idx int32 [K].

Kernel layout out (P = 32 // bits codes per int32 word, R = bits words per 32-code block):
  qweight int32 [Np, Kp // P]   K-major: row n holds the codes of output column n. Within each
                                block of 32 consecutive k, word r (0 <= r < R) holds code j
                                (bits [j*bits, (j+1)*bits)) of k = 32*block + j*R + r, so
                                unpacking code j of every word gives R-long contiguous k runs.
  scales  [G, Np]               the checkpoint's dtype (fp16), columns padded with zeros
  zeros   fp16 [G, Np]          true zero points, or an empty tensor when every zero point
                                equals the single value ``zero`` (symmetric quantization)
  perm    int64 [K'] or None    kernel row i reads x[:, perm[i]]; index K means "a zero column".
                                None when g_idx is already sorted (no act-order).
Rows are grouped uniformly in kernel order: row i belongs to group i // group_size. Act-order
checkpoints are sorted by g_idx; irregular groups are padded to a multiple of 32 rows.
Np = N and Kp = K' rounded up to 256 (the largest tile), so weight loads need no masks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .reference import unpack_along_rows

SUPPORTED_BITS = (2, 4, 8)
BLOCK = 32          # codes per interleave block; every kernel tile is a multiple of it
PAD = 256           # N and K are padded to this, the largest tile the kernels use


class PreparedGPTQ(NamedTuple):
    """Kernel-ready tensors of one linear layer (layout in the module docstring)."""
    qweight: torch.Tensor           # int32 [Np, Kp // (32 // bits)]
    scales: torch.Tensor            # [G, Np]
    zeros: torch.Tensor             # fp16 [G, Np], or empty when ``zero`` >= 0
    perm: torch.Tensor | None       # int64 [K'] into x's columns (K = zero column), or None
    bits: int
    group_size: int                 # kernel rows per group (K' for per-channel)
    zero: int                       # the uniform zero point, or -1 when ``zeros`` is used
    in_features: int                # K, the width of x
    out_features: int               # N


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _kernel_order(g_idx: torch.Tensor, groups: int) -> tuple[torch.Tensor | None, int, int]:
    """-> (perm or None, group_size in kernel rows, K'). See the module docstring."""
    k = g_idx.numel()
    g = g_idx.long()
    counts = torch.bincount(g, minlength=groups)                                  # [G]
    size = int(counts.max())
    uniform = groups == 1 or (bool((counts[:-1] == size).all()) and size % BLOCK == 0)
    is_sorted = bool((g[1:] >= g[:-1]).all()) if k > 1 else True
    if uniform:
        perm = None if is_sorted else torch.argsort(g, stable=True)
        return perm, (k if groups == 1 else size), k
    size = _round_up(size, BLOCK)                                                 # padded groups
    order = torch.argsort(g, stable=True)                                         # [K]
    g_sorted = g[order]
    starts = torch.cumsum(counts, 0) - counts                                     # [G]
    dest = g_sorted * size + (torch.arange(k, device=g.device) - starts[g_sorted])
    perm = torch.full((groups * size,), k, dtype=torch.long, device=g.device)
    perm[dest] = order
    return perm, size, groups * size


def kernel_order_codes(qweight: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor,
                       bits: int, groups: int, v1: bool = False):
    """Checkpoint tensors -> (codes [N, K'] in kernel order, zero points [G, N], perm,
    group_size, K'): the unpacking every kernel layout starts from."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    codes = unpack_along_rows(qweight, bits, k).t()                               # [N, K] int32
    zeros = unpack_along_rows(qzeros.t(), bits, n).t()                            # [G, N] int32
    if v1:
        zeros = (zeros + 1) & ((1 << bits) - 1)
    perm, group_size, k_rows = _kernel_order(g_idx.to(qweight.device), groups)
    if perm is not None:
        codes = torch.nn.functional.pad(codes, (0, 1))[:, perm]                   # [N, K']
    return codes, zeros, perm, group_size, k_rows


def pack_kernel_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [Np, Kp] (Kp a multiple of 32) -> int32 [Np, Kp // P] in the interleaved layout."""
    n, kp = codes.shape
    p, r = 32 // bits, bits
    v = codes.to(torch.int64).reshape(n, kp // BLOCK, p, r)                       # k = 32b + jR + r
    shifts = (torch.arange(p, device=codes.device, dtype=torch.int64) * bits)[None, None, :, None]
    words = (v << shifts).sum(dim=2)                                              # [Np, Kp/32, R]
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(n, kp // p).to(torch.int32)


def unpack_kernel_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``pack_kernel_codes``: int32 [Np, Kp // P] -> codes [Np, Kp] (int64)."""
    np_, words = qweight.shape
    per, r = 32 // bits, bits
    w = (qweight.to(torch.int64) & 0xFFFFFFFF).reshape(np_, words // r, 1, r)
    shifts = (torch.arange(per, device=w.device) * bits)[None, None, :, None]
    return ((w >> shifts) & ((1 << bits) - 1)).reshape(np_, -1)


def prepare(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor,
            bits: int, *, v1: bool = False) -> PreparedGPTQ:
    """Checkpoint tensors (layout above, any device) -> PreparedGPTQ on the same device.

    Runs once per layer at load; the checkpoint tensors are not modified. ``v1=True`` reads
    qzeros stored as zero - 1 (``checkpoint_format: gptq``).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported by the Triton kernels; use 2, 4 or 8 "
                         f"(or backend='reference')")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    if (scales.shape != (groups, n) or g_idx.shape != (k,)
            or qzeros.shape != (groups, n * bits // 32)):
        raise ValueError(f"shapes disagree for K={k}, N={n}, bits={bits}: scales "
                         f"{list(scales.shape)}, qzeros {list(qzeros.shape)}, g_idx "
                         f"{list(g_idx.shape)}; expected [G, {n}], [G, {n * bits // 32}], [{k}]")
    if k == 0 or n == 0:
        raise ValueError(f"empty layer: in_features={k}, out_features={n}")
    codes, zeros, perm, group_size, k_rows = kernel_order_codes(qweight, qzeros, g_idx, bits,
                                                                groups, v1)
    np_, kp = _round_up(n, PAD), _round_up(k_rows, PAD)
    codes = torch.nn.functional.pad(codes, (0, kp - k_rows, 0, np_ - n))          # [Np, Kp]
    uniform_zero = int(zeros.flatten()[0]) if bool((zeros == zeros.flatten()[0]).all()) else -1
    if uniform_zero >= 0:
        zeros_k = torch.empty(0, dtype=torch.float16, device=qweight.device)
    else:
        zeros_k = torch.nn.functional.pad(zeros, (0, np_ - n)).to(torch.float16).contiguous()
    return PreparedGPTQ(
        qweight=pack_kernel_codes(codes, bits).contiguous(),
        scales=torch.nn.functional.pad(scales, (0, np_ - n)).contiguous(),
        zeros=zeros_k, perm=perm, bits=bits, group_size=group_size, zero=uniform_zero,
        in_features=k, out_features=n)


def permute_input(x: torch.Tensor, p: PreparedGPTQ) -> torch.Tensor:
    """x [M, K] -> the kernel-ordered activations [M, K'] (x itself when there is no perm)."""
    if p.perm is None:
        return x
    if p.perm.numel() > p.in_features:                                             # padded groups
        x = torch.nn.functional.pad(x, (0, 1))
    return x.index_select(1, p.perm)


def dequantize_prepared(p: PreparedGPTQ) -> torch.Tensor:
    """The weight in kernel order, float32 [K', N]: x_kernel @ W equals x @ W_checkpoint."""
    codes = unpack_kernel_codes(p.qweight, p.bits)                                # [Np, Kp]
    k_rows = p.perm.numel() if p.perm is not None else p.in_features
    g = torch.arange(k_rows, device=codes.device) // p.group_size                 # [K']
    zeros = (p.zeros.float() if p.zero < 0
             else torch.full_like(p.scales, p.zero, dtype=torch.float32))
    deq = p.scales.float()[g] * (codes[:, :k_rows].t().float() - zeros[g])        # [K', Np]
    return deq[:, :p.out_features]
