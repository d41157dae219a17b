"""gptq_lab: quantize language models with GPTQ, and see what GPTQ does.

The core API (no notebook dependencies):
    QuantConfig, quantize_model, convert, save, load, QuantLinear, solve, HessianAccumulator
Data and evaluation: ``gptq_lab.data``, ``gptq_lab.eval``.
The notebook objects live in ``gptq_lab.lab``.
"""
__version__ = "0.1.0"   # before the imports: io/format.py records it in checkpoints

from . import data as data  # gptq_lab.data.load_model(...) after a plain `import gptq_lab`
from .config import QuantConfig
from .errors import (
    AssetMissingError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    GPTQLabError,
    NumericalError,
    UnsupportedModelError,
)
from .gptq import GPTQResult, HessianAccumulator, rtn_result, solve
from .io import load, save
from .pipeline import quantize_model
from .qlinear import QuantLinear, convert

__all__ = [  # sorted (ruff RUF022); the core verbs: QuantConfig, quantize_model, convert, save, load
    "AssetMissingError", "CalibrationError", "CheckpointError", "ConfigError", "GPTQLabError",
    "GPTQResult", "HessianAccumulator", "NumericalError", "QuantConfig", "QuantLinear",
    "UnsupportedModelError", "convert", "load", "quantize_model", "rtn_result", "save", "solve",
]
