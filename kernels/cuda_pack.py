"""Repack GPTQ checkpoint tensors, once at load, into the layout of the CUDA decode kernel.

    p = prepare(qweight, scales, qzeros, g_idx, bits=4, dtype=torch.float16)   # PreparedCUDA
    w = dequantize_prepared(p)          # [K', N] float32 in kernel order, for tests

The layout is described in ``kernels/cuda/int4_common.cuh``: per chunk of 64 input rows and tile
of 16 output features (chunk-major, so that blocks working side by side read neighbouring
memory), each of the 32 lanes of a warp reads one 16-byte word holding the codes of its four
m16n8k16 A fragments, with the k order inside each chunk permuted so that each lane's
activations are contiguous. Per group and tile, each row pair (g, g + 8) has an 8-byte record:
the two zero points in the activation dtype offset by the dequantization magic number, and the
two fp16 scales (the kernel applies them per group after the MMAs, in fp32). For fp16 the row
g + 8 zero points carry a factor 16: the kernel reads those codes without shifting them (and
divides their scale by 16).
Act-order checkpoints reuse the Triton path's row permutation (rows sorted by g_idx; the
activations are permuted at run time), so groups are contiguous in kernel order.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .triton_pack import _kernel_order, _round_up, kernel_order_codes

CHUNK = 64                      # input rows per weight word group; K' is padded to it
TILE = 16                       # output features per tile; N is padded to it
MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}   # MAGIC + code is exact in the dtype
ROW_G8_FACTOR = {torch.float16: 16.0, torch.bfloat16: 1.0}   # on rows g + 8's zero points (below)


class PreparedCUDA(NamedTuple):
    """Kernel-ready tensors of one linear layer for one activation dtype."""
    qweight: torch.Tensor           # int32 [K'/64, N'/16, 32, 4]
    meta: torch.Tensor              # int32 [G, N'/16, 8, 2]: per (group, tile, g) the MAGIC +
                                    # zero point pair of rows (g, g + 8) in dtype, and their two
                                    # fp16 scales (bit patterns)
    perm: torch.Tensor | None       # int64 [K'] into x's columns (K = a zero column), or None
    group_size: int                 # kernel rows per group, a multiple of 64
    k_rows: int                     # K' before padding to 64 (perm length, or K)
    in_features: int
    out_features: int
    dtype: torch.dtype


def _lane_positions() -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) inside a 16 x 16 A tile of each lane's nibble: two [32, 8] int64 tensors."""
    lane = torch.arange(32)[:, None]
    nib = torch.arange(8)[None, :]
    g, t = lane // 4, lane % 4
    reg, high = nib % 4, nib // 4
    row = g + 8 * (reg % 2)
    col = 2 * t + 8 * (reg // 2) + high
    return row.expand(32, 8), col.expand(32, 8)


def _chunk_order(device: torch.device | str | None = None) -> torch.Tensor:
    """[4, 16] int64 on ``device``: the physical k (0..63) inside a chunk of logical column kk of
    k-tile j. Logical column 2t + 8h + l of tile j sits at 16t + 4j + 2h + l. Made on the device
    (no host-to-device copy: safe during CUDA graph capture, no stream sync)."""
    j = torch.arange(4, device=device)[:, None]
    kk = torch.arange(16, device=device)[None, :]
    t, h, lo = (kk % 8) // 2, kk // 8, kk % 2
    return 16 * t + 4 * j + 2 * h + lo


def _row_factor(dtype: torch.dtype) -> torch.Tensor:
    """[2]: the factor the kernel's dequantization puts on rows g and g + 8."""
    return torch.tensor([1.0, ROW_G8_FACTOR[dtype]])


def _bits_reason(bits: int) -> str:
    return f"{bits}-bit weights (the CUDA decode kernel is 4-bit only)"


def _group_reason(group_size: int) -> str:
    return f"group size {group_size} is not a multiple of {CHUNK}"


def supports(bits: int, g_idx: torch.Tensor, groups: int) -> str | None:
    """None if the decode kernel can run this layer, else the reason it cannot."""
    if bits != 4:
        return _bits_reason(bits)
    _, group_size, _ = _kernel_order(g_idx, groups)
    if groups > 1 and group_size % CHUNK:
        return _group_reason(group_size)
    return None


def prepare(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
            g_idx: torch.Tensor, bits: int = 4, dtype: torch.dtype = torch.float16,
            *, v1: bool = False) -> PreparedCUDA:
    """Checkpoint tensors (any device) -> PreparedCUDA on the same device."""
    if dtype not in MAGIC:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    refuse = "the CUDA decode kernel cannot run this layer: "
    if bits != 4:
        raise ValueError(refuse + _bits_reason(bits))
    codes, zeros, perm, group_size, k_rows = kernel_order_codes(qweight, qzeros, g_idx, bits,
                                                                groups, v1)
    if groups > 1 and group_size % CHUNK:
        raise ValueError(refuse + _group_reason(group_size))
    kp, np_ = _round_up(k_rows, CHUNK), _round_up(n, TILE)
    if groups == 1:
        group_size = kp
    codes = torch.nn.functional.pad(codes, (0, kp - k_rows, 0, np_ - n))          # [Np, Kp]
    factor = _row_factor(dtype).to(qweight.device)
    zeros = _pairs(torch.nn.functional.pad(zeros.float(), (0, np_ - n)))            # [G,nt,8,2]
    scales = _pairs(torch.nn.functional.pad(scales.half(), (0, np_ - n)))           # [G,nt,8,2]
    zero_pair = (zeros * factor + MAGIC[dtype]).to(dtype).contiguous().view(torch.int32)   # [...,1]
    meta = torch.cat([zero_pair, scales.contiguous().view(torch.int32)], dim=-1)      # [G,nt,8,2]
    prepared = PreparedCUDA(
        qweight=_pack_codes(codes).contiguous(), meta=meta.contiguous(),
        perm=perm, group_size=group_size, k_rows=k_rows, in_features=k, out_features=n,
        dtype=dtype)
    settle(prepared.qweight)
    return prepared


def settle(t: torch.Tensor) -> None:
    """Wait until the writes of a CUDA layout's tensors (``t``'s device, current stream) have
    landed. On sm_90 the kernel is launched as a programmatic dependent and reads its weights
    before it waits for the previous kernel of the stream: the layout must not be written by
    that kernel. Called once per packing (or move), never on the decode path."""
    if t.is_cuda and not torch.cuda.is_current_stream_capturing():
        torch.cuda.current_stream(t.device).synchronize()


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [Np, Kp] -> int32 [Kp/64, Np/16, 32, 4] (the lane words, chunk-major)."""
    np_, kp = codes.shape
    chunks = codes.to(torch.int64).reshape(np_ // TILE, TILE, kp // CHUNK, CHUNK)  # [nt,n,kc,64]
    order = _chunk_order(codes.device)                                              # [4, 16]
    tiles = chunks[..., order].permute(0, 2, 3, 1, 4)                              # [nt,kc,j,n,kk]
    row, col = (p.to(codes.device) for p in _lane_positions())
    nibbles = tiles[:, :, :, row, col]                                             # [nt,kc,j,32,8]
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * 4
    words = (nibbles << shifts).sum(-1)                                            # [nt,kc,j,32]
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.permute(1, 0, 3, 2).to(torch.int32)                               # [kc,nt,32,j]


def _pairs(values: torch.Tensor) -> torch.Tensor:
    """[G, Np] -> [G, Np/16, 8, 2]: per (group, tile, g) the pair (row g, row g + 8)."""
    g_count, np_ = values.shape
    return values.reshape(g_count, np_ // TILE, 2, 8).transpose(2, 3)


def _unpairs(pairs: torch.Tensor) -> torch.Tensor:
    """Inverse of _pairs: [G, Np/16, 8, 2] -> [G, Np]."""
    g_count, nt = pairs.shape[:2]
    return pairs.transpose(2, 3).reshape(g_count, nt * TILE)


def unpack_prepared(p: PreparedCUDA) -> torch.Tensor:
    """The codes, int64 [N', K'64] in kernel row order, read back from the packed layout the
    way the kernel reads it (nibble -> A-fragment position -> permuted k)."""
    kc, nt = p.qweight.shape[:2]
    dev = p.qweight.device
    words = p.qweight.transpose(0, 1).to(torch.int64) & 0xFFFFFFFF                 # [nt,kc,32,4]
    shifts = torch.arange(8, device=dev, dtype=torch.int64) * 4
    nibbles = (words.permute(0, 1, 3, 2)[..., None] >> shifts) & 0xF               # [nt,kc,j,32,8]
    tiles = torch.zeros(nt, kc, 4, TILE, 16, dtype=torch.int64, device=dev)
    row, col = (q.to(dev) for q in _lane_positions())
    tiles[:, :, :, row, col] = nibbles                                             # [nt,kc,j,n,kk]
    chunks = torch.zeros(nt, TILE, kc, CHUNK, dtype=torch.int64, device=dev)
    chunks[..., _chunk_order(dev)] = tiles.permute(0, 3, 1, 2, 4)
    return chunks.reshape(nt * TILE, kc * CHUNK)                                   # [Np, Kp]


def dequantize_prepared(p: PreparedCUDA) -> torch.Tensor:
    """The weight in kernel order, float32 [K', N], read back from the packed layout the way
    the kernel reads it, with its arithmetic: (MAGIC + code) - (MAGIC + zero) exact in the
    dtype, times the fp32 scale."""
    codes = unpack_prepared(p)                                                     # [Np, Kp]
    scales, zeros = scales_and_zeros(p)                                            # [G, Np]
    grp = torch.arange(codes.shape[1], device=codes.device) // p.group_size
    w = (codes.t().float() - zeros[grp]) * scales[grp]                             # [Kp, Np]
    return w[:p.k_rows, :p.out_features]


def scales_and_zeros(p: PreparedCUDA) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout's fp16 scales and zero points, read back from ``meta``: two float32
    [G, N'] tensors (exact). Device ops only (no host copy), so it runs per call and under
    CUDA graph capture."""
    zero_records = p.meta[..., :1].contiguous().view(p.dtype).float() - MAGIC[p.dtype]  # z * f
    zeros = torch.stack((zero_records[..., 0], zero_records[..., 1] / ROW_G8_FACTOR[p.dtype]), dim=-1)
    scales = _unpairs(p.meta[..., 1:].contiguous().view(torch.float16).float())
    return scales, _unpairs(zeros)


def kernel_input(x: torch.Tensor, p: PreparedCUDA) -> torch.Tensor:
    """x [M, K] -> the kernel's activations [M, K'] (permuted, padded to 64, contiguous)."""
    if p.perm is not None:
        if p.perm.numel() > p.in_features:
            x = torch.nn.functional.pad(x, (0, 1))
        x = x.index_select(1, p.perm)
    pad = _round_up(p.k_rows, CHUNK) - x.shape[1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.contiguous()
