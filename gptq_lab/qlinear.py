"""QuantLinear: a linear layer that holds GPTQ-packed weights, and ``convert`` to swap it in.

    results = quantize_model(model, ids, config)     # model left fake-quantized
    convert(model, results, config)                   # linears -> QuantLinear, float weights freed
    y = model(ids)                                     # runs on gptq_lab.kernels

Buffers (K = in_features, N = out_features, G = number of groups), the checkpoint layout:
  qweight int32 [K * bits / 32, N]   codes packed along K
  qzeros  int32 [G, N * bits / 32]   TRUE zero points (gptq_v2 convention) packed along N;
                                     io.save converts to the classic "zero - 1" (v1) on disk
  scales  fp16  [G, N]
  g_idx   int32 [K]                  group of each input column (a permutation under act-order)
  bias    fp16  [N] or None
K and N must be multiples of 32 // bits (of 32 for 3-bit). Nothing dequantized is kept
between calls unless ``cache_weight`` is set (that trades the memory saving for speed).
Keep the layer in fp16: ``model.to(torch.bfloat16)`` would cast ``scales`` too (lossy).

For inference, call ``prepare()`` (``gptq_lab.generate.prepare_model`` does every layer) once
the layer is on its device: the kernel is chosen then, not per call, and on CUDA the Triton
layout is kept as non-persistent buffers, so forward has no data-dependent Python branching and
runs under ``torch.compile(fullgraph=True)`` and CUDA graphs. Calls with more than
``dequant_above`` rows (prefill) dequantize W once into a shared buffer and use torch.matmul.
``prepare(release_checkpoint=True)`` frees the checkpoint-layout tensors (keeping them would
double the weights' memory); such a layer still runs but can no longer be saved or dequantized.
"""
from __future__ import annotations

import copy
import math
import re
from collections import Counter

import torch
from torch import nn

from . import kernels
from .arch import in_out_features, is_conv1d
from .config import QuantConfig
from .errors import NumericalError, UnsupportedModelError
from .gptq import GPTQResult
from .kernels import cuda_ops, cuda_pack, triton_pack
from .kernels import ops as kernel_ops
from .quant import group_index

CONFIG_ATTR = "gptq_config"   # convert() and io.load() record the QuantConfig on the model here


class QuantLinear(nn.Module):
    """y = x @ W + bias with W stored GPTQ-packed (see the module docstring for the layout)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 sym: bool = True, bias: bool = False, device: torch.device | str | None = None):
        super().__init__()
        per = kernels.reference.values_per_word_multiple(bits) if bits in (2, 3, 4, 8) else None
        if per is None:
            raise ValueError(f"bits={bits} is not supported; use 2, 3, 4 or 8")
        if in_features % per or out_features % per:
            raise ValueError(f"{bits}-bit packing needs in_features and out_features to be multiples "
                             f"of {per}; got in_features={in_features}, out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.cache_weight = False
        self._weight_cache: torch.Tensor | None = None
        self.backend: str | None = None            # set by prepare(); None: resolved per call
        self._kernel_meta: tuple | None = None     # PreparedGPTQ's int fields, when prepared
        self._cuda_meta = None                     # PreparedCUDA without tensors (cuda_decode)
        self._released = False
        groups = math.ceil(in_features / (in_features if group_size == -1 else group_size))
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features,
                                                    dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32,
                                                   dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, **kw))
        self.register_buffer("g_idx", group_index(in_features, group_size).to(device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, **kw) if bias else None)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @classmethod
    def from_result(cls, result: GPTQResult, bias: torch.Tensor | None = None,
                    device: torch.device | str | None = None) -> QuantLinear:
        """Pack a solver result (codes [N, K], scales/zeros [N, G], g_idx [K]) into a QuantLinear.
        A result the pipeline already packed (``qweight``/``qzeros`` set) is used as it is: on the
        same device the layer shares those tensors with the result instead of copying them."""
        n, k = result.codes.shape
        layer = cls(k, n, result.bits, result.group_size, result.sym, bias is not None, device="meta")
        scales = result.scales.detach().t().float()                                     # [G, N]
        _check_fp16_range(scales)
        packed = result if result.qweight is not None else copy.copy(result).pack()    # on its device
        buffers = {
            "qweight": packed.qweight,                                                  # [K*b/32, N]
            "qzeros": packed.qzeros,                                                    # [G, N*b/32]
            "scales": scales.half().contiguous(),
            "g_idx": result.g_idx.to(torch.int32).cpu(),
        }
        if bias is not None:
            buffers["bias"] = bias.detach().to(torch.float16).cpu()
        target = device if device is not None else result.codes.device
        for name, value in buffers.items():
            expected = getattr(layer, name)
            if value.shape != expected.shape:
                raise ValueError(f"result for a [{n}, {k}] layer gives {name} {list(value.shape)}, "
                                 f"expected {list(expected.shape)}")
            setattr(layer, name, value.to(target))
        return layer

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [K, N] (input-major)."""
        self._check_not_released("dequantize")
        return kernels.reference.dequantize_gptq(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32/float16/bfloat16 -> [..., N] in x's dtype."""
        flat = x.reshape(-1, self.in_features)                                           # [M, K]
        if self.cache_weight:
            w = self._cached(flat.dtype)
            out = flat @ w                                                               # [M, N]
        elif self.backend is not None:
            out = self._prepared_forward(flat)
        else:
            self._weight_cache = None
            out = kernels.gptq_matmul(flat, self.qweight, self.scales, self.qzeros, self.g_idx, self.bits)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------------ inference path
    dequant_above = 128     # rows of x above which W is dequantized once per call (prefill)

    def prepare(self, release_checkpoint: bool = False, cuda_decode: bool = False,
                act_dtype: torch.dtype | None = None) -> QuantLinear:
        """Choose the kernel for the layer's current device and keep its runtime layout; call
        again after moving the layer. Checks the buffers once (forward then checks nothing).

        CUDA with Triton, 2/4/8 bits: the Triton layout (``kernels.triton_pack``) is kept as
        non-persistent buffers ``kernel_*``; ``release_checkpoint=True`` then frees ``qweight``,
        ``qzeros`` and ``scales`` (left empty: [0, ...]).
        ``cuda_decode=True`` (CUDA, 4-bit, where the CUDA kernel builds and fits the layer) keeps
        the CUDA kernel's layout instead (``kernels.cuda_pack``, buffers ``cuda_*``): calls of up
        to ``cuda_ops.MAX_SLAB_M`` rows run on the CUDA kernel, larger ones dequantize from that
        layout into the shared buffer and use torch.matmul. Same memory as the Triton layout,
        faster decoding; layers the CUDA kernel cannot run keep the Triton layout. That layout is
        made for one activation dtype: ``act_dtype`` (float16 or bfloat16; default the scales'
        dtype, float16); inputs of another dtype take the reference path (refused once released).
        Elsewhere: the torch reference, written without data-dependent branches.
        """
        device = self.qweight.device
        self._check_not_released("prepare")
        kernels.reference.check_gptq_tensors(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits)
        kernels.reference.check_g_idx(self.g_idx, self.n_groups)
        self.backend = kernels.default_backend(device)
        self._kernel_meta = self._cuda_meta = None
        for name in ("cuda_qweight", "cuda_meta", "cuda_perm", "kernel_qweight", "kernel_scales",
                     "kernel_zeros", "kernel_perm"):
            self._buffers.pop(name, None)                    # a layout from an earlier prepare()
        if cuda_decode and device.type == "cuda" and self.bits == 4 and cuda_ops.unavailable() is None:
            dtype = act_dtype or (self.scales.dtype if self.scales.dtype in (torch.float16, torch.bfloat16)
                                  else torch.float16)
            p = cuda_ops.prepared_for(self.qweight, self.scales, self.qzeros, self.g_idx, 4, dtype)
            if p is not None:
                for name in ("qweight", "meta", "perm"):
                    self.register_buffer(f"cuda_{name}", getattr(p, name), persistent=False)
                self._cuda_meta = p._replace(qweight=None, meta=None, perm=None)
        if self._cuda_meta is None and self.backend == "triton" and self.bits in (2, 4, 8):
            p = triton_pack.prepare(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits)
            for name in ("qweight", "scales", "zeros", "perm"):
                self.register_buffer(f"kernel_{name}", getattr(p, name), persistent=False)
            self._kernel_meta = (p.bits, p.group_size, p.zero, p.in_features, p.out_features)
        if release_checkpoint and (self._kernel_meta or self._cuda_meta):   # a kernel layout holds it all
            for name in ("qweight", "qzeros", "scales"):
                t = getattr(self, name)
                setattr(self, name, t.new_empty((0, t.shape[1])))
            self._released = True
        return self

    def _apply(self, fn, recurse: bool = True):
        """Module.to/cuda/half...: a moved CUDA layout must land before the kernel reads it
        (``cuda_pack.settle``)."""
        out = super()._apply(fn, recurse)
        layout = self._buffers.get("cuda_qweight")
        if layout is not None:
            cuda_pack.settle(layout)
        return out

    def _kernel_layout(self):
        b, gs, zero, k, n = self._kernel_meta
        return triton_pack.PreparedGPTQ(self.kernel_qweight, self.kernel_scales, self.kernel_zeros,
                                                self.kernel_perm, b, gs, zero, k, n)

    def _prepared_forward(self, flat: torch.Tensor) -> torch.Tensor:
        """Branches only on shapes, dtypes and devices (static under torch.compile)."""
        c = self._cuda_meta
        if c is not None and flat.is_cuda and flat.dtype == c.dtype:
            p = c._replace(qweight=self.cuda_qweight, meta=self.cuda_meta, perm=self.cuda_perm)
            return cuda_ops.matmul(flat, p)
        big = flat.shape[0] > self.dequant_above
        if self._kernel_meta is not None and flat.is_cuda and flat.dtype in (torch.float16, torch.bfloat16):
            p = self._kernel_layout()
            return kernel_ops.dequant_mm(flat, p) if big else kernel_ops.gptq_mm(flat, p)
        if c is not None and self._released:
            raise UnsupportedModelError(
                f"this layer was prepared for {c.dtype} activations (cuda_decode) and its checkpoint tensors "
                f"were freed, so a {flat.dtype} input on {flat.device} cannot run; prepare the model for this "
                f"dtype (prepare_model(model, cuda_decode=True) takes the model's dtype)")
        self._check_not_released("run this input on the reference path")
        w = kernels.reference.dequantize_unchecked(self.qweight, self.scales, self.qzeros, self.g_idx,
                                                   self.bits)                               # [K, N] fp32
        if big and not torch.compiler.is_compiling():               # one reused buffer, not one per call
            return flat @ kernel_ops.workspace(w.numel(), flat.dtype, flat.device).view(w.shape).copy_(w)
        return flat @ w.to(flat.dtype)

    def _check_not_released(self, what: str) -> None:
        if self._released:
            raise UnsupportedModelError(
                f"cannot {what}: this layer's checkpoint qweight was freed by prepare(release_checkpoint=True) "
                f"to save memory; reload the checkpoint (gptq_lab.load) to save, dequantize or move it")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._check_not_released("save it (state_dict)")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _cached(self, dtype: torch.dtype) -> torch.Tensor:
        w = self._weight_cache
        if w is None or w.dtype != dtype or w.device != self.qweight.device:
            w = self._weight_cache = self.dequantize().to(dtype)
        return w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}")


def _check_fp16_range(scales: torch.Tensor) -> None:
    biggest = float(scales.abs().max()) if scales.numel() else 0.0
    if not math.isfinite(biggest) or biggest > 65504:
        raise NumericalError(f"scales reach {biggest:.4g}, outside the fp16 range (65504) of the GPTQ "
                             f"format; the layer's weights are too large to store in this format")
    if bool(((scales != 0) & (scales.half() == 0)).any()):
        raise NumericalError(f"some scales (smallest {float(scales[scales != 0].abs().min()):.3g}) "
                             f"underflow to 0 in fp16; the layer's weights are too small for the format")


def infer_config(results: dict[str, GPTQResult | QuantLinear]) -> QuantConfig:
    """A QuantConfig consistent with ``results`` (or QuantLinear layers): the most common
    (bits, group_size, sym) as the base, exact-name overrides for other layers, act_order if
    any g_idx is permuted. Fields not recorded there (damp, true_sequential...) keep defaults."""
    if not results:
        raise ValueError("results is empty: nothing was quantized")
    def key(r):
        return r.bits, r.group_size, r.sym

    (bits, group_size, sym), _ = Counter(key(r) for r in results.values()).most_common(1)[0]
    overrides = {f"^{re.escape(name)}$": {"bits": r.bits, "group_size": r.group_size, "sym": r.sym}
                 for name, r in results.items() if key(r) != (bits, group_size, sym)}
    act_order = any(not torch.equal(r.g_idx.cpu(), group_index(len(r.g_idx), r.group_size))
                    for r in results.values())
    return QuantConfig(bits=bits, group_size=group_size, sym=sym, act_order=act_order, overrides=overrides)


def convert(model: nn.Module, results: dict[str, GPTQResult], config: QuantConfig | None = None) -> nn.Module:
    """Replace every linear named in ``results`` by a QuantLinear (in place) and return the model.

    Works on nn.Linear and transformers' Conv1D (GPT-2); the float weights are dropped. The
    QuantConfig (``config``, or one inferred from the results) is recorded as
    ``model.gptq_config`` for io.save.
    """
    for name, result in results.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UnsupportedModelError(f"results name {name!r} is not a module of this model") from None
        if isinstance(module, QuantLinear):
            raise UnsupportedModelError(f"{name} is already a QuantLinear; convert each model once")
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise UnsupportedModelError(f"{name} is a {type(module).__name__}, not nn.Linear or Conv1D")
        k, n = in_out_features(module)
        if tuple(result.codes.shape) != (n, k):
            raise UnsupportedModelError(f"result for {name} has codes {list(result.codes.shape)} but the "
                                        f"layer is [{n}, {k}] (out, in); results belong to another model?")
        layer = QuantLinear.from_result(result, module.bias, device=module.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    setattr(model, CONFIG_ATTR, config if config is not None else infer_config(results))
    return model


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Full name -> QuantLinear for every quantized layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
