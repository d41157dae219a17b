"""The notebook objects: Calibrator -> Quantizer -> Evaluator, and LayerInspector.

    from gptq_lab.lab import Calibrator, LayerInspector, Quantizer, Evaluator

Each object holds state, calls the engine, and owns its widgets (plotly FigureWidgets built
once and updated in place); each has a plain-text repr, and every figure is also available
as a plain ``plotly.graph_objects.Figure``. Figures are pure functions in ``views``.
Needs the ``lab`` extra (plotly, anywidget, ipywidgets, pandas); the core package does not.
"""
from .calibrator import Calibrator
from .evaluator import Evaluator
from .inspector import LayerInspector
from .quantizer import Quantizer

__all__ = ["Calibrator", "Evaluator", "LayerInspector", "Quantizer"]
