"""Pure quantization math: grids, quantize/dequantize, RTN, and bit packing.

Conventions (shared by the solver, QuantLinear and the checkpoint format):
  weight  [N, K] float   N = out_features, K = in_features
  codes   [N, K] uint8   integers in [0, 2**bits - 1]
  scales  [N, G] float   G = number of groups along K
  zeros   [N, G] int     the true zero point (code that represents 0.0)
  g_idx   [K]    int32   group of each input column
  dequantized weight = scales[:, g_idx] * (codes - zeros[:, g_idx])

Packing is the GPTQ format's: values are laid out as a little-endian bit stream,
32 values per ``bits`` int32 words, so 3-bit values straddle word boundaries the
way AutoGPTQ/GPTQModel/vLLM expect.
"""
from __future__ import annotations

import math

import torch

from .errors import ConfigError


def maxq(bits: int) -> int:
    return (1 << bits) - 1


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx [K] int32 for contiguous groups (the last one may be shorter)."""
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // g


def compute_qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max grid for ``w`` [N, k] -> (scale [N], zero [N]).

    The grid always contains 0 (as in the reference GPTQ code). Symmetric grids
    put the zero point at (maxq + 1) / 2, the format's convention.
    """
    q = maxq(bits)
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    degenerate = (xmin == 0) & (xmax == 0)
    xmin = torch.where(degenerate, torch.full_like(xmin, -1), xmin)
    xmax = torch.where(degenerate, torch.full_like(xmax, 1), xmax)
    scale = (xmax - xmin) / q
    if sym:
        zero = torch.full_like(scale, (q + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for ``w`` on the grid (scale, zero); any shapes that broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq(bits))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor) -> torch.Tensor:
    """codes [N, K], scales/zeros [N, G], g_idx [K] -> weight [N, K] in scales' dtype."""
    g = g_idx.long()
    return scales[:, g] * (codes.to(scales.dtype) - zeros[:, g].to(scales.dtype))


def rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Round-to-nearest baseline -> (codes [N,K] uint8, scales [N,G], zeros [N,G], g_idx [K])."""
    n, k = weight.shape
    w = weight.float()
    g_idx = group_index(k, group_size)
    size = k if group_size == -1 else group_size
    scales, zeros, codes = [], [], torch.empty(n, k, dtype=torch.uint8, device=w.device)
    for start in range(0, k, size):
        cols = w[:, start:start + size]
        scale, zero = compute_qparams(cols, bits, sym)
        codes[:, start:start + size] = quantize(cols, scale[:, None], zero[:, None], bits).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1).to(torch.int32), g_idx


# ---------------------------------------------------------------- packing

def values_per_run(bits: int) -> int:
    """Values in the shortest run of whole int32 words: 32 for 3-bit (3 words), 32 // bits else."""
    return 32 if bits == 3 else 32 // bits


def packed_length(length: int, bits: int) -> int:
    """int32 words holding ``length`` values of ``bits`` bits (length must be a multiple of 32
    for 3-bit, of 32 // bits otherwise). ConfigError for other bits or lengths."""
    if isinstance(bits, bool) or bits not in (2, 3, 4, 8):
        raise ConfigError(f"bits={bits!r} cannot be packed; the GPTQ format packs 2, 3, 4 or 8 bits")
    per = values_per_run(bits)
    if length % per:
        raise ConfigError(f"{length} values of {bits} bits do not fill whole int32 words; "
                          f"the length must be a multiple of {per}")
    return length * bits // 32


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values [R, L] ints in [0, 2**bits) -> int32 [R, L * bits / 32], bit stream along L.

    Runs on the values' device in whole-tensor ops (a loop over the at most 3 words of a run,
    none over rows); int64 temporaries of about 2 x 8 bytes per value."""
    _check_matrix(values, "values")
    r, length = values.shape
    words_n = packed_length(length, bits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ConfigError(f"values to pack must be integer codes, got {values.dtype}; round and cast first")
    if values.numel() == 0:
        return torch.zeros(r, words_n, dtype=torch.int32, device=values.device)
    low, high = (int(x) for x in torch.aminmax(values))
    if low < 0 or high > maxq(bits):
        raise ConfigError(f"values to pack must lie in [0, {maxq(bits)}] for bits={bits}, found [{low}, {high}]")
    per = values_per_run(bits)
    start = [bits * i for i in range(per)]                  # first bit of each value in its run
    v = values.to(torch.int64).reshape(r, length // per, per)                      # [R, C, per]
    shift = torch.tensor([b % 32 for b in start], device=values.device)
    lows = (v << shift) & 0xFFFFFFFF                        # each value's bits in its first word
    run = per * bits // 32                                   # words per run
    cut = [-(-32 * w // bits) for w in range(run + 1)]      # values [cut[w], cut[w+1]) start in word w
    words = torch.stack([lows[:, :, cut[w]:cut[w + 1]].sum(-1) for w in range(run)], -1)  # [R, C, run]
    for i in range(per):                                    # 3-bit: 2 values straddle two words
        if start[i] % 32 + bits > 32:
            words[:, :, start[i] // 32 + 1] += v[:, :, i] >> (32 - start[i] % 32)
    words = words.reshape(r, words_n)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [R, length * bits / 32] -> int32 [R, length]."""
    _check_matrix(words, "words")
    if words.dtype != torch.int32:
        raise ConfigError(f"packed words must be int32, got {words.dtype}")
    r = words.shape[0]
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ConfigError(f"length={length!r} must be a non-negative int (values per row)")
    if words.shape[1] != packed_length(length, bits):
        raise ConfigError(f"expected {packed_length(length, bits)} words per row for {length} "
                          f"{bits}-bit values, got {words.shape[1]}")
    u = words.to(torch.int64) & 0xFFFFFFFF
    mask = maxq(bits)
    if words.numel() == 0:
        return torch.zeros(r, length, dtype=torch.int32)
    if length % 32:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        return ((u[:, :, None] >> shifts) & mask).reshape(r, length).to(torch.int32)
    u = u.reshape(r, -1, bits)
    out = torch.empty(r, u.shape[1], 32, dtype=torch.int64)
    for k in range(32):
        pos = bits * k
        w, off = divmod(pos, 32)
        val = u[:, :, w] >> off
        if off + bits > 32:
            val = val | (u[:, :, w + 1] << (32 - off))
        out[:, :, k] = val & mask
    return out.reshape(r, length).to(torch.int32)


def _check_matrix(t, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ConfigError(f"{what} must be a 2-D tensor [rows, length], got "
                          f"{type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))}")


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] -> qweight int32 [K * bits / 32, N] (packed along the input dim)."""
    return pack_rows(codes, bits).t().contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [K * bits / 32, N] -> codes int32 [N, K]."""
    return unpack_rows(qweight.t(), bits, in_features)


def pack_qzeros(zeros: torch.Tensor, bits: int, v1: bool = True) -> torch.Tensor:
    """zeros [N, G] (true zero points) -> qzeros int32 [G, N * bits / 32].

    v1 (``checkpoint_format: gptq``) stores each zero point minus one, wrapping
    -1 to 2**bits - 1 as the classic packer does; v2 stores the true value.
    """
    z = zeros.t().to(torch.int64)
    if v1:
        z = (z - 1) & maxq(bits)
    return pack_rows(z, bits)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, v1: bool = True) -> torch.Tensor:
    """qzeros int32 [G, N * bits / 32] -> true zero points int32 [N, G]."""
    z = unpack_rows(qzeros, bits, out_features)
    if v1:
        z = (z + 1) & maxq(bits)
    return z.t().contiguous()


def bits_per_weight(bits: int, group_size: int, in_features: int) -> float:
    """Storage per weight including fp16 scales and packed zeros."""
    groups = math.ceil(in_features / (in_features if group_size == -1 else group_size))
    return bits + groups * (16 + bits) / in_features
