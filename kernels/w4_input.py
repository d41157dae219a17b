"""The W4 GEMM's activations in one Triton kernel per call: the same tensor as
``w4_pack.gemm_input`` (x's columns in ``gemm_columns`` order, zeros up to a multiple of 64).

    flat = gemm_input(x, p)       # x [M, K] on the GPU -> [M, K'64], contiguous, x's dtype

``w4_pack.gemm_input`` makes it with torch: act-order's gather, padding, then a copy through a
six-dimensional permute whose innermost run is two elements (4 bytes), which torch's copy
kernel moves at a fraction of the memory bandwidth (H100, thirteenth session: a whole W4 call
spent 30-73 us beside its GEMM at M = 2048). Here each program reads a tile of x whole (16-byte
vector loads), permutes it in registers (``tl.permute``; Triton moves it through shared memory)
and writes its tile of the result contiguously: one pass over x. With act-order the tile is
gathered through ``perm`` instead (2-byte loads), then permuted the same way. A first version
gathered every column that way and took 98 us on the 7B down projection's x at M = 2048 (H100,
fifteenth session: three times the bandwidth's time, and slower than torch's copy).

Eager calls use this; under ``torch.compile`` ``w4_ops.w4_mm`` keeps the torch version, which
Inductor fuses into the kernel that produces x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cuda_pack import CHUNK, PreparedCUDA, _round_up

BLOCK_M = 32       # rows per program
BLOCK_C = 128      # GEMM columns per program (two chunks of 64)


@triton.jit
def _input_kernel(x_ptr, perm_ptr, out_ptr, m, k, kp, n_perm, stride_xm,
                  HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = rows[:, None] < m
    if HAS_PERM:        # act-order: the layout's input i is x's column perm[i] (2-byte gathers)
        src = tl.load(perm_ptr + cols, mask=cols < n_perm, other=k)
    else:               # x's columns in order: whole 128-byte lines, 16-byte vector loads
        src = cols
    tile = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + src[None, :],
                   mask=live & (src[None, :] < k), other=0.0)
    # in registers: input 16 t + 4 j + 2 h + l of each chunk of 64 goes to GEMM column
    # 16 j + 8 h + 2 t + l (Triton moves the permute through shared memory)
    tile = tl.reshape(tile, (BLOCK_M, BLOCK_C // 64, 4, 4, 2, 2))
    val = tl.reshape(tl.permute(tile, (0, 1, 3, 4, 2, 5)), (BLOCK_M, BLOCK_C))
    tl.store(out_ptr + rows[:, None].to(tl.int64) * kp + cols[None, :], val,
             mask=live & (cols[None, :] < kp))


def gemm_input(x: torch.Tensor, p: PreparedCUDA) -> torch.Tensor:
    """x [M, K] (rows may be strided) -> [M, K'64] in ``w4_pack.gemm_columns`` order, contiguous."""
    if x.dim() != 2 or x.shape[1] != p.in_features:
        raise ValueError(f"x must be [M, {p.in_features}], got {list(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    kp = _round_up(p.k_rows, CHUNK)
    out = torch.empty((m, kp), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    perm = p.perm if p.perm is not None else out        # unread without act-order
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(kp, BLOCK_C))
    _input_kernel[grid](x, perm, out, m, p.in_features, kp, p.k_rows, x.stride(0),
                        HAS_PERM=p.perm is not None, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    return out
