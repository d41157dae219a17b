"""GPTQ matmul kernels, installed as ``gptq_lab.kernels``.

    y = gptq_matmul(x, qweight, scales, qzeros, g_idx, bits)        # x [M, K] -> y [M, N]

Tensors follow the layout in ``gptq_lab.kernels.reference`` (qzeros hold true zero points).
Backends are a dict of name -> function with ``reference.gptq_matmul``'s signature;
``reference`` (torch dequantize + matmul) runs everywhere and is the oracle for the others.
Importing this package never initialises CUDA.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from . import reference

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"reference": reference.gptq_matmul}

if importlib.util.find_spec("triton") is not None:
    from . import ops as triton_ops          # registers the custom ops; imports neither triton nor CUDA
    BACKENDS["triton"] = triton_ops.gptq_matmul
else:
    triton_ops = None


def available_backends() -> list[str]:
    """Names usable as ``backend=``, best first."""
    return list(BACKENDS)


def default_backend(device: torch.device) -> str:
    """The backend used for inputs on ``device`` when none is named."""
    return "triton" if device.type == "cuda" and "triton" in BACKENDS else "reference"


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor, bits: int, backend: str | None = None) -> torch.Tensor:
    """``x`` [M, K] @ dequantized W [K, N] -> [M, N] in x's dtype (no bias)."""
    name = backend or default_backend(x.device)
    if backend is None and name == "triton" and not triton_ops.supports(x, bits):
        name = "reference"                     # float32 activations or 3-bit: the torch path
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not available; available: {available_backends()}")
    return BACKENDS[name](x, qweight, scales, qzeros, g_idx, bits)


__all__ = ["BACKENDS", "available_backends", "default_backend", "gptq_matmul", "reference"]
