"""Torch custom ops around the Triton kernels, so that models using them work under
``torch.compile(fullgraph=True)`` and CUDA graphs (the ops are opaque, with fake impls).

    p = triton_pack.prepare(qweight, scales, qzeros, g_idx, bits)       # once, at load
    y = gptq_mm(x, p)                           # torch.ops.gptq_lab.triton_gptq_mm
    y = gptq_matmul(x, qweight, scales, qzeros, g_idx, bits)           # checkpoint tensors
    y = dequant_mm(x, p)             # large M: W dequantized into a shared buffer, then cuBLAS

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

from .triton_pack import PreparedGPTQ, permute_input, prepare


def direct_call(x: torch.Tensor) -> bool:
    """Whether a kernel may be called directly instead of through its custom op: in eager code
    without autograd on x. The op's Python dispatch costs tens of microseconds of host time per
    call (about 60 us under the profiler on the 7B shape), more than the batch-1 kernel itself;
    torch.compile must still see the op (it is opaque there, with a fake implementation)."""
    return not torch.compiler.is_compiling() and not (x.requires_grad and torch.is_grad_enabled())


def run_op(op, impl, x: torch.Tensor, *args):
    """``op(x, *args)`` through torch's dispatcher where it must be seen (torch.compile,
    autograd), else ``impl(x, *args)``, the op's own implementation, called directly
    (``direct_call``). Every custom op of gptq_lab.kernels is called this way."""
    return (impl if direct_call(x) else op)(x, *args)


def _triton_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor, perm: torch.Tensor | None, bits: int, group_size: int,
               zero: int, in_features: int, out_features: int) -> torch.Tensor:
    """x [M, K] fp16/bf16 @ the PreparedGPTQ given field by field -> [M, N] in x's dtype."""
    from .triton_gemm import matmul
    p = PreparedGPTQ(qweight, scales, zeros, perm, bits, group_size, zero, in_features,
                     out_features)
    return matmul(x, p)


triton_gptq_mm = torch.library.custom_op("gptq_lab::triton_gptq_mm", _triton_mm, mutates_args=())


@triton_gptq_mm.register_fake
def _(x, qweight, scales, zeros, perm, bits, group_size, zero, in_features, out_features):
    return x.new_empty((x.shape[0], out_features))


def gptq_mm(x: torch.Tensor, p: PreparedGPTQ) -> torch.Tensor:
    """x [..., K] fp16/bf16 on CUDA -> [..., N]: the compiled-graph-friendly entry point."""
    flat = x.reshape(-1, p.in_features)
    out = run_op(torch.ops.gptq_lab.triton_gptq_mm, _triton_mm, flat, p.qweight, p.scales,
                 p.zeros, p.perm, p.bits, p.group_size, p.zero, p.in_features, p.out_features)
    return out.reshape(*x.shape[:-1], p.out_features)


_PREPARED: dict[tuple, tuple[weakref.ref, PreparedGPTQ]] = {}


def _key(*tensors: torch.Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device) for t in tensors)


def cached_layout(cache: dict, make, qweight: torch.Tensor, scales: torch.Tensor,
                  qzeros: torch.Tensor, g_idx: torch.Tensor, *extra):
    """``make(qweight, scales, qzeros, g_idx, *extra)``, kept in ``cache`` while this ``qweight``
    object lives and all four tensors are unmodified (the repacking runs once per layer)."""
    key = _key(qweight, scales, qzeros, g_idx) + extra
    hit = cache.get(key)
    if hit is not None and hit[0]() is qweight:
        return hit[1]
    value = make(qweight, scales, qzeros, g_idx, *extra)
    cache[key] = (weakref.ref(qweight), value)
    weakref.finalize(qweight, cache.pop, key, None)
    return value


def prepared_for(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                 g_idx: torch.Tensor, bits: int) -> PreparedGPTQ:
    """prepare(...) cached while this ``qweight`` object lives and all four are unmodified."""
    return cached_layout(_PREPARED, prepare, qweight, scales, qzeros, g_idx, bits)


def _triton_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   qzeros: torch.Tensor, g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """The checkpoint-format op: x [M, K] @ W -> [M, N] (qzeros hold true zero points)."""
    from .triton_gemm import matmul
    return matmul(x, prepared_for(qweight, scales, qzeros, g_idx, bits))


triton_gptq_matmul = torch.library.custom_op("gptq_lab::triton_gptq_matmul", _triton_matmul,
                                             mutates_args=())


@triton_gptq_matmul.register_fake
def _(x, qweight, scales, qzeros, g_idx, bits):
    return x.new_empty((x.shape[0], qweight.shape[1]))


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """``reference.gptq_matmul``'s signature on the Triton kernels (fp16/bf16 x, bits 2/4/8)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {list(x.shape)}; flatten leading dims")
    return run_op(torch.ops.gptq_lab.triton_gptq_matmul, _triton_matmul, x, qweight, scales, qzeros,
                  g_idx, bits)


@torch.library.custom_op("gptq_lab::triton_gptq_dequant", mutates_args=())
def triton_gptq_dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        perm: torch.Tensor | None, bits: int, group_size: int, zero: int,
                        in_features: int, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The PreparedGPTQ given field by field -> its weight [N, K'] in kernel order, ``dtype``."""
    from .triton_gemm import dequantize_weight
    return dequantize_weight(PreparedGPTQ(qweight, scales, zeros, perm, bits, group_size, zero,
                                          in_features, out_features), dtype)


@triton_gptq_dequant.register_fake
def _(qweight, scales, zeros, perm, bits, group_size, zero, in_features, out_features, dtype):
    k_rows = perm.shape[0] if perm is not None else in_features
    return qweight.new_empty((out_features, k_rows), dtype=dtype)


_WORKSPACES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D buffer of ``numel`` elements, shared by every layer on ``device`` in ``dtype``: grown
    to the largest request, never shrunk (``clear_workspaces`` frees it). Callers on one stream
    may reuse it back to back (stream order keeps a matmul's read before the next write); do not
    use it from several streams at once."""
    key = (torch.device(device), dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACES.pop(key, None)
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def clear_workspaces() -> None:
    """Free the dequantization buffers (e.g. between models in a benchmark)."""
    _WORKSPACES.clear()


def matmul_dequantized(flat: torch.Tensor, n: int, fresh, into) -> torch.Tensor:
    """flat [M, K'] @ W^T -> [M, N] with W [N, K'] dequantized once for this call (large M: the
    product then runs on cuBLAS). Eager calls dequantize with ``into(buffer)`` into the shared
    ``workspace``; under torch.compile ``fresh()`` (a custom op) returns a new tensor, since the
    compiler plans memory. Shared by every layout's dequantize-then-matmul path."""
    k_rows = flat.shape[1]
    if torch.compiler.is_compiling():
        w = fresh()
    else:
        w = workspace(n * k_rows, flat.dtype, flat.device).view(n, k_rows)
        into(w)
    return flat @ w.t()


def dequant_mm(x: torch.Tensor, p: PreparedGPTQ) -> torch.Tensor:
    """x [..., K] fp16/bf16 on CUDA -> [..., N] by dequantizing W once (``matmul_dequantized``),
    then torch.matmul (cuBLAS): the fast path for large M (prefill)."""
    from .triton_gemm import dequantize_weight
    flat = permute_input(x.reshape(-1, p.in_features), p)                        # [M, K']
    k_rows = flat.shape[1]
    out = matmul_dequantized(
        flat, p.out_features,
        lambda: torch.ops.gptq_lab.triton_gptq_dequant(p.qweight, p.scales, p.zeros, p.perm, p.bits,
                                                       p.group_size, p.zero, p.in_features,
                                                       p.out_features, x.dtype),
        lambda w: dequantize_weight(p, x.dtype, k_rows, out=w))                  # [N, K']
    return out.reshape(*x.shape[:-1], p.out_features)


def supports(x: torch.Tensor, bits: int) -> bool:
    """Whether the Triton backend can take this call (else use the reference)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and bits in (2, 4, 8)
