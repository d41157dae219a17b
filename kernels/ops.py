"""Torch custom ops around the Triton kernels, so that models using them work under
``torch.compile(fullgraph=True)`` and CUDA graphs (the ops are opaque, with fake impls).

    p = triton_pack.prepare(qweight, scales, qzeros, g_idx, bits)       # once, at load
    y = gptq_mm(x, p)                           # torch.ops.gptq_lab.triton_gptq_mm
    y = gptq_matmul(x, qweight, scales, qzeros, g_idx, bits)           # checkpoint tensors

``gptq_mm`` is the fast path: the layer keeps a PreparedGPTQ. ``gptq_matmul`` has
``reference.gptq_matmul``'s signature for the backend dict; it prepares each layer on first
use and caches the result while the ``qweight`` tensor object lives and is unmodified (a new
tensor object, as torch.compile may pass, is prepared again: use ``gptq_mm`` there).
Tuning happens on the first eager call per batch-size bucket; warm up before CUDA-graph capture.
Importing this module registers the ops and touches neither CUDA nor Triton.
"""
from __future__ import annotations

import weakref

import torch

from .triton_pack import PreparedGPTQ, prepare


@torch.library.custom_op("gptq_lab::triton_gptq_mm", mutates_args=())
def triton_gptq_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, perm: torch.Tensor | None, bits: int, group_size: int,
                   zero: int, in_features: int, out_features: int) -> torch.Tensor:
    """x [M, K] fp16/bf16 @ the PreparedGPTQ given field by field -> [M, N] in x's dtype."""
    from .triton_gemm import matmul
    p = PreparedGPTQ(qweight, scales, zeros, perm, bits, group_size, zero, in_features,
                     out_features)
    return matmul(x, p)


@triton_gptq_mm.register_fake
def _(x, qweight, scales, zeros, perm, bits, group_size, zero, in_features, out_features):
    return x.new_empty((x.shape[0], out_features))


def gptq_mm(x: torch.Tensor, p: PreparedGPTQ) -> torch.Tensor:
    """x [..., K] fp16/bf16 on CUDA -> [..., N]: the compiled-graph-friendly entry point."""
    flat = x.reshape(-1, p.in_features)
    out = torch.ops.gptq_lab.triton_gptq_mm(flat, p.qweight, p.scales, p.zeros, p.perm, p.bits,
                                            p.group_size, p.zero, p.in_features, p.out_features)
    return out.reshape(*x.shape[:-1], p.out_features)


_PREPARED: dict[tuple, tuple[weakref.ref, PreparedGPTQ]] = {}


def _key(*tensors: torch.Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device) for t in tensors)


def prepared_for(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                 g_idx: torch.Tensor, bits: int) -> PreparedGPTQ:
    """prepare(...) cached while this ``qweight`` object lives and all four are unmodified."""
    key = _key(qweight, scales, qzeros, g_idx) + (bits,)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0]() is qweight:
        return hit[1]
    p = prepare(qweight, scales, qzeros, g_idx, bits)
    _PREPARED[key] = (weakref.ref(qweight), p)
    weakref.finalize(qweight, _PREPARED.pop, key, None)
    return p


@torch.library.custom_op("gptq_lab::triton_gptq_matmul", mutates_args=())
def triton_gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       qzeros: torch.Tensor, g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """The checkpoint-format op: x [M, K] @ W -> [M, N] (qzeros hold true zero points)."""
    from .triton_gemm import matmul
    return matmul(x, prepared_for(qweight, scales, qzeros, g_idx, bits))


@triton_gptq_matmul.register_fake
def _(x, qweight, scales, qzeros, g_idx, bits):
    return x.new_empty((x.shape[0], qweight.shape[1]))


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """``reference.gptq_matmul``'s signature on the Triton kernels (fp16/bf16 x, bits 2/4/8)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {list(x.shape)}; flatten leading dims")
    return torch.ops.gptq_lab.triton_gptq_matmul(x, qweight, scales, qzeros, g_idx, bits)


def supports(x: torch.Tensor, bits: int) -> bool:
    """Whether the Triton backend can take this call (else use the reference)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and bits in (2, 4, 8)
