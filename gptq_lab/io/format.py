"""The on-disk names and the ``quantization_config`` dict of a GPTQ checkpoint.

``quantization_config`` <-> QuantConfig (per-module overrides as ``dynamic`` "+:regex" keys,
float layers as "-:" keys, the full QuantConfig in ``meta.gptq_lab_config``), and the tensors
one quantized layer must hold.
"""
from __future__ import annotations

import re

from .. import __version__
from ..config import QuantConfig
from ..errors import CheckpointError, ConfigError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
FORMATS = ("gptq", "gptq_v2")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# QuantConfig field -> quantization_config / dynamic key
_QC_KEYS = {"bits": "bits", "group_size": "group_size", "sym": "sym", "act_order": "desc_act",
            "static_groups": "static_groups", "damp": "damp_percent", "true_sequential": "true_sequential"}


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
    dynamic, meta = qc.get("dynamic") or {}, qc.get("meta") or {}
    if not isinstance(dynamic, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                for k, v in dynamic.items()):
        raise CheckpointError(f"quantization_config.dynamic must map '+:regex'/'-:regex' strings to dicts "
                              f"of fields, got {str(dynamic)[:200]}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"quantization_config.meta must be an object, got {str(meta)[:200]}")
    overrides, skipped = {}, []
    for key, values in dynamic.items():
        if key.startswith("-:"):
            skipped.append(key[2:])
            continue
        inverse = {k: f for f, k in _QC_KEYS.items()}
        overrides[f"^(?:{key.removeprefix('+:')})"] = {inverse[k]: v for k, v in values.items() if k in inverse}
    saved = meta.get("gptq_lab_config")
    try:
        config = QuantConfig.from_dict({**fields, "overrides": overrides})
        if isinstance(saved, dict) and saved and all(saved.get(f) == v for f, v in fields.items()):
            config = QuantConfig.from_dict(saved)      # ours, and consistent: keep it exactly
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"quantization_config is not a valid GPTQ config: {e}") from None
    return config, fmt, skipped


def expected_layer_tensors(k: int, n: int, bits: int, group_size: int, bias: bool) -> dict[str, tuple]:
    """leaf -> (safetensors dtype or None for any float, shape) of one quantized layer."""
    g = -(-k // (k if group_size == -1 else group_size))
    out = {"qweight": ("I32", [k * bits // 32, n]), "qzeros": ("I32", [g, n * bits // 32]),
           "scales": ("F16", [g, n]), "g_idx": ("I32", [k])}
    return {**out, "bias": (None, [n])} if bias else out
