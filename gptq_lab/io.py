"""Save and load the standard GPTQ checkpoint format (safetensors only, never pickles).

    convert(model, results, config); save(model, "out/")     # or save(model, "out/", results)
    model = load("out/", device="cpu", dtype=torch.float16)
    print(format_description(describe_checkpoint("out/")))

On disk: ``model.safetensors`` (or shards + ``model.safetensors.index.json``) holding, per
quantized layer, ``qweight``/``qzeros``/``scales``/``g_idx``[/``bias``] in the layout of
``gptq_lab.kernels.reference``, and the other weights as they are; ``config.json`` with
``quantization_config`` and the same dict in ``quantize_config.json``. Per-module overrides go
to ``dynamic`` ("+:regex" keys, matched with re.match from the module name's start, as
GPTQModel and vLLM read them); layers left in float get "-:" keys. The full QuantConfig also
rides in ``meta.gptq_lab_config`` so it round-trips exactly.

Zero points: ``checkpoint_format="gptq"`` (v1, what transformers/vLLM/TGI read) stores each
zero minus one, so a true zero of 0 (possible with sym=False) cannot be stored. ``save`` then
moves that group's zero to 1 and adds 1 to its codes: exact unless a code was already at the
top (2**bits - 1); those saturate (error of one step) and a warning counts them. Pass
``checkpoint_format="gptq_v2"`` (true zeros; GPTQModel reads it) for a bit-exact file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .arch import in_out_features, is_conv1d
from .config import QuantConfig
from .errors import CheckpointError, ConfigError, UnsupportedModelError
from .pipeline import linear_names
from .qlinear import CONFIG_ATTR, QuantLinear, infer_config, quant_linears
from .quant import maxq, pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
FORMATS = ("gptq", "gptq_v2")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# QuantConfig field -> quantization_config / dynamic key
_QC_KEYS = {"bits": "bits", "group_size": "group_size", "sym": "sym", "act_order": "desc_act",
            "static_groups": "static_groups", "damp": "damp_percent", "true_sequential": "true_sequential"}

# ------------------------------------------------------------ quantization_config <-> QuantConfig


def quantization_config(config: QuantConfig, checkpoint_format: str = "gptq",
                        float_layers: tuple[str, ...] = ()) -> dict:
    """The ``quantization_config`` dict that describes ``config`` to GPTQ readers."""
    qc = {"quant_method": "gptq", **{_QC_KEYS[f]: getattr(config, f) for f in _QC_KEYS},
          "checkpoint_format": checkpoint_format, "lm_head": False, "pack_dtype": "int32"}
    dynamic = {f"+:.*(?:{p})": {_QC_KEYS[f]: v for f, v in values.items()}
               for p, values in config.overrides.items()}
    dynamic.update({f"-:{re.escape(name)}$": {} for name in float_layers})
    if dynamic:
        qc["dynamic"] = dynamic
    qc["meta"] = {"quantizer": [f"gptq_lab:{__version__}"], "gptq_lab_config": config.to_dict()}
    return qc


def parse_quantization_config(qc: dict) -> tuple[QuantConfig, str, list[str]]:
    """quantization_config dict -> (QuantConfig, checkpoint_format, '-:' patterns of float layers)."""
    if qc.get("quant_method", "gptq") != "gptq":
        raise CheckpointError(f"quant_method={qc.get('quant_method')!r}; gptq_lab reads only 'gptq'")
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if fmt not in FORMATS:
        raise CheckpointError(f"checkpoint_format={fmt!r} is not readable; gptq_lab reads {list(FORMATS)}")
    fields = {f: qc[k] for f, k in _QC_KEYS.items() if k in qc}
    if "bits" not in fields:
        raise CheckpointError("quantization_config has no 'bits'; the checkpoint cannot be read")
    overrides, skipped = {}, []
    for key, values in (qc.get("dynamic") or {}).items():
        if key.startswith("-:"):
            skipped.append(key[2:])
            continue
        inverse = {k: f for f, k in _QC_KEYS.items()}
        overrides[f"^(?:{key.removeprefix('+:')})"] = {inverse[k]: v for k, v in values.items() if k in inverse}
    saved = (qc.get("meta") or {}).get("gptq_lab_config")
    try:
        config = QuantConfig.from_dict({**fields, "overrides": overrides})
        if saved and all(saved.get(f) == v for f, v in fields.items()):
            config = QuantConfig.from_dict(saved)      # ours, and consistent: keep it exactly
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"quantization_config is not a valid GPTQ config: {e}") from None
    return config, fmt, skipped


# ------------------------------------------------------------------------------------- save


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

    return _atomic_write(Path(directory), write)


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


def _atomic_write(directory: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a fresh sibling directory, then swap it into ``directory``."""
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        _chmod_per_umask(tmp)                         # mkdtemp made it private (0700)
        _fsync_dir(tmp, files=True)
        if not directory.exists():
            os.rename(tmp, directory)
        elif not _exchange(tmp, directory):           # no renameat2: two renames, old kept on failure
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except OSError:
                os.rename(old, directory)
                raise
            tmp = old
        _fsync_dir(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)        # the failed write, or the old checkpoint
    return directory


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


def _chmod_per_umask(path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)
    for p in path.iterdir():
        os.chmod(p, 0o666 & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_dir(path: Path, files: bool = False) -> None:
    for p in (sorted(path.iterdir()) if files else []):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

# ------------------------------------------------------------------------------------- read

Entries = dict[str, tuple[Path, list[int], str]]     # tensor name -> (file, shape, dtype as "F16")
_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _root(directory: str | os.PathLike) -> Path:
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory; pass the checkpoint's directory")
    return root.resolve()


def _inside(root: Path, path: Path) -> Path:
    real = path.resolve()
    if not real.is_relative_to(root):
        raise CheckpointError(f"{path.name} resolves to {real}, outside {root}; refusing to follow a link out "
                              f"of the checkpoint (copy the file in instead)")
    return real


def _read_json(root: Path, name: str) -> dict:
    path = _inside(root, root / name)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name} in {root} is not readable JSON ({e}); it may be truncated") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} in {root} holds a {type(obj).__name__}, expected a JSON object")
    return obj


def _weight_files(root: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files to read (and the index's weight_map, if sharded)."""
    weight_map = None
    if (root / INDEX_NAME).exists():
        weight_map = _read_json(root, INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{INDEX_NAME} has no 'weight_map' object; re-save the checkpoint")
        missing = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if missing:
            raise CheckpointError(f"{INDEX_NAME} lists shards that are not in {root}: {missing}; the copy is "
                                  f"incomplete")
        files = [root / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{root} holds only pickle weight files ({', '.join(pickles[:3])}) and no safetensors. "
                f"gptq_lab never unpickles: loading a pickle can run arbitrary code. Convert it to "
                f"safetensors with a tool you trust, in a sandbox, and load that.")
        raise CheckpointError(f"{root} holds no *.safetensors weights (it has "
                              f"{sorted(p.name for p in root.iterdir())[:8]})")
    return [_inside(root, f) for f in files], weight_map


def _read_configs(root: Path) -> tuple[dict, dict]:
    """(config.json dict, quantization_config dict), falling back to quantize_config.json."""
    if not (root / "config.json").exists():
        raise CheckpointError(f"{root} has no config.json; the model config is needed to build the model")
    hf = _read_json(root, "config.json")
    qc = hf.get("quantization_config")
    if qc is None and (root / QUANTIZE_CONFIG_NAME).exists():
        qc = _read_json(root, QUANTIZE_CONFIG_NAME)
    if not isinstance(qc, dict):
        raise CheckpointError(f"{root}: config.json has no quantization_config and there is no "
                              f"{QUANTIZE_CONFIG_NAME}; not a GPTQ checkpoint (load float ones with transformers)")
    return hf, qc


def _scan(files: list[Path], weight_map: dict | None) -> tuple[Entries, list[str]]:
    """Tensor names, shapes and dtypes from the headers (no data read); index disagreements."""
    entries: Entries = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if key in entries:
                        raise CheckpointError(f"tensor {key} is in both {entries[key][0].name} and {path.name}")
                    sl = f.get_slice(key)
                    entries[key] = (path, list(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path.name} is not a readable safetensors file ({e}); it is truncated "
                                  f"or corrupt: re-save or re-copy it") from None
    problems = []
    for key, fname in (weight_map or {}).items():
        if key not in entries or entries[key][0].name != fname:
            found = entries[key][0].name if key in entries else "no file"
            problems.append(f"index maps {key} to {fname}, found in {found}")
    return entries, problems


def expected_layer_tensors(k: int, n: int, bits: int, group_size: int, bias: bool) -> dict[str, tuple]:
    """leaf -> (safetensors dtype or None for any float, shape) of one quantized layer."""
    g = -(-k // (k if group_size == -1 else group_size))
    out = {"qweight": ("I32", [k * bits // 32, n]), "qzeros": ("I32", [g, n * bits // 32]),
           "scales": ("F16", [g, n]), "g_idx": ("I32", [k])}
    return {**out, "bias": (None, [n])} if bias else out


def _layer_problems(name: str, entries: Entries, k: int, n: int, bits: int, group_size: int,
                    bias: bool) -> list[str]:
    spec = f"in_features={k}, out_features={n}, bits={bits}, group_size={group_size}"
    problems = []
    for leaf, (dtype, shape) in expected_layer_tensors(k, n, bits, group_size, bias).items():
        key = f"{name}.{leaf}"
        if key not in entries:
            problems.append(f"{key}: missing (expected {dtype or 'float'} {shape} for {spec})")
            continue
        _, actual, actual_dtype = entries[key]
        if actual != shape or (actual_dtype != dtype if dtype else actual_dtype not in FLOAT_DTYPES):
            hint = ""
            if leaf == "qweight" and len(actual) == 2 and actual[0] * 32 != k * bits:
                hint = f"; that is {actual[0] * 32 / k:g} bits per code, the config says bits={bits}"
            problems.append(f"{key}: expected {dtype or 'float'} {shape} ({spec}), found {actual_dtype} "
                            f"{actual}{hint}")
    return problems

# ------------------------------------------------------------------------------------- load


def load(directory: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float16) -> nn.Module:
    """Build the model from a GPTQ checkpoint: skeleton on the meta device, QuantLinear for each
    layer with a ``qweight``, tensors assigned from memory-mapped safetensors.

    Float weights are cast to ``dtype``; packed buffers keep their format (scales and bias fp16).
    Raises CheckpointError for anything missing, mismatched, corrupt or unsafe.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    root, device = _root(directory), torch.device(device)
    files, weight_map = _weight_files(root)
    _, qc = _read_configs(root)
    config, fmt, skipped = parse_quantization_config(qc)
    entries, index_problems = _scan(files, weight_map)
    if index_problems:
        raise CheckpointError(f"{INDEX_NAME} disagrees with the shards: {index_problems[:5]}")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(root), local_files_only=True))
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"transformers cannot build the model of {root}/config.json: {e}") from None
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
        problems += _layer_problems(name, entries, q.in_features, q.out_features, q.bits, q.group_size,
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

# ------------------------------------------------------------------------------------- inspect


def describe_checkpoint(directory: str | os.PathLike) -> dict:
    """What a checkpoint holds and whether it is self-consistent, without building the model.

    Keys: directory, size_on_disk (bytes), n_files, format, bits, group_size, desc_act, sym,
    overrides, model_type, n_quantized_layers, layers_by_bits, checks (list of {check, ok,
    detail}), ok.
    """
    root = _root(directory)
    on_disk = [p for p in root.iterdir() if p.is_file()]
    d = {"directory": str(root), "size_on_disk": sum(p.stat().st_size for p in on_disk),
         "n_files": len(on_disk), "checks": []}

    def check(name: str, problems: list[str], ok_detail: str = "") -> None:
        d["checks"].append({"check": name, "ok": not problems, "detail": "; ".join(problems[:5]) or ok_detail})

    try:
        files, weight_map = _weight_files(root)
        hf, qc = _read_configs(root)
        config, fmt, _ = parse_quantization_config(qc)
        entries, index_problems = _scan(files, weight_map)
    except CheckpointError as e:
        check("readable", [str(e)])
        d["ok"] = False
        return d
    check("readable", [], f"{len(files)} safetensors file(s), {len(entries)} tensors")
    d.update(format=fmt, bits=config.bits, group_size=config.group_size, desc_act=config.act_order,
             sym=config.sym, overrides=config.overrides, model_type=hf.get("model_type"))
    layers = sorted(k.removesuffix(".qweight") for k in entries if k.endswith(".qweight"))
    shape_problems, zero_problems, gidx_problems, by_bits = [], [], [], {}
    for name in layers:
        cfg = config.for_module(name)
        by_bits[cfg.bits] = by_bits.get(cfg.bits, 0) + 1
        problems = _describe_layer(name, entries, cfg, fmt, zero_problems, gidx_problems)
        shape_problems += problems
    d.update(n_quantized_layers=len(layers), layers_by_bits=by_bits)
    check("tensor shapes and dtypes match the config", shape_problems, f"{len(layers)} layers")
    check("zero points match sym", zero_problems)
    check("g_idx in range and consistent with desc_act", gidx_problems)
    check("shard index matches the files", index_problems)
    if (root / QUANTIZE_CONFIG_NAME).exists() and "quantization_config" in hf:
        other = _read_json(root, QUANTIZE_CONFIG_NAME)
        check(f"{QUANTIZE_CONFIG_NAME} agrees with config.json",
              [f"{k}: {qc.get(k)!r} vs {other.get(k)!r}" for k in ("bits", "group_size", "sym", "desc_act",
                                                                   "checkpoint_format") if qc.get(k) != other.get(k)])
    d["ok"] = all(c["ok"] for c in d["checks"])
    return d


def _describe_layer(name: str, entries: Entries, cfg: QuantConfig, fmt: str,
                    zero_problems: list[str], gidx_problems: list[str]) -> list[str]:
    qweight = entries[f"{name}.qweight"]
    g_idx = entries.get(f"{name}.g_idx")
    k = g_idx[1][0] if g_idx and g_idx[1] else qweight[1][0] * 32 // cfg.bits
    n = qweight[1][1] if len(qweight[1]) == 2 else 0
    problems = _layer_problems(name, entries, k, n, cfg.bits, cfg.group_size, f"{name}.bias" in entries)
    if problems:
        return problems
    with safe_open(str(entries[f"{name}.qzeros"][0]), framework="pt") as f:
        zeros = unpack_qzeros(f.get_tensor(f"{name}.qzeros"), cfg.bits, n, v1=fmt == "gptq")
    with safe_open(str(g_idx[0]), framework="pt") as f:
        gi = f.get_tensor(f"{name}.g_idx")
    mid = 1 << (cfg.bits - 1)
    if cfg.sym and bool((zeros != mid).any()):
        zero_problems.append(f"{name}: sym=true but zero points range over [{int(zeros.min())}, "
                             f"{int(zeros.max())}] instead of all {mid}")
    groups = zeros.shape[1]
    if int(gi.min()) < 0 or int(gi.max()) >= groups:
        gidx_problems.append(f"{name}: g_idx values [{int(gi.min())}, {int(gi.max())}] outside [0, {groups})")
    elif not cfg.act_order and cfg.group_size != -1 and not torch.equal(gi, torch.arange(k) // cfg.group_size):
        gidx_problems.append(f"{name}: desc_act=false but g_idx is permuted; kernels that ignore g_idx "
                             f"without desc_act (vLLM exllama/marlin) would compute wrong outputs")
    return []


def format_description(d: dict) -> str:
    """describe_checkpoint's dict as readable text (for ``gptq-lab inspect DIR``)."""
    lines = [f"GPTQ checkpoint {d['directory']}"]
    if "format" in d:
        fmt_note = "v1, zero points stored minus one" if d["format"] == "gptq" else "v2, true zero points"
        mixed = ", ".join(f"{b}-bit x {c}" for b, c in sorted(d["layers_by_bits"].items()))
        rows = [("model type", d["model_type"]), ("format", f"{d['format']} ({fmt_note})"),
                ("bits", f"{d['bits']}  (layers: {mixed or 'none'})"),
                ("group size", "per-channel" if d["group_size"] == -1 else d["group_size"]),
                ("act-order", "yes" if d["desc_act"] else "no"), ("symmetric", "yes" if d["sym"] else "no"),
                ("overrides", d["overrides"] or "none"), ("quantized", f"{d['n_quantized_layers']} layers")]
        lines += [f"  {k:<13}{v}" for k, v in rows]
    lines.append(f"  {'size on disk':<13}{d['size_on_disk'] / 1e6:.2f} MB in {d['n_files']} files")
    n_ok = sum(c["ok"] for c in d["checks"])
    lines.append(f"  {'checks':<13}{n_ok}/{len(d['checks'])} passed")
    lines += [f"    [{'ok' if c['ok'] else 'FAIL'}] {c['check']}" + (f": {c['detail']}" if c["detail"] else "")
              for c in d["checks"]]
    return "\n".join(lines)
