"""Small helpers shared by the notebook objects: in-place figure refresh, progress, display.

Figures: an object builds ``go.FigureWidget(view(...))`` once, then ``refresh(widget,
view(...))`` copies the new figure's trace data and titles into it inside one
``batch_update`` (one message to the browser, no flicker, no new output).

Progress: ``Progress(progress, bar=..., label=...)`` turns the objects' ``progress=``
argument into an engine callback ``(done, total, message)``: ``True`` updates the object's
own progress widget in a notebook and prints a tqdm bar elsewhere; ``False`` is silent; a
callable is called as is (so an exception it raises interrupts the run).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import plotly.graph_objects as go

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

_TRACE_SKIP = {"type", "uid"}


def in_notebook() -> bool:
    """True inside a Jupyter kernel (widgets can render), False in scripts, tests and IPython."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and type(shell).__name__ == "ZMQInteractiveShell"


def figure_widget(fig: go.Figure) -> go.FigureWidget:
    return go.FigureWidget(fig)


def refresh(widget: go.FigureWidget, fig: go.Figure) -> None:
    """Copy ``fig``'s traces and titles into ``widget`` in one batch_update."""
    with widget.batch_update():
        if len(widget.data) != len(fig.data) or any(
                a.type != b.type for a, b in zip(widget.data, fig.data)):
            widget.data = []
            widget.add_traces(list(fig.data))
        else:
            for old, new in zip(widget.data, fig.data):
                old.update({k: v for k, v in new.to_plotly_json().items() if k not in _TRACE_SKIP})
        widget.layout.title = fig.layout.title
        if fig.layout.annotations:
            widget.layout.annotations = fig.layout.annotations
        if fig.layout.height:
            widget.layout.height = fig.layout.height


class Progress:
    """The engine callback for a ``progress=`` argument (see module docstring)."""

    def __init__(self, progress, desc: str = "", bar=None, label=None):
        self.user: Callable | None = progress if callable(progress) else None
        self.enabled = bool(progress)
        self.bar, self.label, self.desc = bar, label, desc
        self._tqdm = None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self.user is not None:
            self.user(done, total, message)
            return
        if not self.enabled:
            return
        if self.bar is not None and in_notebook():
            self.bar.max, self.bar.value = total, done
            if self.label is not None:
                self.label.value = f"{self.desc}: {done}/{total} {message}"
            return
        if self._tqdm is None:
            if in_notebook():                      # no widget of our own: one tqdm widget
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm
            self._tqdm = tqdm(total=total, desc=self.desc, file=sys.stderr, leave=True)
        self._tqdm.n = done
        self._tqdm.set_postfix_str(message, refresh=False)
        self._tqdm.refresh()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cell() -> int | None:
    """The running cell's execution count (None outside IPython)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return getattr(shell, "execution_count", None) if shell else None


def shown_in_this_cell(obj) -> bool:
    """True if ``show(obj)`` already ran in the cell being executed."""
    cell = _cell()
    return cell is not None and getattr(obj, "_shown_in_cell", None) == cell


def show(obj) -> None:
    """Display ``obj.widget`` in a notebook, at most once per cell: a method that shows its
    live view (``Quantizer.run``) and returns the object would otherwise show it twice, once
    itself and once through the cell's result (``_ipython_display_``)."""
    if shown_in_this_cell(obj):
        return
    from IPython.display import display
    display(obj.widget)
    obj._shown_in_cell = _cell()


def ipython_display(obj) -> None:
    """The objects' ``_ipython_display_``: the widget in a notebook, the text repr elsewhere."""
    show(obj) if in_notebook() else print(repr(obj))
