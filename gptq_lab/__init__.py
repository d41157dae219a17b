"""gptq_lab: quantize language models with GPTQ, and see what GPTQ does.

The core API (no notebook dependencies):
    QuantConfig, quantize_model, solve, HessianAccumulator, evaluate_perplexity
The notebook objects live in ``gptq_lab.lab``.
"""
from .config import QuantConfig
from .errors import (AssetMissingError, CalibrationError, CheckpointError, ConfigError, GPTQLabError,
                     NumericalError, UnsupportedModelError)
from .gptq import GPTQResult, HessianAccumulator, rtn_result, solve
from .pipeline import quantize_model

__version__ = "0.1.0"
__all__ = [
    "QuantConfig", "quantize_model", "solve", "rtn_result", "HessianAccumulator", "GPTQResult",
    "GPTQLabError", "ConfigError", "AssetMissingError", "CalibrationError", "NumericalError",
    "UnsupportedModelError", "CheckpointError",
]
