"""Repack GPTQ checkpoint tensors, once at load, into the layout of the CUTLASS W4A16 GEMM
(``kernels/cuda/w4_gemm.cuh``, the large-batch path on Hopper).

    p = prepare(qweight, scales, qzeros, g_idx, bits=4, dtype=torch.float16)   # PreparedW4
    w = dequantize_prepared(p)          # [K', N] float32 in kernel order, for tests

The GEMM runs swapped (the weights are wgmma's register operand), so W is stored K-major,
[N, K'], 4 bits a code, two codes a byte (the even offset in the low nibble), in CUTLASS's
shuffled order: in each 16 x 16 block of (n, k) the eight codes one thread converts together sit
next to each other, in the value order [0, 2, 4, 6, 1, 3, 5, 7]. Blocks follow each other along N
first, then along K (``shuffle_offsets``; the formula is checked against CUTLASS's own layout
by ``tests/test_w4_gemm.py`` wherever nvcc and the CUTLASS headers are present).

Symmetric layers (every zero point 8) store ``code - 8`` as a signed nibble and run the
scale-only GEMM, w = scale * q; other layers store the code and ``-scale * zero``, and run
w = scale * code + zeros. Scales (and zeros) are [G, N] in the activation dtype. Act-order
checkpoints reuse the other kernels' row permutation (rows sorted by g_idx, activations permuted
at run time), so groups are contiguous in kernel order.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .cuda_pack import kernel_input  # noqa: F401  (same activations: permuted, K padded to 64)
from .triton_pack import _round_up, kernel_order_codes

TILE_K = 64                 # the GEMM's K tile: K' is padded to it, the group size a multiple
ATOM = 16                   # the shuffle block is 16 x 16; N must be a multiple of it
DTYPES = (torch.float16, torch.bfloat16)


class PreparedW4(NamedTuple):
    """GEMM-ready tensors of one linear layer for one activation dtype."""
    w: torch.Tensor                 # uint8 [N * K' / 2]: shuffled codes, two a byte
    scales: torch.Tensor            # [G, N] in dtype
    zeros: torch.Tensor | None      # [G, N] in dtype: -scale * zero; None: symmetric
    perm: torch.Tensor | None       # int64 [K'] into x's columns (K = a zero column), or None
    group_size: int                 # kernel rows per group (K' for per-channel)
    k_rows: int                     # K' before padding to 64 (perm length, or K)
    in_features: int
    out_features: int
    dtype: torch.dtype


def supports(bits: int, group_size: int, groups: int, out_features: int) -> str | None:
    """None if the GEMM can run this layer (group size in kernel rows), else why not."""
    if bits != 4:
        return f"{bits}-bit weights (the W4 GEMM is 4-bit only)"
    if out_features % ATOM:
        return f"out_features={out_features} is not a multiple of {ATOM}"
    if groups > 1 and group_size % TILE_K:
        return f"group size {group_size} is not a multiple of {TILE_K}"
    return None


def shuffle_offsets(n: int, k: int, device=None) -> torch.Tensor:
    """int64 [n, k]: the element offset of code (row n, column k) in the shuffled layout
    (n a multiple of 16, k of 16). Within a block: n = n0 + 8 n1, k = k0 + 2 k1 + 8 k2 ->
    32 n0 + n1 + 4 k0 + 8 k1 + 2 k2 (thread 4 n0 + k1's eight values); blocks N-first."""
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(k, device=device)[None, :]
    inner_n = 32 * (rows % 8) + (rows // 8) % 2
    inner_k = 4 * (cols % 2) + 8 * ((cols // 2) % 4) + 2 * ((cols // 8) % 2)
    return inner_n + inner_k + 256 * (rows // ATOM) + 16 * n * (cols // ATOM)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K'] (0..15, N and K' multiples of 16) -> uint8 [N * K' / 2], shuffled."""
    n, k = codes.shape
    flat = torch.empty(n * k, dtype=torch.uint8, device=codes.device)
    flat[shuffle_offsets(n, k, codes.device).reshape(-1)] = codes.reshape(-1).to(torch.uint8)
    pairs = flat.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_codes(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [N * K' / 2] -> codes [N, K'] int64."""
    flat = torch.stack([w & 0xF, w >> 4], dim=1).reshape(-1).to(torch.int64)
    return flat[shuffle_offsets(n, k, w.device).reshape(-1)].reshape(n, k)


def prepare(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
            g_idx: torch.Tensor, bits: int = 4, dtype: torch.dtype = torch.float16,
            *, v1: bool = False) -> PreparedW4:
    """Checkpoint tensors (any device) -> PreparedW4 on the same device; ValueError for a
    layer the GEMM cannot run (``supports`` says why)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    if bits != 4:
        raise ValueError("the W4 GEMM cannot run this layer: " + supports(bits, 64, groups, n))
    codes, zeros, perm, group_size, k_rows = kernel_order_codes(qweight, qzeros, g_idx, bits,
                                                                groups, v1)
    why = supports(bits, group_size, groups, n)
    if why:
        raise ValueError("the W4 GEMM cannot run this layer: " + why)
    kp = _round_up(k_rows, TILE_K)
    if groups == 1:
        group_size = kp
    codes = torch.nn.functional.pad(codes, (0, kp - k_rows))                       # [N, K']
    symmetric = bool((zeros == 8).all())
    if symmetric:
        codes = codes ^ 8                       # code - 8 as a two's-complement nibble
    scale_t = scales.float()
    zero_t = None if symmetric else (-scale_t * zeros.float()).to(dtype).contiguous()
    return PreparedW4(w=pack_codes(codes), scales=scale_t.to(dtype).contiguous(), zeros=zero_t,
                      perm=perm, group_size=group_size, k_rows=k_rows, in_features=k,
                      out_features=n, dtype=dtype)


def dequantize_prepared(p: PreparedW4) -> torch.Tensor:
    """The weight in kernel order, float32 [K', N], read back from the packed layout with the
    GEMM's arithmetic (scale * q, or scale * code + zeros, in the dtype's scales)."""
    n, kp = p.out_features, p.w.numel() * 2 // p.out_features
    codes = unpack_codes(p.w, n, kp).t().float()                                   # [K', N]
    grp = torch.arange(kp, device=p.w.device) // p.group_size
    scales = p.scales.float()[grp]
    if p.zeros is None:
        w = (codes - 16 * (codes >= 8)) * scales
    else:
        w = codes * scales + p.zeros.float()[grp]
    return w[:p.k_rows]
