"""gptq_lab's own error types. Every expected failure raises one of these."""


class GPTQLabError(Exception):
    """Base class: anything gptq_lab refuses on purpose."""


class ConfigError(GPTQLabError, ValueError):
    """A QuantConfig, a CLI option or a packing argument holds a value that cannot work."""


class AssetMissingError(GPTQLabError, FileNotFoundError):
    """A demo asset is not in the cache; the message names the command that fetches it."""


class CalibrationError(GPTQLabError, ValueError):
    """Calibration data that cannot be used (empty, too short, bad token ids...)."""


class NumericalError(GPTQLabError, ArithmeticError):
    """NaN/Inf, or a Hessian that stays singular after damping escalation."""


class UnsupportedModelError(GPTQLabError, ValueError):
    """A model family with no known block layout, or a model in an unusable state."""


class CheckpointError(GPTQLabError, ValueError):
    """A checkpoint that is missing, corrupt, inconsistent or unsafe."""


class ExtraMissingError(GPTQLabError, ImportError):
    """An optional extra is not installed; the message names the pip command."""


class TaskDataError(GPTQLabError, FileNotFoundError):
    """An evaluation task whose data cannot be read (hub offline, missing local file)."""
