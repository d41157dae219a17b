"""``load``: build a model from a GPTQ checkpoint (meta-device skeleton, QuantLinear layers,
tensors assigned from memory-mapped safetensors)."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..arch import in_out_features, is_conv1d
from ..config import QuantConfig
from ..errors import CheckpointError
from ..qlinear import CONFIG_ATTR, QuantLinear
from ..quant import pack_qzeros, unpack_qzeros
from .format import FLOAT_DTYPES, INDEX_NAME, parse_quantization_config
from .reader import Entries, checkpoint_root, layer_problems, read_configs, scan, weight_files

_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def load(directory: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float16) -> nn.Module:
    """Build the model from a GPTQ checkpoint: skeleton on the meta device, QuantLinear for each
    layer with a ``qweight``, tensors assigned from memory-mapped safetensors.

    Float weights are cast to ``dtype``; packed buffers keep their format (scales and bias fp16).
    Raises CheckpointError for anything missing, mismatched, corrupt or unsafe.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    root, device = checkpoint_root(directory), torch.device(device)
    files, weight_map = weight_files(root)
    _, qc = read_configs(root)
    config, fmt, skipped = parse_quantization_config(qc)
    entries, index_problems = scan(files, weight_map)
    if index_problems:
        raise CheckpointError(f"{INDEX_NAME} disagrees with the shards: {index_problems[:5]}")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(root), local_files_only=True))
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as e:
        raise CheckpointError(f"transformers cannot build the model of {root}/config.json: {e}; the config "
                              f"is corrupt or names an architecture this transformers does not know") from None
    qlayers = _install_quant_linears(model, entries, config, skipped)
    aliases = _alias_groups(model)
    problems = _model_problems(model, entries, qlayers, aliases)
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(f"checkpoint {root} does not match its config.json:\n  "
                              + "\n  ".join(problems[:12]) + more)
    state = _read_state(model, entries, qlayers, aliases, fmt, dtype, device)
    model.load_state_dict(state, strict=False, assign=True)
    for group in {tuple(g) for g in aliases.values()}:              # re-tie (e.g. lm_head = embed)
        shared = model.get_parameter(next(n for n in group if n in state))
        for name in group:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, shared)
    _materialize_buffers(model, device)
    setattr(model, CONFIG_ATTR, config)
    return model.eval()


def _install_quant_linears(model: nn.Module, entries: Entries, config: QuantConfig,
                           skipped: list[str]) -> dict[str, QuantLinear]:
    qlayers = {}
    for name in sorted(k.removesuffix(".qweight") for k in entries if k.endswith(".qweight")):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"tensor {name}.qweight names no module of this "
                                  f"{model.config.model_type} model; checkpoint and config.json disagree") from None
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise CheckpointError(f"{name}.qweight belongs to a {type(module).__name__}, not a linear layer")
        if any(re.match(p, name) for p in skipped):
            raise CheckpointError(f"{name} has a qweight but quantization_config.dynamic excludes it ('-:')")
        cfg = config.for_module(name)
        k, n = in_out_features(module)
        try:
            layer = QuantLinear(k, n, cfg.bits, cfg.group_size, cfg.sym, module.bias is not None, device="meta")
        except ValueError as e:
            raise CheckpointError(f"{name}: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        qlayers[name] = layer
    return qlayers


def _alias_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> all names of that (tied) parameter, for parameters with several names."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: g for g in by_id.values() if len(g) > 1 for n in g}


def _model_problems(model, entries: Entries, qlayers: dict, aliases: dict) -> list[str]:
    problems = []
    for name, q in qlayers.items():
        problems += layer_problems(name, entries, q.in_features, q.out_features, q.bits, q.group_size,
                                    q.bias is not None)
    expected = model.state_dict()
    for key, t in expected.items():
        if key.rpartition(".")[0] in qlayers:
            continue
        present = [a for a in aliases.get(key, [key]) if a in entries]
        want = "float" if t.is_floating_point() else _DTYPE_NAMES.get(t.dtype, str(t.dtype))
        if not present:
            problems.append(f"{key}: missing (expected {want} {list(t.shape)})")
            continue
        _, shape, dtype = entries[present[0]]
        if shape != list(t.shape) or (dtype not in FLOAT_DTYPES if want == "float" else dtype != want):
            problems.append(f"{key}: expected {want} {list(t.shape)}, found {dtype} {shape}")
    known = set(expected) | {f"{n}.{leaf}" for n in qlayers for leaf in ("qweight", "qzeros", "scales", "g_idx")}
    unexpected = sorted(set(entries) - known)
    orphans: dict[str, list[str]] = {}                  # quantized-layer tensors without their qweight
    for k in unexpected:
        module, _, leaf = k.rpartition(".")
        if leaf in ("qzeros", "scales", "g_idx"):
            orphans.setdefault(module, []).append(leaf)
    problems += [f"{m}.qweight: missing (the layer has {leaves} of a quantized layer but no qweight); the "
                 f"checkpoint is incomplete: re-save or re-copy it" for m, leaves in orphans.items()]
    if unexpected:
        warnings.warn(f"ignoring {len(unexpected)} tensors the model does not use: {unexpected[:5]}", stacklevel=3)
    return problems


def _read_state(model, entries: Entries, qlayers: dict, aliases: dict, fmt: str,
                dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    handles: dict[Path, object] = {}
    state = {}
    for key in model.state_dict():
        if any(a in state for a in aliases.get(key, ())):
            continue
        src = next(a for a in aliases.get(key, [key]) if a in entries)
        path = entries[src][0]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")      # tensors are views of an mmap
        t = handles[path].get_tensor(src)
        module, _, leaf = key.rpartition(".")
        if module in qlayers:
            t = _packed_tensor(key, qlayers[module], leaf, t, fmt)
        elif t.is_floating_point():
            t = t.to(dtype)
        state[key] = t.to(device)
    return state


def _packed_tensor(key: str, layer: QuantLinear, leaf: str, t: torch.Tensor, fmt: str) -> torch.Tensor:
    if leaf == "qzeros" and fmt == "gptq":                           # v1 -> the in-memory true zeros
        zeros = unpack_qzeros(t, layer.bits, layer.out_features, v1=True)
        return pack_qzeros(zeros, layer.bits, v1=False)
    if leaf == "bias":
        return t.to(torch.float16)
    if leaf == "g_idx" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= layer.n_groups):
        raise CheckpointError(f"{key}: values must lie in [0, {layer.n_groups}) (the number of groups), "
                              f"found [{int(t.min())}, {int(t.max())}]; the tensor is corrupt")
    return t


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Recreate buffers that checkpoints do not hold (rotary inv_freq...) on ``device``, with the
    model's own initialisation (as transformers' from_pretrained does); NaN-filled first so an
    architecture whose buffers are not re-initialised is caught, not silently wrong."""
    owners = {}
    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta":
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent)
            fill = float("nan") if buf.is_floating_point() else 0
            owner.register_buffer(leaf, torch.full_like(buf, fill, device=device),
                                  persistent=leaf not in owner._non_persistent_buffers_set)
            owners[parent] = owner
    init = getattr(model, "_init_weights", None)
    with torch.no_grad():
        for parent, owner in owners.items():
            kept = {k: p.detach().clone() for k, p in owner.named_parameters(recurse=False)}
            if init is not None:
                init(owner)
            for k, p in owner.named_parameters(recurse=False):
                p.copy_(kept[k])
            for leaf, buf in owner.named_buffers(recurse=False):
                if buf.is_floating_point() and bool(torch.isnan(buf).any()):
                    raise CheckpointError(f"buffer {parent}.{leaf} of {type(owner).__name__} is not stored in "
                                          f"checkpoints and was not recomputed; io.load cannot build this "
                                          f"architecture yet")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"tensors {left[:5]} were not loaded (still on the meta device)")
