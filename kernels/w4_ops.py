"""The CUTLASS W4A16 GEMM (``kernels/cuda/w4_gemm*.cu``) as a torch custom op, compiled on first
use: the large-batch int4 path on Hopper (sm_90a), where it runs the whole GEMM on tensor
cores with the weights dequantized in registers instead of writing W out in fp16 first.

    p = cuda_pack.prepare(qweight, scales, qzeros, g_idx, 4, torch.float16)   # the decode layout
    y = w4_mm(x, p)                     # x [..., K] fp16/bf16 on an sm_90 GPU -> [..., N]

It reads the CUDA decode kernel's layout as it is (``w4_pack`` says how), so a layer keeps one
copy of its weights for decode and prefill. ``cuda_ops.matmul`` (what ``cuda_decode`` layers run)
sends it calls of ``MIN_M`` rows or more when ``enabled()``: opt-in for now, ``GPTQ_LAB_W4=1``.

Built by ``torch.utils.cpp_extension.load`` (one unit per configuration, compiled in parallel;
a few minutes; cached by torch under ``TORCH_EXTENSIONS_DIR``) against CUTLASS's headers, which
come from the PyPI package ``nvidia-cutlass`` (installed with ``--no-deps``: only its headers are
used) or from ``GPTQ_LAB_CUTLASS_DIR`` (a CUTLASS checkout). ``unavailable()`` says why the GEMM
cannot run here. Importing this module builds nothing and touches no GPU.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import warnings
from pathlib import Path

import torch

from .cuda_pack import PreparedCUDA
from .ops import run_op
from .w4_pack import gemm_input

CUDA_DIR = Path(__file__).parent / "cuda"
SOURCES = [CUDA_DIR / "w4_binding.cpp", *sorted(CUDA_DIR.glob("w4_gemm_*.cu"))]
NVCC_FLAGS = ["-O3", "-DNDEBUG", "-std=c++17", "--expt-relaxed-constexpr",
              "-gencode=arch=compute_90a,code=sm_90a",
              # torch's defaults hide the half operators CUTLASS uses
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def cutlass_include_dirs() -> list[str]:
    """CUTLASS's include folders: ``$GPTQ_LAB_CUTLASS_DIR/{include,tools/util/include}``, else
    those inside the ``nvidia-cutlass`` package (found without importing it)."""
    root = os.environ.get("GPTQ_LAB_CUTLASS_DIR")
    if root is None:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the CUTLASS headers were not found: pip install --no-deps nvidia-cutlass, "
                               "or set GPTQ_LAB_CUTLASS_DIR to a CUTLASS checkout")
        root = str(Path(next(iter(spec.submodule_search_locations))) / "source")
    dirs = [str(Path(root) / "include"), str(Path(root) / "tools" / "util" / "include")]
    if not (Path(dirs[0]) / "cutlass" / "cutlass.h").is_file():
        raise RuntimeError(f"no cutlass/cutlass.h under {dirs[0]}")
    return dirs


@functools.cache
def _build():
    """Compile (or load the cached build of) the extension; raises RuntimeError on failure."""
    from torch.utils.cpp_extension import CUDA_HOME, load
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        raise RuntimeError("no CUDA compiler (nvcc) found; set CUDA_HOME to build the W4 GEMM")
    include = cutlass_include_dirs()
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in sorted(CUDA_DIR.glob("w4_*"))))
    return load(name=f"gptq_lab_w4_{digest.hexdigest()[:10]}", sources=[str(s) for s in SOURCES],
                extra_cuda_cflags=NVCC_FLAGS, extra_cflags=["-O3"], extra_include_paths=include,
                verbose=bool(os.environ.get("GPTQ_LAB_VERBOSE_BUILD")))


@functools.cache
def unavailable() -> str | None:
    """None when the W4 GEMM can run on this machine, else why not."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "no CUDA device"
    if torch.cuda.get_device_capability() != (9, 0):
        return "the W4 GEMM is built for Hopper (sm_90a) GPUs only"
    try:
        _build()
    except (RuntimeError, OSError, ImportError) as e:    # no compiler or headers, a build error
        why = f"the W4 GEMM failed to build: {str(e).strip().splitlines()[-1][:300]}"
        warnings.warn(f"gptq_lab: {why}; large batches use the other kernels", stacklevel=2)
        return why
    return None


DEFAULT = False   # GPTQ_LAB_W4 unset: off until the whole call beats dequantize + cuBLAS at the
                  # prefill's M on a GPU (benchmarks/kernels_notes.md, twelfth session)
MIN_M = 64        # cuda_decode layers take it from here (H100, 2026-12-07: at 64 rows the GEMM
                  # alone took 0.53-0.65x the decode kernel's time on 4096x11008, 8192x8192,
                  # 8192x28672; nothing was measured between 16 and 64 rows)


@torch.compiler.assume_constant_result      # read once when traced, not per call
def enabled() -> bool:
    """Whether ``cuda_decode`` layers may use the W4 GEMM here: ``GPTQ_LAB_W4=1`` turns it on,
    ``0`` off, unset takes ``DEFAULT``; and it must build for this GPU (``unavailable``)."""
    setting = os.environ.get("GPTQ_LAB_W4", "")
    on = DEFAULT if setting == "" else setting == "1"
    return on and unavailable() is None


def runs(p: PreparedCUDA) -> bool:
    """Whether the W4 GEMM takes this layer here: ``enabled()`` and the layer's N a multiple of
    16 (no padded outputs)."""
    return p.out_features % 16 == 0 and enabled()


# name -> (dtype 0 fp16 / 1 bf16, batch rows per tile, stream-K, inputs per k-block, CTAs per
# cluster): GPTQ_LAB_W4_CONFIGS in cuda/w4_gemm_api.h (CPU tests check that they and each
# configuration's source agree, a GPU test that the build has them). Kept here as plain data so
# that choosing one traces under torch.compile(fullgraph=True).
CONFIGS = {"f16_64_sk": (0, 64, True, 64, 1), "f16_128_sk": (0, 128, True, 64, 1),
           "f16_128": (0, 128, False, 64, 1), "f16_256": (0, 256, False, 64, 1),
           "bf16_128_sk": (1, 128, True, 64, 1), "bf16_256": (1, 256, False, 64, 1),
           "f16_256_c2": (0, 256, False, 64, 2), "f16_256_sk": (0, 256, True, 64, 1)}
# built and timed by benchmarks/w4_gemm.py, never chosen until they win there: stream-K over
# 256-row tiles (kernels_notes.md, thirteenth session; k-blocks of 128 lost on every product)
TRIAL = frozenset({"f16_256_sk"})
# above 256 rows: H100, 2026-12-07, one 7B block at M = 2048 (results/w4_gemm_prefill_thirteenth_
# h100.txt): f16_256_c2 (clusters of two sharing each x tile) beat f16_256 on all four products,
# 1.355 against 1.437 ms; bf16 has no cluster configuration yet
LARGE_M = {torch.float16: "f16_256_c2", torch.bfloat16: "bf16_256"}


def choose(m: int, dtype: torch.dtype) -> str:
    """The configuration for M rows: the smallest tile that holds them (stream-K first), else
    ``LARGE_M``; none of ``TRIAL`` (all the others take k-blocks of 64: every group size)."""
    if dtype not in LARGE_M:
        raise ValueError(f"no W4 GEMM is built for {dtype}")
    want = 1 if dtype == torch.bfloat16 else 0
    fits = sorted((tile, not sk, name) for name, (d, tile, sk, _, _) in CONFIGS.items()
                  if d == want and name not in TRIAL and name != LARGE_M[dtype])
    return next((name for tile, _, name in fits if tile >= m), LARGE_M[dtype])


def _w4_mm(x: torch.Tensor, qweight: torch.Tensor, meta: torch.Tensor, group_size: int,
           config: str) -> torch.Tensor:
    """x [M, K'] (GEMM column order, contiguous, the layout's dtype) -> [M, N'] in x's dtype;
    the scales and zeros are made from ``meta`` here (``w4_scales``: one Triton kernel)."""
    # imports Triton: only where the GEMM runs
    from .w4_scales import gemm_scales
    scales, zeros = gemm_scales(meta, x.dtype)
    return _build().w4_gemm(x, qweight, scales, zeros, group_size, config)


w4_gemm = torch.library.custom_op("gptq_lab::w4_mm", _w4_mm, mutates_args=())


@w4_gemm.register_fake
def _(x, qweight, meta, group_size, config):
    return x.new_empty((x.shape[0], meta.shape[1] * 16))


def w4_mm(x: torch.Tensor, p: PreparedCUDA, config: str | None = None) -> torch.Tensor:
    """x [..., K] in p.dtype on an sm_90 GPU -> [..., N]. ``config`` forces a configuration."""
    if x.dtype != p.dtype:
        raise ValueError(f"x is {x.dtype} but the layer was prepared for {p.dtype}")
    x2 = x.reshape(-1, p.in_features)
    if torch.compiler.is_compiling():     # torch's permute: Inductor fuses it into x's producer
        flat = gemm_input(x2, p)
    else:                                 # eager: one Triton pass (imports Triton: GPU only)
        from .w4_input import gemm_input as triton_gemm_input
        flat = triton_gemm_input(x2, p)
    config = config or choose(flat.shape[0], p.dtype)
    out = run_op(torch.ops.gptq_lab.w4_mm, _w4_mm, flat, p.qweight, p.meta, p.group_size, config)
    if out.shape[1] != p.out_features:
        out = out[:, :p.out_features]
    return out.reshape(*x.shape[:-1], p.out_features)
