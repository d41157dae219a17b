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

Modules: ``format`` (names on disk, quantization_config <-> QuantConfig, expected layer
tensors), ``writer`` (save), ``reader`` (configs and safetensors headers, shared checks),
``loader`` (load), ``describe`` (describe_checkpoint, format_description). The directory is
written through ``gptq_lab.atomic``.
"""
from .describe import describe_checkpoint, format_description
from .format import (
    FLOAT_DTYPES,
    FORMATS,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    QUANTIZE_CONFIG_NAME,
    WEIGHTS_NAME,
    expected_layer_tensors,
    parse_quantization_config,
    quantization_config,
)
from .loader import load
from .reader import Entries
from .writer import checkpoint_tensors, save

__all__ = [
    "FLOAT_DTYPES", "FORMATS", "INDEX_NAME", "PICKLE_SUFFIXES", "QUANTIZE_CONFIG_NAME", "WEIGHTS_NAME",
    "Entries", "checkpoint_tensors", "describe_checkpoint", "expected_layer_tensors",
    "format_description", "load", "parse_quantization_config", "quantization_config", "save",
]
