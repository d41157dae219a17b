"""``save``: write a model as a GPTQ checkpoint directory, atomically (see gptq_lab.io)."""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_dir
from ..checks import linear_names
from ..config import QuantConfig
from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from ..fuse import is_fused
from ..qlinear import CONFIG_ATTR, QuantLinear, infer_config, quant_linears
from ..quant import maxq, pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from .format import FORMATS, INDEX_NAME, QUANTIZE_CONFIG_NAME, WEIGHTS_NAME, quantization_config


def save(model: nn.Module, directory: str | os.PathLike, results: dict | None = None, *,
         config: QuantConfig | None = None, tokenizer=None, max_shard_size: int | str = "2GB",
         checkpoint_format: str = "gptq") -> Path:
    """Write ``model`` as a GPTQ checkpoint in ``directory``, atomically; return the path.

    The model is either converted (holds QuantLinear layers) or float with ``results`` from
    quantize_model (packed here; the model is not modified). ``config`` defaults to the one
    recorded by convert, else one inferred from the results. An existing checkpoint in
    ``directory`` is replaced only once the new one is complete.
    """
    if checkpoint_format not in FORMATS:
        raise ConfigError(f"checkpoint_format={checkpoint_format!r}; use 'gptq' (v1, widely read) "
                          f"or 'gptq_v2' (true zero points)")
    if is_fused(model):
        raise UnsupportedModelError(
            "cannot save a fused model (prepare_model(fuse=True) or fuse_model): its q/k/v and "
            "gate/up layers were merged, so its names no longer match the checkpoint format; save "
            "before fusing, or reload the checkpoint (gptq_lab.load)")
    layers = quant_linears(model)
    for name, result in (results or {}).items():
        if name not in layers:
            layers[name] = QuantLinear.from_result(result, model.get_submodule(name).bias, device="cpu")
    if not layers:
        raise CheckpointError("the model holds no QuantLinear and no results were given: nothing is "
                              "quantized. Run quantize_model, then convert(model, results) or pass results=")
    config = config or getattr(model, CONFIG_ATTR, None) or infer_config(layers)
    tensors = checkpoint_tensors(model, layers, checkpoint_format)
    qc = quantization_config(config, checkpoint_format, _float_layers(model, layers))
    hf_config = {**model.config.to_dict(), "quantization_config": qc}

    def write(tmp: Path) -> None:
        _write_shards(tensors, tmp, _parse_size(max_shard_size))
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / QUANTIZE_CONFIG_NAME, qc)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    directory = Path(directory)
    _check_replaceable(directory)
    return atomic_dir(directory, write)


def checkpoint_tensors(model: nn.Module, layers: dict[str, QuantLinear], fmt: str) -> dict[str, torch.Tensor]:
    """The state dict to write: tied weights once, quantized layers packed in ``fmt``."""
    out, seen = {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        module = key.rpartition(".")[0]
        if module in layers:
            if f"{module}.qweight" not in out:
                out.update({f"{module}.{k}": v for k, v in _layer_tensors(module, layers[module], fmt).items()})
        elif id(t) not in seen:
            seen.add(id(t))
            out[key] = t.detach()
    return {k: v.cpu().contiguous() for k, v in out.items()}


def _layer_tensors(name: str, layer: QuantLinear, fmt: str) -> dict[str, torch.Tensor]:
    tensors = {k: v.detach().cpu() for k, v in layer.state_dict().items()}
    if fmt == "gptq":
        tensors["qweight"], tensors["qzeros"] = _v1_tensors(name, layer)
    return tensors


def _v1_tensors(name: str, layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, qzeros) with zeros stored minus one; true zeros of 0 moved to 1 (see module doc)."""
    bits, top = layer.bits, maxq(layer.bits)
    qweight = layer.qweight.cpu()
    zeros = unpack_qzeros(layer.qzeros.cpu(), bits, layer.out_features, v1=False)   # [N, G]
    if bool((zeros == 0).any()):
        codes = unpack_qweight(qweight, bits, layer.in_features)                    # [N, K]
        hit = (zeros == 0)[:, layer.g_idx.cpu().long()]                             # [N, K]
        saturated = int((hit & (codes == top)).sum())
        qweight = pack_qweight(torch.where(hit, (codes + 1).clamp(max=top), codes), bits)
        warnings.warn(f"{name}: {int((zeros == 0).sum())} groups have zero point 0, which the v1 'gptq' "
                      f"format cannot store; moved to 1 with codes shifted ({saturated} weights saturated "
                      f"by one step). Save with checkpoint_format='gptq_v2' for a bit-exact file.",
                      stacklevel=5)
        zeros = zeros.clamp(min=1)
    return qweight, pack_qzeros(zeros, bits, v1=True)


def _float_layers(model: nn.Module, layers: dict) -> tuple[str, ...]:
    """The family's linears that stay float (written as '-:' dynamic entries)."""
    try:
        return tuple(n for n in linear_names(model) if n not in layers)
    except UnsupportedModelError:
        return ()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?I?B)\s*", str(size).upper())
    if not m or m.group(2) not in units:
        raise ConfigError(f"max_shard_size={size!r} is not a size; use bytes or e.g. '2GB', '500MB', '1GiB'")
    return int(float(m.group(1)) * units[m.group(2)])


def _write_shards(tensors: dict[str, torch.Tensor], tmp: Path, limit: int) -> None:
    shards, size = [{}], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards, size = shards + [{}], 0
        shards[-1][key], size = t, size + nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _check_replaceable(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory; choose another path")
    entries = list(directory.iterdir())
    looks_like_checkpoint = (directory / "config.json").is_file() and any(
        p.suffix == ".safetensors" for p in entries)
    if entries and (not looks_like_checkpoint or any(p.is_dir() for p in entries)):
        raise CheckpointError(f"refusing to replace {directory}: it is not empty and does not look like a "
                              f"model checkpoint (holds {sorted(p.name for p in entries)[:5]}); save to a "
                              f"new or empty directory")
