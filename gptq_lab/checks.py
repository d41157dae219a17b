"""Checks of quantize_model's inputs, before any work: the model, its weights, the config
against the model's layers, and the calibration token ids. Each failure is a clear error
naming what to do."""
from __future__ import annotations

import torch
from torch import nn

from .arch import family_of, get_blocks, in_out_features, weight_matrix
from .config import QuantConfig
from .errors import CalibrationError, ConfigError, NumericalError, UnsupportedModelError


def check_model(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise UnsupportedModelError(f"parameter {name} is on the meta device (not loaded); load the "
                                        f"model's weights before quantizing it")
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        raise UnsupportedModelError("this model is already quantized (it holds QuantLinear layers); "
                                    "quantize the float model instead")


def linear_names(model: nn.Module) -> list[str]:
    """Full names of every quantizable linear, in block and true-sequential order."""
    family = family_of(model)
    return [f"{family.blocks}.{i}.{n}" for i in range(len(get_blocks(model, family))) for n in family.linears]


def check_weights(model: nn.Module, names: list[str]) -> None:
    """NaN/Inf in a weight to be quantized fails here, before any work, naming the layers."""
    bad = [f"{n} ({int((~torch.isfinite(w)).sum())} of {w.numel()} values)"
           for n in names if not bool(torch.isfinite(w := weight_matrix(model.get_submodule(n))).all())]
    if bad:
        raise NumericalError(f"NaN or Inf in the weights of {', '.join(bad[:5])}"
                             f"{f' and {len(bad) - 5} more layers' if len(bad) > 5 else ''}; the model is "
                             f"corrupt (or overflowed when cast): reload it in float32 before quantizing")


def check_config(model: nn.Module, config: QuantConfig) -> list[str]:
    names = linear_names(model)
    if not names:
        raise UnsupportedModelError(f"the model has no {family_of(model).blocks} blocks: nothing to quantize")
    unused = config.unused_overrides(names)
    if unused:
        raise ConfigError(f"override patterns {unused} match no layer; layer names look like {names[0]!r}")
    notes = []
    for name in names:
        k, _ = in_out_features(model.get_submodule(name))
        notes += config.check_layer(name, k)
    return notes


def check_calibration(model: nn.Module, ids: torch.Tensor | None) -> torch.Tensor:
    if ids is None:
        raise CalibrationError("GPTQ needs calibration token ids [n_samples, seqlen]; see "
                               "gptq_lab.data.calibration_windows")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise CalibrationError(f"calibration must be an integer tensor [n_samples, seqlen] of token ids, got "
                               f"{getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}; "
                               f"tokenize with gptq_lab.data.calibration_windows (int64 ids)")
    if ids.numel() == 0:
        raise CalibrationError(f"calibration is empty (shape {tuple(ids.shape)}); pass at least one window "
                               f"of token ids, e.g. gptq_lab.data.calibration_windows(tokenizer, n_samples=128)")
    if ids.device.type == "meta":
        raise CalibrationError("calibration ids are on the meta device, which holds no values; pass real "
                               "token ids (on any device: they are moved to the model's)")
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise CalibrationError(f"token ids must lie in [0, {vocab}); got [{int(ids.min())}, {int(ids.max())}]."
                               f" Was the calibration tokenized with this model's tokenizer?")
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx and ids.shape[1] > ctx:
        raise CalibrationError(f"windows of {ids.shape[1]} tokens exceed the model's context of {ctx}; "
                               f"use seqlen <= {ctx}")
    return ids.long()
