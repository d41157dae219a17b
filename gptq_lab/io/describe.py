"""``describe_checkpoint``: what a checkpoint holds and whether it is self-consistent, without
building the model; ``format_description`` renders that as text (``gptq-lab inspect``)."""
from __future__ import annotations

import os

import torch
from safetensors import safe_open

from ..config import QuantConfig
from ..errors import CheckpointError
from ..quant import unpack_qzeros
from .format import QUANTIZE_CONFIG_NAME, parse_quantization_config
from .reader import (
    Entries,
    checkpoint_root,
    layer_problems,
    read_configs,
    read_json,
    scan,
    weight_files,
)


def describe_checkpoint(directory: str | os.PathLike) -> dict:
    """What a checkpoint holds and whether it is self-consistent, without building the model.

    Keys: directory, size_on_disk (bytes), n_files, format, bits, group_size, desc_act, sym,
    overrides, model_type, n_quantized_layers, layers_by_bits, checks (list of {check, ok,
    detail}), ok.
    """
    root = checkpoint_root(directory)
    on_disk = [p for p in root.iterdir() if p.is_file()]
    d = {"directory": str(root), "size_on_disk": sum(p.stat().st_size for p in on_disk),
         "n_files": len(on_disk), "checks": []}

    def check(name: str, problems: list[str], ok_detail: str = "") -> None:
        d["checks"].append({"check": name, "ok": not problems, "detail": "; ".join(problems[:5]) or ok_detail})

    try:
        files, weight_map = weight_files(root)
        hf, qc = read_configs(root)
        config, fmt, _ = parse_quantization_config(qc)
        entries, index_problems = scan(files, weight_map)
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
        other = read_json(root, QUANTIZE_CONFIG_NAME)
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
    problems = layer_problems(name, entries, k, n, cfg.bits, cfg.group_size, f"{name}.bias" in entries)
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
