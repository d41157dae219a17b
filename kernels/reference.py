"""Reference GPTQ kernels in plain torch: the oracle every fast kernel is tested against,
and the CPU path of ``QuantLinear``.

Layout (the GPTQ checkpoint format; K = in_features, N = out_features, G = groups):
  qweight  int32 [K * bits / 32, N]   codes packed along K, a little-endian bit stream:
                                      code k of column n sits at bits [k*bits, (k+1)*bits)
                                      of the stream qweight[:, n] (3-bit codes straddle words)
  qzeros   int32 [G, N * bits / 32]   zero points packed the same way along N
  scales   float [G, N]               fp16 in checkpoints; any float dtype is accepted here
  g_idx    int32 [K]                  group of each input column, values in [0, G)
  weight   W[k, n] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])

Zero points: ``v1=False`` (the in-memory convention of gptq_lab, ``checkpoint_format:
gptq_v2``) means qzeros hold the true zero points; ``v1=True`` (``checkpoint_format: gptq``)
means they hold zero - 1, wrapped to [0, 2**bits).

Divisibility: K and N must be multiples of 32 // bits (2, 4 and 8 bits) or of 32 (3 bits),
so that every packed int32 word is full.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def values_per_word_multiple(bits: int) -> int:
    """What K and N must be multiples of for ``bits``-bit packing."""
    return 32 if bits == 3 else 32 // bits


def unpack_along_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """int32 [rows * bits / 32, C] bit streams down each column -> int32 codes [rows, C]."""
    pos = torch.arange(rows, device=packed.device, dtype=torch.int64) * bits     # [rows]
    word, offset = pos // 32, (pos % 32)[:, None]                                # [rows], [rows, 1]
    u = packed.to(torch.int64) & 0xFFFFFFFF                                      # [W, C] unsigned
    value = u[word] >> offset                                                    # [rows, C]
    if 32 % bits:                          # 3-bit: codes straddle words (static: traceable)
        straddles = (offset + bits > 32).squeeze(1)
        nxt = u[(word + 1).clamp(max=u.shape[0] - 1)] << (32 - offset)
        value = torch.where(straddles[:, None], value | nxt, value)
    return (value & ((1 << bits) - 1)).to(torch.int32)


def check_gptq_tensors(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       g_idx: torch.Tensor, bits: int) -> tuple[int, int]:
    """Validate dtypes, shapes and divisibility; return (K, N)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use 2, 3, 4 or 8")
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if not scales.is_floating_point():
        raise ValueError(f"scales must be a float tensor (fp16 in checkpoints), got {scales.dtype}")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if (qweight.shape[0] * 32) % bits:
        raise ValueError(f"qweight has {qweight.shape[0]} rows, not a whole number of {bits}-bit "
                         f"codes (rows * 32 must divide by {bits})")
    per = values_per_word_multiple(bits)
    if k % per or n % per:
        raise ValueError(f"in_features={k} and out_features={n} must be multiples of {per} for "
                         f"{bits}-bit packing")
    g = scales.shape[0]
    if scales.shape != (g, n) or qzeros.shape != (g, n * bits // 32) or g_idx.shape != (k,):
        raise ValueError(
            f"shapes disagree for K={k}, N={n}, bits={bits}: expected scales [G, {n}], qzeros "
            f"[G, {n * bits // 32}], g_idx [{k}]; got scales {list(scales.shape)}, qzeros "
            f"{list(qzeros.shape)}, g_idx {list(g_idx.shape)}")
    return k, n


def dequantize_gptq(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                    g_idx: torch.Tensor, bits: int, *, v1: bool = False) -> torch.Tensor:
    """Packed GPTQ tensors (layout above) -> weight float32 [K, N] (input-major, ``x @ W``)."""
    check_gptq_tensors(qweight, scales, qzeros, g_idx, bits)
    check_g_idx(g_idx, scales.shape[0])
    return dequantize_unchecked(qweight, scales, qzeros, g_idx, bits, v1=v1)


def check_g_idx(g_idx: torch.Tensor, groups: int) -> None:
    """g_idx values must index the ``groups`` rows of scales/qzeros."""
    g = g_idx.long()
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
        raise ValueError(f"g_idx values must lie in [0, {groups}), got [{int(g.min())}, {int(g.max())}]")


def dequantize_unchecked(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                         g_idx: torch.Tensor, bits: int, *, v1: bool = False) -> torch.Tensor:
    """``dequantize_gptq`` without its checks and without data-dependent branches, so it traces
    under torch.compile; for tensors already checked (``QuantLinear.prepare``)."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    codes = unpack_along_rows(qweight, bits, k)                                  # [K, N]
    zeros = unpack_along_rows(qzeros.t(), bits, n).t()                           # [G, N]
    if v1:
        zeros = (zeros + 1) & ((1 << bits) - 1)
    g = g_idx.long()
    return scales.float()[g] * (codes - zeros[g]).float()                        # [K, N]


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """``x @ W`` without bias.

    x: [M, K] float32, float16 or bfloat16 (any device torch supports).
    qweight, scales, qzeros (true zero points, v2), g_idx: the layout above, same device as x.
    Returns [M, N] in x's dtype. W is dequantized in float32, cast to x's dtype, and
    multiplied by torch.matmul (so fp16/bf16 inputs see fp16/bf16 matmul rounding).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {list(x.shape)}; flatten leading dims")
    if not x.is_floating_point():
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    w = dequantize_gptq(qweight, scales, qzeros, g_idx, bits)                    # [K, N] fp32
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features but the weight has in_features={w.shape[0]}")
    return x @ w.to(x.dtype)                                                     # [M, N]
