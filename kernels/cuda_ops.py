"""The CUDA decode kernel (``kernels/cuda/``) as a torch custom op, compiled on first use.

    y = gptq_matmul(x, qweight, scales, qzeros, g_idx, bits)    # reference's signature
    y = cuda_mm(x, p)                                           # p = cuda_pack.prepare(...)
    y = dequant_mm(x, p)            # large M: W dequantized from p into a shared buffer, cuBLAS
    y = matmul(x, p)                # by M (what a prepared cuda_decode layer runs): the kernel,
                                    # then dequant_mm; on Hopper with GPTQ_LAB_W4=1 the CUTLASS
                                    # W4 GEMM (w4_ops) on the same layout from w4_ops.MIN_M rows

The sources are built by ``torch.utils.cpp_extension.load`` the first time a CUDA call needs
them (about a minute; cached by torch under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) for sm_80 and sm_90. ``unavailable()`` says why the kernel
cannot run here (no GPU, no nvcc, an older GPU, a failed build), so ``gptq_lab.kernels``
can fall back to Triton with that reason. Importing this module builds nothing.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import warnings
import weakref
from pathlib import Path

import torch

from . import w4_ops
from .cuda_pack import PreparedCUDA, kernel_input, prepare
from .cuda_pack import supports as layer_supports
from .ops import cached_layout, matmul_dequantized, run_op

CUDA_DIR = Path(__file__).parent / "cuda"
SOURCES = [CUDA_DIR / n for n in ("binding.cpp", "int4_decode.cu", "int4_dequant.cu")]
ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
MIN_M, MAX_M = 1, 16    # where it beats Triton (H200, 2026-11-27: batch 1 too, since v3)
MAX_SLAB_M = 128       # prepared layers without a Triton layout: the kernel up to here,
                       # dequantize + cuBLAS above (H100, 2026-11-27: at 64 rows the kernel
                       # is 0.8-0.9x fp16, dequantize + cuBLAS 0.35-0.5x; Triton's fused
                       # kernel 1.1-1.3x, but cuda_decode layers keep no Triton layout)


def env_defines() -> tuple[str, ...]:
    """``GPTQ_LAB_CUDA_DEFINES`` ("NAME=VALUE" items, space or comma separated, each NAME a
    GPTQ_LAB_* define of kernels/cuda/): compile-time variants for the whole process, e.g. to
    run the GPU tests on a variant before it becomes the default. Malformed items are refused."""
    items = tuple(os.environ.get("GPTQ_LAB_CUDA_DEFINES", "").replace(",", " ").split())
    bad = [d for d in items if not re.fullmatch(r"GPTQ_LAB_[A-Z0-9_]+=\w+", d)]
    if bad:
        raise ValueError(f"GPTQ_LAB_CUDA_DEFINES: {bad} are not NAME=VALUE defines of GPTQ_LAB_*")
    return items


@functools.cache
def _build(arch_flags: tuple[str, ...] = tuple(ARCH_FLAGS), defines: tuple[str, ...] | None = None):
    """Compile (or load the cached build of) the extension; raises RuntimeError on failure.
    ``arch_flags`` and ``defines`` (e.g. ``("GPTQ_LAB_STAGES=8",)``: compile-time variants, see
    kernels/cuda/*.cuh; None: ``env_defines()``) other than the defaults are for
    benchmarks/cuda_variants.py and for testing variants."""
    from torch.utils.cpp_extension import CUDA_HOME, load
    if defines is None:
        defines = env_defines()
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        raise RuntimeError("no CUDA compiler (nvcc) found; set CUDA_HOME to build the CUDA kernel")
    suffix = "".join("_" + d.replace("GPTQ_LAB_", "").replace("=", "").lower() for d in defines)
    # torch rebuilds when a listed source changes, not a header: the name carries a hash of all
    sources = hashlib.sha1(b"".join(f.read_bytes() for f in sorted(CUDA_DIR.iterdir()) if f.is_file()))
    return load(name=f"gptq_lab_int4_{sources.hexdigest()[:10]}{suffix}", sources=[str(s) for s in SOURCES],
                extra_cuda_cflags=["-O3", *arch_flags, *(f"-D{d}" for d in defines)],
                extra_cflags=["-O3"], verbose=bool(os.environ.get("GPTQ_LAB_VERBOSE_BUILD")))


@functools.cache
def unavailable() -> str | None:
    """None when the CUDA decode kernel can run on this machine, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if torch.cuda.get_device_capability() < (8, 0):
        return "the GPU is older than sm_80 (the kernel uses bf16 tensor-core MMAs)"
    try:
        _build()
    except (RuntimeError, OSError, ImportError) as e:    # no compiler, or a build error
        why = f"the CUDA kernel failed to build: {str(e).strip().splitlines()[-1][:300]}"
        warnings.warn(f"gptq_lab: {why}; using the Triton kernels instead", stacklevel=2)
        return why
    return None


def _int4_mm(x: torch.Tensor, qweight: torch.Tensor, meta: torch.Tensor, group_size: int,
             out_features: int) -> torch.Tensor:
    """x [M, K'] (kernel order, K' a multiple of 64, contiguous) -> [M, N] in x's dtype."""
    return _build().int4_decode(x, qweight, meta, group_size, out_features)


cuda_int4_mm = torch.library.custom_op("gptq_lab::cuda_int4_mm", _int4_mm, mutates_args=())


@cuda_int4_mm.register_fake
def _(x, qweight, meta, group_size, out_features):
    return x.new_empty((x.shape[0], out_features))


def _kernel_rows(x: torch.Tensor, p: PreparedCUDA) -> torch.Tensor:
    """x [..., K] -> the layout's input rows [M, K'] (checked against the layout's dtype)."""
    if x.dtype != p.dtype:
        raise ValueError(f"x is {x.dtype} but the layer was prepared for {p.dtype}")
    return kernel_input(x.reshape(-1, p.in_features), p)


def cuda_mm(x: torch.Tensor, p: PreparedCUDA) -> torch.Tensor:
    """x [..., K] fp16/bf16 on CUDA (p.dtype) -> [..., N]."""
    flat = _kernel_rows(x, p)
    out = run_op(torch.ops.gptq_lab.cuda_int4_mm, _int4_mm, flat, p.qweight, p.meta, p.group_size,
                 p.out_features)
    return out.reshape(*x.shape[:-1], p.out_features)


@torch.library.custom_op("gptq_lab::cuda_int4_dequant", mutates_args=())
def cuda_int4_dequant(qweight: torch.Tensor, meta: torch.Tensor, group_size: int,
                      out_features: int, k_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """The layout's weight [N, K'] (K' padded to 64) in ``dtype``, as the kernel dequantizes it."""
    w = torch.empty((out_features, k_rows), dtype=dtype, device=qweight.device)
    _build().int4_dequant(qweight, meta, group_size, w)
    return w


@cuda_int4_dequant.register_fake
def _(qweight, meta, group_size, out_features, k_rows, dtype):
    return qweight.new_empty((out_features, k_rows), dtype=dtype)


def dequant_mm(x: torch.Tensor, p: PreparedCUDA) -> torch.Tensor:
    """x [..., K] (p.dtype, CUDA) -> [..., N] by dequantizing W from the CUDA layout once
    (``ops.matmul_dequantized``), then torch.matmul (cuBLAS): the fast path for large M."""
    flat = _kernel_rows(x, p)                                                    # [M, K'64]
    out = matmul_dequantized(
        flat, p.out_features,
        lambda: torch.ops.gptq_lab.cuda_int4_dequant(p.qweight, p.meta, p.group_size,
                                                     p.out_features, flat.shape[1], p.dtype),
        lambda w: _build().int4_dequant(p.qweight, p.meta, p.group_size, w))
    return out.reshape(*x.shape[:-1], p.out_features)


def matmul(x: torch.Tensor, p: PreparedCUDA) -> torch.Tensor:
    """x [..., K] -> [..., N] the fastest way from the CUDA layout alone (what a ``cuda_decode``
    layer runs): the W4 GEMM from ``w4_ops.MIN_M`` rows on where it runs (``w4_ops.runs``:
    Hopper, built, turned on, the layer fits it); else the kernel for up to ``MAX_SLAB_M`` rows
    and dequantize + cuBLAS above."""
    rows = x.numel() // p.in_features
    if rows >= w4_ops.MIN_M and w4_ops.runs(p):
        return w4_ops.w4_mm(x, p)
    return cuda_mm(x, p) if rows <= MAX_SLAB_M else dequant_mm(x, p)


_PREPARED: dict[tuple, tuple[weakref.ref, PreparedCUDA | None]] = {}


def _prepare_or_none(qweight, scales, qzeros, g_idx, bits, dtype) -> PreparedCUDA | None:
    try:
        return prepare(qweight, scales, qzeros, g_idx, bits, dtype)
    except ValueError:                       # a layer the kernel cannot run (bits, group size)
        return None


def prepared_for(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                 g_idx: torch.Tensor, bits: int, dtype: torch.dtype) -> PreparedCUDA | None:
    """prepare(...), or None when the kernel cannot run this layer; cached while this
    ``qweight`` object lives and all four tensors are unmodified."""
    return cached_layout(_PREPARED, _prepare_or_none, qweight, scales, qzeros, g_idx, bits, dtype)


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """``reference.gptq_matmul``'s signature on the CUDA decode kernel (fp16/bf16, 4-bit,
    group size a multiple of 64 or per-channel); raises ValueError for other layers."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {list(x.shape)}; flatten leading dims")
    why = unavailable()
    if why is not None:
        raise RuntimeError(f"the CUDA decode kernel is not available: {why}")
    p = prepared_for(qweight, scales, qzeros, g_idx, bits, x.dtype)
    if p is None:
        raise ValueError("the CUDA decode kernel cannot run this layer: "
                         + str(layer_supports(bits, g_idx, scales.shape[0])))
    return cuda_mm(x, p)


def wanted(x: torch.Tensor, bits: int) -> bool:
    """Cheap check for the dispatcher: a decode-sized fp16/bf16 4-bit call on a GPU where the
    kernel builds (the layer itself is checked, once, by ``prepared_for``)."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and MIN_M <= x.shape[0] <= MAX_M
            and bits == 4 and unavailable() is None)
