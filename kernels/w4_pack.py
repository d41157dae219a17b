"""What the CUTLASS W4A16 GEMM (``kernels/cuda/w4_gemm.cuh``) needs beside the CUDA decode
kernel's layout (``cuda_pack.PreparedCUDA``), which it reads as it is: no second copy of the
weights.

That layout stores, per tile of 16 outputs and chunk of 64 inputs, each lane's four A fragments
as one 16-byte word: exactly CUTLASS's reordered layout for a mixed-input wgmma (its memory
reordering atom repeated four times along K with the value order [0, 2, 4, 6, 1, 3, 5, 7];
``tests/test_w4_gemm.py`` checks the formula against CUTLASS). Two things differ from a plain
GEMM and are made here, per call, from the layer's own tensors:

- the K order: inside each chunk the layout keeps logical column ``16 j + 2 t + 8 h + l`` at
  physical input ``16 t + 4 j + 2 h + l`` (``cuda_pack._chunk_order``), so the GEMM's x is x's
  columns in that order (``gemm_columns``, composed with act-order's permutation; ``gemm_input``
  makes it as the decode kernel's input followed by one permuting copy);
- scales and zeros as [G, N'] tensors in the activation dtype (``gemm_scales``), read from the
  layout's ``meta`` records; the GEMM computes w = scale * code + zeros with zeros = -scale *
  zero point. On the GPU ``w4_scales.gemm_scales`` makes the same in one Triton kernel.
"""
from __future__ import annotations

import torch

from .cuda_pack import (
    CHUNK,
    PreparedCUDA,
    _chunk_order,
    _round_up,
    kernel_input,
    scales_and_zeros,
    unpack_prepared,
)


def gemm_columns(p: PreparedCUDA) -> torch.Tensor:
    """int64 [K'64]: the input column each GEMM column reads (``p.in_features``: a zero
    column, for act-order's padded groups and the padding of K to 64): the order ``gemm_input``
    produces, for tests."""
    kp = _round_up(p.k_rows, CHUNK)
    dev = p.meta.device
    source = p.perm if p.perm is not None else torch.arange(p.k_rows, device=dev)
    source = torch.nn.functional.pad(source, (0, kp - p.k_rows), value=p.in_features)
    chunk = _chunk_order(dev).reshape(-1)                                      # [64]
    logical = (torch.arange(kp // CHUNK, device=dev)[:, None] * CHUNK + chunk).reshape(-1)
    return source[logical]


def gemm_input(x: torch.Tensor, p: PreparedCUDA) -> torch.Tensor:
    """x [M, K] -> the GEMM's activations [M, K'64] in ``gemm_columns`` order, contiguous: the
    decode kernel's input (act-order's gather, zeros up to a multiple of 64; ``kernel_input``),
    then one permuting copy, the same inside every chunk of 64 (coalesced, no index reads)."""
    x = kernel_input(x, p)
    m, kp = x.shape
    # physical column 16 t + 4 j + 2 h + l of a chunk -> logical 16 j + 8 h + 2 t + l
    return x.reshape(m, kp // CHUNK, 4, 4, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(m, kp)


def gemm_scales(p: PreparedCUDA) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros), each [G, N'] in p.dtype, contiguous: w = scale * code + zeros."""
    scales, zeros = scales_and_zeros(p)
    return (scales.to(p.dtype).contiguous(), (-scales * zeros).to(p.dtype).contiguous())


def dequantize_for_gemm(p: PreparedCUDA) -> torch.Tensor:
    """The weight the GEMM multiplies, float32 [K'64, N'] in GEMM column order, with its
    arithmetic (scale * code + zeros in the dtype's scales and zeros): for tests."""
    codes = unpack_prepared(p).t().float()                                      # [K', N']
    scales, zeros = (t.float() for t in gemm_scales(p))
    grp = torch.arange(codes.shape[0], device=codes.device) // p.group_size
    kp = codes.shape[0]
    logical = (torch.arange(kp // CHUNK, device=codes.device)[:, None] * CHUNK
               + _chunk_order(codes.device).reshape(-1)).reshape(-1)
    return (codes * scales[grp] + zeros[grp])[logical]
