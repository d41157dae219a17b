"""GPTQ matmul kernels, installed as ``gptq_lab.kernels``.

    y = gptq_matmul(x, qweight, scales, qzeros, g_idx, bits)        # x [M, K] -> y [M, N]

Tensors follow the layout in ``gptq_lab.kernels.reference`` (qzeros hold true zero points).
Backends are a dict of name -> function with ``reference.gptq_matmul``'s signature;
``reference`` (torch dequantize + matmul) runs everywhere and is the oracle for the others.
Importing this package never initialises CUDA.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable

import torch


def _hand_out_gptq_lab_kernels(name: str) -> None:
    """This folder was imported as the top-level package ``name``, which a checkout whose root
    is on sys.path allows (``python -m pytest`` from it, or PYTHONPATH): transformers does so
    when it checks for Hugging Face's ``kernels`` package (``is_kernels_available``) and finds
    this folder without distribution metadata. Point ``name`` and the submodules loaded so far
    at gptq_lab.kernels' own modules, so that none runs twice (those it loads later, the Triton
    ones on first use, are imported by relative imports, never under ``name``). A second copy
    registers the custom ops again; torch keeps the last registration, so compiled code called
    that copy, which tuned its own kernel choices apart from eager calls' (1-ulp differences on
    a GPU). Only gptq_lab.kernels itself is imported here (it imports no Triton)."""
    real = importlib.import_module("gptq_lab.kernels")
    prefix = real.__name__ + "."
    for full, module in list(sys.modules.items()):
        if full.startswith(prefix):
            sys.modules[f"{name}.{full[len(prefix):]}"] = module
    sys.modules[name] = real


def _load_the_other_package(name: str) -> bool:
    """Load the package ``name`` that lives elsewhere on sys.path (Hugging Face's ``kernels``,
    which transformers 5.2x depends on and imports by that name) in place of this folder, which
    shadows it when the checkout's root comes first on sys.path. False when there is none."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return True


if __name__ != "gptq_lab.kernels":
    if not _load_the_other_package(__name__):
        _hand_out_gptq_lab_kernels(__name__)    # the import then returns gptq_lab.kernels
    # the rest of this body runs in a module object nobody keeps: its relative imports must
    # reach gptq_lab.kernels' modules, never load this folder's files a second time
    __package__ = "gptq_lab.kernels"

from . import reference

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"reference": reference.gptq_matmul}

if importlib.util.find_spec("triton") is not None:
    from . import ops as triton_ops  # registers the custom ops; imports neither triton nor CUDA
    BACKENDS["triton"] = triton_ops.gptq_matmul
else:
    triton_ops = None

from . import cuda_ops  # registers the op; builds nothing until first use

BACKENDS["cuda"] = cuda_ops.gptq_matmul


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in ``BACKENDS`` order:
    ``reference`` everywhere; the GPU kernels (``triton``, ...) only where CUDA is available,
    except ``triton`` under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, as the tests use).
    ``backend=`` still accepts any installed name in ``BACKENDS``, so a kernel can be forced
    where it cannot run (for the interpreter tests); it then fails inside the kernel."""
    return [name for name in BACKENDS if _runs_here(name)]


def _runs_here(name: str) -> bool:
    if name == "reference":
        return True
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.cuda.is_available()                  # no CUDA context is created


def default_backend(device: torch.device) -> str:
    """The backend used for inputs on ``device`` when none is named."""
    return "triton" if device.type == "cuda" and "triton" in BACKENDS else "reference"


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor, bits: int, backend: str | None = None) -> torch.Tensor:
    """``x`` [M, K] @ dequantized W [K, N] -> [M, N] in x's dtype (no bias).

    With no ``backend``: on CUDA, small-batch fp16/bf16 4-bit calls (1 <= M <= 16) take the CUDA
    kernel where it builds and fits the layer, other fp16/bf16 calls Triton, the rest (float32,
    3-bit, CPU) the torch reference.
    """
    if backend is None:
        if cuda_ops.wanted(x, bits) and x.dim() == 2:
            p = cuda_ops.prepared_for(qweight, scales, qzeros, g_idx, bits, x.dtype)
            if p is not None:                  # prepared once per layer; None: not this layer
                return cuda_ops.cuda_mm(x, p)
        name = default_backend(x.device)
        if name == "triton" and not triton_ops.supports(x, bits):
            name = "reference"                 # float32 activations or 3-bit: the torch path
    else:
        name = backend
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not available; available: {available_backends()}")
    return BACKENDS[name](x, qweight, scales, qzeros, g_idx, bits)


__all__ = ["BACKENDS", "available_backends", "default_backend", "gptq_matmul", "reference"]
