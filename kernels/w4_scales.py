"""The W4 GEMM's scales and zeros, made from the CUDA decode layout's ``meta`` in one Triton
kernel per call: the same values as ``w4_pack.gemm_scales`` (pure torch, a dozen small kernels:
about 40-75 us per call on an H100, a third of the GEMM at 64 rows), for a few microseconds.

    scales, zeros = gemm_scales(p.meta, p.dtype)     # each [G, N'] in p.dtype, contiguous

Each int32 ``meta`` record of (group, tile, g) holds two values of rows g and g + 8 of the tile:
the zero-point word (two dtype values MAGIC + z, z * ROW_G8_FACTOR for row g + 8) and the scale
word (two fp16), low half first. The GEMM takes scale and -scale * z in the activation dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cuda_pack import MAGIC, ROW_G8_FACTOR

BLOCK = 1024       # records per program


@triton.jit
def _round_bf16(v):
    """float32 -> bf16 rounded to nearest even, by hand: Triton's CPU interpreter truncates
    that conversion, so the CPU test could not check the GPU's values otherwise."""
    bits = v.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _scales_kernel(meta_ptr, scales_ptr, zeros_ptr, records, magic, g8_factor,
                   BF16: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)                  # record (g, tile, row)
    live = i < records
    zw = tl.load(meta_ptr + 2 * i, mask=live, other=0)
    sw = tl.load(meta_ptr + 2 * i + 1, mask=live, other=0)
    dtype = tl.bfloat16 if BF16 else tl.float16
    out = 16 * (i // 8) + i % 8                                          # [G, N'] offset of row g
    for half in tl.static_range(2):                                      # rows g, then g + 8
        s = ((sw >> (16 * half)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z = ((zw >> (16 * half)) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32) - magic
        if half == 1:
            z = z / g8_factor                                            # ROW_G8_FACTOR
        if BF16:                                       # constexpr: one branch is compiled
            s_out, z_out = _round_bf16(s), _round_bf16(-s * z)
        else:
            s_out, z_out = s.to(tl.float16), (-s * z).to(tl.float16)
        tl.store(scales_ptr + out + 8 * half, s_out, mask=live)
        tl.store(zeros_ptr + out + 8 * half, z_out, mask=live)


def gemm_scales(meta: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """meta int32 [G, N'/16, 8, 2] (contiguous) -> (scales, zeros), each [G, N'] in ``dtype``:
    w = scale * code + zeros."""
    g_count, nt = meta.shape[:2]
    scales = torch.empty((g_count, nt * 16), dtype=dtype, device=meta.device)
    zeros = torch.empty_like(scales)
    records = g_count * nt * 8
    _scales_kernel[(triton.cdiv(records, BLOCK),)](
        meta, scales, zeros, records, MAGIC[dtype], ROW_G8_FACTOR[dtype], BF16=dtype == torch.bfloat16,
        BLOCK=BLOCK)
    return scales, zeros
