"""Reading a checkpoint's files without building the model: configs, safetensors headers,
and the checks on them that ``load`` and ``describe_checkpoint`` share. Never unpickles."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .format import (
    FLOAT_DTYPES,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    QUANTIZE_CONFIG_NAME,
    expected_layer_tensors,
)

Entries = dict[str, tuple[Path, list[int], str]]     # tensor name -> (file, shape, dtype as "F16")


def checkpoint_root(directory: str | os.PathLike) -> Path:
    """The checkpoint directory, resolved; CheckpointError if it is not a directory."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory; pass the checkpoint's directory")
    return root.resolve()


def _inside(root: Path, path: Path) -> Path:
    """``path`` resolved, refusing links that lead out of ``root``."""
    real = path.resolve()
    if not real.is_relative_to(root):
        raise CheckpointError(f"{path.name} resolves to {real}, outside {root}; refusing to follow a link out "
                              f"of the checkpoint (copy the file in instead)")
    return real


def read_json(root: Path, name: str) -> dict:
    """The JSON object in ``root / name``; CheckpointError if unreadable or not an object."""
    path = _inside(root, root / name)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name} in {root} is not readable JSON ({e}); it may be truncated") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} in {root} holds a {type(obj).__name__}, expected a JSON object")
    return obj


def weight_files(root: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files to read (and the index's weight_map, if sharded)."""
    weight_map = None
    if (root / INDEX_NAME).exists():
        weight_map = read_json(root, INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{INDEX_NAME} has no 'weight_map' object; re-save the checkpoint")
        unsafe = sorted({str(f) for f in weight_map.values() if not str(f).endswith(".safetensors")})
        if unsafe:
            raise CheckpointError(f"{INDEX_NAME} maps tensors to {unsafe[:3]}, which are not .safetensors "
                                  f"files; gptq_lab reads only safetensors and never unpickles")
        missing = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if missing:
            raise CheckpointError(f"{INDEX_NAME} lists shards that are not in {root}: {missing}; the copy is "
                                  f"incomplete")
        files = [root / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(root.glob("*.safetensors"))
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if files and pickles:
        warnings.warn(f"{root} also holds pickle files ({', '.join(pickles[:3])}); they are ignored, never "
                      f"unpickled (loading a pickle can run arbitrary code): only safetensors are read",
                      stacklevel=3)
    if not files:
        if pickles:
            raise CheckpointError(
                f"{root} holds only pickle weight files ({', '.join(pickles[:3])}) and no safetensors. "
                f"gptq_lab never unpickles: loading a pickle can run arbitrary code. Convert it to "
                f"safetensors with a tool you trust, in a sandbox, and load that.")
        raise CheckpointError(f"{root} holds no *.safetensors weights (it has "
                              f"{sorted(p.name for p in root.iterdir())[:8]})")
    return list(dict.fromkeys(_inside(root, f) for f in files)), weight_map     # a link in: read once


def read_configs(root: Path) -> tuple[dict, dict]:
    """(config.json dict, quantization_config dict), falling back to quantize_config.json."""
    if not (root / "config.json").exists():
        raise CheckpointError(f"{root} has no config.json; the model config is needed to build the model")
    hf = read_json(root, "config.json")
    qc = hf.get("quantization_config")
    if qc is None and (root / QUANTIZE_CONFIG_NAME).exists():
        qc = read_json(root, QUANTIZE_CONFIG_NAME)
    if not isinstance(qc, dict):
        raise CheckpointError(f"{root}: config.json has no quantization_config and there is no "
                              f"{QUANTIZE_CONFIG_NAME}; not a GPTQ checkpoint (load float ones with transformers)")
    return hf, qc


def scan(files: list[Path], weight_map: dict | None) -> tuple[Entries, list[str]]:
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


def layer_problems(name: str, entries: Entries, k: int, n: int, bits: int, group_size: int,
                   bias: bool) -> list[str]:
    """What is missing or mis-shaped among one quantized layer's tensors (empty: all fine)."""
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
