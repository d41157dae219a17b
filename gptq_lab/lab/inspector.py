"""LayerInspector: one linear's Hessian, weights and GPTQ solution, re-solved live.

    insp = LayerInspector(model, calibrator, "model.layers.3.mlp.down_proj")
    insp                         # in a notebook: controls + six live figures
    insp.set(bits=3, act_order=True)
    insp.figure("spectrum")      # a plain go.Figure
    print(insp)                  # text summary

The layer's weight and Hessian live in a ``hessians.CachedLayer``: changing bits, group
size or sym re-runs only the GPTQ column loop; changing damp or act-order also refactors
the inverse Hessian (cached per value). Every figure is updated in place.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import ipywidgets as W
import plotly.graph_objects as go
import torch
from torch import nn

from ..arch import weight_matrix
from ..config import QuantConfig
from ..gptq import GPTQResult
from ..hessians import CachedLayer, constant_shift_share
from . import views
from .widgets import figure_widget, ipython_display, refresh

FIGURES = ("spectrum", "diagonal", "weights", "column_error", "scales", "act_order")
GROUP_SIZES = (-1, 32, 64, 128, 256)
_CONTROLS = ("bits", "group_size", "sym", "act_order", "damp")


class LayerInspector:
    """Inspect and re-solve one linear layer of ``model`` from cached Hessians.

    hessians: a Calibrator (collected on first use if needed) or {full_name: H [K, K]}.
    layer: full module name (default: the first layer with a Hessian).
    config: the starting QuantConfig (overrides for the layer are resolved).
    """

    def __init__(self, model: nn.Module, hessians, layer: str | None = None,
                 config: QuantConfig | None = None, keep_layers: int = 4):
        self.model = model
        self._source = hessians
        self.config = (config or QuantConfig())
        self._layers: OrderedDict[str, CachedLayer] = OrderedDict()
        self._keep = keep_layers
        self._widgets: dict[str, go.FigureWidget] = {}
        self._widget = None
        self.timings: dict[str, float] = {}
        names = self.layers
        if not names:
            raise ValueError("no Hessians to inspect; collect them first (Calibrator.collect(model))")
        self.select(layer or names[0])

    # ------------------------------------------------------------------ state
    @property
    def hessians(self) -> dict[str, torch.Tensor]:
        src = self._source
        if isinstance(src, dict):
            return src
        if getattr(src, "hessians", None) is None:
            src.collect(self.model)
        return src.hessians

    @property
    def layers(self) -> list[str]:
        return list(self.hessians)

    @property
    def cached(self) -> CachedLayer:
        return self._layers[self.layer]

    def select(self, layer: str) -> LayerInspector:
        """Inspect another layer (its weight and Hessian are cached, up to ``keep_layers``)."""
        if layer not in self.hessians:
            raise KeyError(f"no Hessian for {layer!r}; known layers look like {self.layers[:3]}")
        if layer not in self._layers:
            weight = weight_matrix(self.model.get_submodule(layer)).detach()
            self._layers[layer] = CachedLayer(weight, self.hessians[layer], cache_size=8)
            while len(self._layers) > self._keep:
                self._layers.popitem(last=False)
        self._layers.move_to_end(layer)
        before, self.layer = getattr(self, "layer", None), layer
        try:
            self._update()
        except Exception:
            if before is not None and before != layer:
                self.layer = before
            raise
        return self

    def set(self, **changes) -> LayerInspector:
        """Change any QuantConfig field (bits, group_size, sym, act_order, damp, ...), re-solve,
        update the figures and the controls."""
        before, self.config = self.config, self.config.replace(**changes)
        try:
            self._update()
        except Exception:
            self.config = before
            raise
        return self

    @property
    def layer_config(self) -> QuantConfig:
        """The config for this layer (overrides resolved; checked against its width)."""
        self.config.check_layer(self.layer, self.cached.weight.shape[1])
        return self.config.for_module(self.layer)

    @property
    def result(self) -> GPTQResult:
        return self.cached.solve(self.layer_config)

    @property
    def rtn(self) -> GPTQResult:
        return self.cached.rtn(self.layer_config)

    def _update(self) -> None:
        t0 = time.perf_counter()
        result, rtn = self.result, self.rtn
        t1 = time.perf_counter()
        self._errors = (self.cached.output_error(result), self._rtn_error(rtn))
        t2 = time.perf_counter()
        if self._widget is not None:
            for key, fw in self._widgets.items():
                deps = self._depends(key, result)
                if self._drawn.get(key) != deps:          # skip figures whose inputs did not change
                    refresh(fw, self.figure(key))
                    self._drawn[key] = deps
            self._sync_controls()
        t3 = time.perf_counter()
        self.timings = {"solve_s": t1 - t0, "error_s": t2 - t1, "figures_s": t3 - t2, "total_s": t3 - t0}

    def _depends(self, key: str, result: GPTQResult) -> tuple:
        """What figure ``key`` shows depends on: the layer and the config (which fixes the result)."""
        if key == "diagonal":
            return (self.layer,)
        if key == "spectrum":
            return (self.layer, result.damp_used)
        if key == "act_order":
            return (self.layer, result.perm is not None)
        return (self.layer, self.layer_config)

    def _rtn_error(self, rtn: GPTQResult) -> torch.Tensor:
        key = ("rtn_error", self.layer, rtn.bits, rtn.group_size, rtn.sym)
        cache = self.cached._results
        if key not in cache:
            cache[key] = self.cached.output_error(rtn)
        return cache[key]

    # ------------------------------------------------------------------ figures
    def figure(self, which: str) -> go.Figure:
        """A plain go.Figure: one of "spectrum", "diagonal", "weights", "column_error",
        "scales", "act_order"."""
        c, r, name = self.cached, self.result, self._short()
        if which == "spectrum":
            return views.spectrum_figure(c.spectrum(), r.damp_used, c.condition_number(r.damp_used),
                                         int(c.dead.sum()), name)
        if which == "diagonal":
            absmax = getattr(self._source, "absmax", None) or {}
            return views.hessian_diagonal_figure(torch.diag(c.hessian), absmax.get(self.layer), name)
        if which == "weights":
            return views.weight_error_figure(c.weight, r.dequantize(), name=name)
        if which == "column_error":
            return views.column_error_figure(*self._errors, name=name)
        if which == "scales":
            return views.group_scales_figure(r.scales, name=name)
        if which == "act_order":
            return views.act_order_figure(r.perm, torch.diag(c.hessian), name)
        raise ValueError(f"unknown figure {which!r}; choose from {FIGURES}")

    def figures(self) -> dict[str, go.Figure]:
        return {k: self.figure(k) for k in FIGURES}

    def _short(self) -> str:
        return f"({self.layer})"

    # ------------------------------------------------------------------ widget
    @property
    def controls(self) -> dict[str, W.Widget]:
        _ = self.widget                                   # builds the controls on first access
        return self._controls

    @property
    def widget(self) -> W.Widget:
        if self._widget is None:
            self._widget = self._build()
        return self._widget

    def _build(self) -> W.Widget:
        cfg = self.config
        style = {"continuous_update": False}
        self._controls = {
            "layer": W.Dropdown(options=self.layers, value=self.layer, description="layer",
                                layout=W.Layout(width="380px")),
            "bits": W.Dropdown(options=[2, 3, 4, 8], value=cfg.bits, description="bits"),
            "group_size": W.Dropdown(options=sorted(set(GROUP_SIZES) | {cfg.group_size}),
                                     value=cfg.group_size, description="group size"),
            "sym": W.Checkbox(value=cfg.sym, description="sym"),
            "act_order": W.Checkbox(value=cfg.act_order, description="act-order"),
            "damp": W.FloatLogSlider(value=max(cfg.damp, 1e-4), base=10, min=-4, max=0, step=0.25,
                                     description="damp", readout_format=".4f", **style),
        }
        self._status = W.HTML()
        self._widgets = {k: figure_widget(self.figure(k)) for k in FIGURES}
        self._drawn = {k: self._depends(k, self.result) for k in FIGURES}
        self._controls["layer"].observe(self._on_control("layer"), names="value")
        for name in _CONTROLS:
            self._controls[name].observe(self._on_control(name), names="value")
        c = self._controls
        rows = [W.HBox([c["layer"], c["bits"], c["group_size"]]),
                W.HBox([c["sym"], c["act_order"], c["damp"]]),
                self._status]
        figs = [self._widgets[k] for k in FIGURES]
        grid = W.GridBox(figs, layout=W.Layout(grid_template_columns="repeat(2, 1fr)"))
        self._sync_controls()
        return W.VBox([*rows, grid])

    def _on_control(self, name: str):
        def handler(change):
            if getattr(self, "_syncing", False):
                return
            try:
                self.select(change["new"]) if name == "layer" else self.set(**{name: change["new"]})
            except ValueError as e:          # ConfigError is a ValueError: show it, keep going
                self._sync_controls()
                self._status.value += f"<br><b style='color:firebrick'>{e}</b>"
        return handler

    def _sync_controls(self) -> None:
        self._syncing = True
        try:
            for name in _CONTROLS:
                value = getattr(self.config, name)
                ctl = self._controls[name]
                if name == "group_size" and value not in ctl.options:
                    ctl.options = sorted(set(ctl.options) | {value})
                if ctl.value != value and not (name == "damp" and value == 0):
                    ctl.value = value
            self._controls["layer"].value = self.layer
        finally:
            self._syncing = False
        self._status.value = self._status_html()

    def _status_html(self) -> str:
        return "<br>".join(self.summary_lines()).replace("  ", "&nbsp;&nbsp;")

    # ------------------------------------------------------------------ text
    def summary_lines(self) -> list[str]:
        c, r = self.cached, self.result
        n, k = c.weight.shape
        g, rt = (float(e.sum()) for e in self._errors)
        lines = [
            (f"{self.layer}: [{n} x {k}], {r.bits}-bit, group {r.group_size}, "
             f"{'sym' if r.sym else 'asym'}, act-order {'on' if r.perm is not None else 'off'}"),
            f"  GPTQ loss {r.loss:.4g}; output error GPTQ {g:.4g} vs RTN {rt:.4g}",
            (f"  damp {r.damp_used:.3g} (x{r.damp_escalations} escalations), cond estimate "
             f"{r.condition_number:.3g}, dead channels {int(c.dead.sum())}"),
            (f"  last update {self.timings.get('total_s', 0):.3f}s "
             f"(solve {self.timings.get('solve_s', 0):.3f}s)"),
        ]
        mean = (getattr(self._source, "means", None) or {}).get(self.layer)
        if mean is not None and g > 0 and rt > 0:
            shift_g = constant_shift_share(c.weight, r.dequantize(), mean, g)
            shift_r = constant_shift_share(c.weight, self.rtn.dequantize(), mean, rt)
            lines.append(f"  constant shift ||dW mean(x)||^2: {shift_g:.0%} of GPTQ's output error, "
                         f"{shift_r:.0%} of RTN's (high: tuned to the calibration data's mean input)")
        return lines + [f"  note: {n}" for n in r.notes]

    def __repr__(self) -> str:
        return "LayerInspector " + "\n".join(self.summary_lines())

    def _ipython_display_(self) -> None:
        ipython_display(self)
