"""Quantizer: run GPTQ on a model with a Calibrator and a QuantConfig, and watch it.

    q = Quantizer(model, calib, QuantConfig(bits=4, group_size=128))
    q.run()                       # live layers x module-type loss heatmap (tqdm outside notebooks)
    q.table()                     # pandas DataFrame: loss, damping, time per layer
    q.requantize(["model.layers.0.mlp.down_proj"], QuantConfig(bits=8))
    q.constant_shift_figure(on=other)   # share of each layer's error that other data's mean input causes
    q.save("out/")

By default the model is copied (``inplace=False``): ``q.reference`` stays the float model
(for the Evaluator and for ``requantize``) and ``q.model`` is the quantized copy.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path

import ipywidgets as W
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

from ..arch import family_of, get_blocks, set_weight_matrix, weight_matrix
from ..checks import linear_names
from ..config import QuantConfig
from ..errors import CalibrationError
from ..gptq import GPTQResult
from ..hessians import CachedLayer, constant_shift_share, output_error
from ..pipeline import quantize_model
from . import views
from .widgets import Progress, figure_widget, in_notebook, ipython_display, refresh, show


class Quantizer:
    """GPTQ (or RTN) of ``model`` with ``calibrator``'s windows and ``config``.

    device / batch_size / compute_dtype go to ``quantize_model``. With ``inplace=True`` the
    model itself is quantized and its float linear weights are kept on the CPU for
    ``requantize``.
    """

    def __init__(self, model: nn.Module, calibrator=None, config: QuantConfig | None = None,
                 method: str = "gptq", device=None, batch_size: int | None = None,
                 compute_dtype: torch.dtype | None = None, inplace: bool = False):
        self.calibrator, self.config, self.method = calibrator, config or QuantConfig(), method
        self.device, self.batch_size, self.compute_dtype = device, batch_size, compute_dtype
        self.inplace = inplace
        self.reference = None if inplace else model
        self.model = model
        self.family = family_of(model)
        self.names = linear_names(model)
        self.n_blocks = len(get_blocks(model, self.family))
        self.results: dict[str, GPTQResult] = {}
        self.block_times: dict[int, float] = {}
        self.requantized: dict[str, QuantConfig] = {}
        self.status = "not run"
        self._masters: dict[str, torch.Tensor] | None = None
        self._errors: dict[str, tuple] = {}
        self._widget = self._heat = None

    # ------------------------------------------------------------------ run
    def run(self, progress=True) -> Quantizer:
        """Quantize; ``progress`` True (widget / tqdm), False, or a callable(done, total, msg).
        An exception (e.g. from ``progress``) stops the run after the current block: blocks done
        so far stay quantized, no hook is left, and ``results`` holds what finished."""
        if self.method == "gptq" and self.calibrator is None:
            raise ValueError("GPTQ needs a Calibrator (or use method='rtn')")
        if self.results:
            raise RuntimeError("this Quantizer has run already; use requantize() or a new Quantizer")
        if self.inplace:
            self._masters = {n: weight_matrix(self.model.get_submodule(n)).detach().float().cpu().clone()
                             for n in self.names}
        else:
            self.model = copy.deepcopy(self.reference)
        if in_notebook() and progress is True:
            show(self)
        self.status, t_last = "running", [time.perf_counter()]

        def on_block(i, named):
            now = time.perf_counter()
            self.block_times[i], t_last[0] = now - t_last[0], now
            self.results.update(named)
            self._refresh()

        bar = (self._bar, self._label) if self._widget is not None else (None, None)
        ids = self.calibrator.ids if self.calibrator is not None else None
        try:
            with Progress(progress, f"{self.method.upper()} blocks", *bar) as cb:
                quantize_model(self.model, ids, self.config, method=self.method, device=self.device,
                               batch_size=self.batch_size, progress=cb, compute_dtype=self.compute_dtype,
                               on_block=on_block)
        except BaseException:
            self.status = f"interrupted after {len(self.block_times)} of {self.n_blocks} blocks"
            self._refresh()
            raise
        self.status = "done"
        self._refresh()
        return self

    # ------------------------------------------------------------------ results
    def output_errors(self) -> dict[str, float]:
        """{name: 1/2 tr(dW H dW^T)}: each layer's output error on the calibrator's float-model
        Hessians (comparable between GPTQ and RTN; empty if no Hessians were collected)."""
        hs = getattr(self.calibrator, "hessians", None) or {}
        cache = self._errors
        for name, r in self.results.items():
            if name in hs and cache.get(name, (None,))[0] is not r:
                err = output_error(self._float_weight(name), r.dequantize(), hs[name])
                cache[name] = (r, float(err.sum()))
        return {n: e for n, (_r, e) in cache.items() if n in self.results}

    def table(self) -> pd.DataFrame:
        """One row per quantized layer: loss, damping used, condition estimate, time (the block's
        time split evenly over its layers), and output_error when the calibrator has Hessians."""
        errors = self.output_errors()
        rows = []
        for name, r in self.results.items():
            block, module = self._split(name)
            n_block = sum(1 for n in self.results if self._split(n)[0] == block)
            rows.append({
                "layer": name, "block": block, "module": module, "bits": r.bits, "group_size": r.group_size,
                "sym": r.sym, "act_order": r.perm is not None, "loss": r.loss, "damp_used": r.damp_used,
                "damp_escalations": r.damp_escalations, "condition": r.condition_number,
                "dead_channels": int(r.dead_channels.sum()),
                "time_s": self.block_times.get(block, math.nan) / max(n_block, 1),
                "requantized": name in self.requantized,
                **({"output_error": errors.get(name, math.nan)} if errors else {}),
            })
        return pd.DataFrame(rows)

    def _split(self, name: str) -> tuple[int, str]:
        rest = name[len(self.family.blocks) + 1:]
        block, _, module = rest.partition(".")
        return int(block), module

    @property
    def metric(self) -> str:
        """"loss" (GPTQ's own objective) or, for RTN, "output_error" (needs calibrator Hessians)."""
        return "output_error" if self.method == "rtn" else "loss"

    def loss_matrix(self, relative: bool = False) -> np.ndarray:
        """[blocks, module types] of ``metric`` (NaN where not quantized yet); ``relative``
        divides each module type's column by its median (sensitivity: which blocks stand out)."""
        values = self.output_errors() if self.metric == "output_error" else \
            {n: r.loss for n, r in self.results.items()}
        m = self._matrix(values)
        if relative:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)     # all-NaN columns while running
                m = m / np.nanmedian(m, axis=0)
        return m

    def _matrix(self, values: dict[str, float]) -> np.ndarray:
        """[blocks, module types] of per-layer ``values``; NaN where a layer has none."""
        m = np.full((self.n_blocks, len(self.family.linears)), np.nan)
        col = {n: j for j, n in enumerate(self.family.linears)}
        for name, v in values.items():
            b, mod = self._split(name)
            m[b, col[mod]] = v
        return m

    def constant_shift_matrix(self, on=None) -> np.ndarray:
        """[blocks, module types] of each layer's constant-shift share ||dW mean(x)||^2 /
        E||dW x||^2 (``hessians.constant_shift_share``), in [0, 1], on the float model's inputs
        from ``on`` (a collected Calibrator; default this Quantizer's). NaN where not quantized
        yet or without a Hessian. GPTQ can make the shift cancel at its own calibration data's
        mean input, so the share on *other* data (``on=``, e.g. a Calibrator of Python text
        collected on ``q.reference``) shows the layers that depend on the calibration domain.
        Raises CalibrationError when ``on`` has no Hessians or no mean inputs (a cache written
        before means were kept)."""
        calib = self.calibrator if on is None else on
        means, hs, shares = self._means(calib), calib.hessians, {}
        for name, r in self.results.items():
            if name in hs:                   # dequantized once for both parts of the ratio
                w, q = self._float_weight(name), r.dequantize()
                total = float(output_error(w, q, hs[name]).sum())
                shares[name] = constant_shift_share(w, q, means[name], total)
        return self._matrix(shares)

    def constant_shift_figure(self, on=None) -> go.Figure:
        """The heatmap of ``constant_shift_matrix(on)``."""
        shares, calib = self.constant_shift_matrix(on), self.calibrator if on is None else on
        where = "its calibration data" if calib is self.calibrator else repr(calib.name)
        title = (f"Constant-shift share ||dW mean(x)||^2 / E||dW x||^2 ({self.method}, "
                 f"{len(self.block_times)}/{self.n_blocks} blocks)<br><sup>inputs: {where}; high: the "
                 f"layer's error is mostly a shift set by the mean input</sup>")
        return views.constant_shift_figure(shares, self._block_labels(), list(self.family.linears), title)

    def _means(self, calib) -> dict[str, torch.Tensor]:
        """``calib``'s mean inputs, checked to cover every quantized layer it has a Hessian for."""
        if calib is None:
            raise CalibrationError("the constant-shift share needs a Calibrator's Hessians and mean "
                                   "inputs; this Quantizer has none: pass on=Calibrator(...) collected "
                                   "on the float model")
        hs = calib.hessians
        if not hs:
            raise CalibrationError(f"Calibrator {calib.name!r} has no Hessians or mean inputs; call "
                                   ".collect(model) with the float model first")
        means = calib.means or {}
        missing = [n for n in self.results if n in hs and n not in means]
        if missing:
            raise CalibrationError(
                f"Calibrator {calib.name!r} has Hessians but no mean input for {len(missing)} of the "
                f"quantized layers (e.g. {missing[0]!r}); call .collect(model) with the float model "
                "again (a cache written before means were kept is collected anew)")
        return means

    def loss_figure(self) -> go.Figure:
        what = "GPTQ loss" if self.metric == "loss" else "output error"
        title = f"{what} per layer ({self.method}, {len(self.block_times)}/{self.n_blocks} blocks)"
        return views.loss_heatmap_figure(self.loss_matrix(), self._block_labels(), list(self.family.linears),
                                         title)

    def _block_labels(self) -> list[str]:
        return [str(i) for i in range(self.n_blocks)]

    def sensitivity_figure(self) -> go.Figure:
        return views.loss_heatmap_figure(self.loss_matrix(relative=True), self._block_labels(),
                                         list(self.family.linears),
                                         f"Sensitivity: {self.metric} / median of its module type (log10)")

    # ------------------------------------------------------------------ requantize / save
    def requantize(self, names: list[str], config: QuantConfig) -> pd.DataFrame:
        """Re-solve ``names`` with ``config`` from the calibrator's cached float-model Hessians
        (collected on first use) and the float weights; the rest of the model is untouched.
        Returns the table rows of those layers."""
        if not self.results:
            raise RuntimeError("run() first")
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise KeyError(f"{unknown} are not quantizable layers; names look like {self.names[0]!r}")
        if self.calibrator is None:
            raise ValueError("requantize needs a Calibrator for the Hessians")
        c = self.calibrator
        missing = [n for n in names if n not in (c.hessians or {})]
        if missing:             # only the layers it lacks; keep the rest (inplace: a new float copy)
            c.collect(self.reference if self.reference is not None else self._float_model(), names=missing,
                      keep=True)
        for name in names:
            weight = self._float_weight(name)
            result = CachedLayer(weight, self.calibrator.hessians[name]).solve(config.for_module(name))
            set_weight_matrix(self.model.get_submodule(name), result.dequantize())
            self.results[name], self.requantized[name] = result, config
        self._refresh()
        table = self.table()
        return table[table["layer"].isin(names)]

    def _float_weight(self, name: str) -> torch.Tensor:
        if self._masters is not None:
            return self._masters[name]
        return weight_matrix(self.reference.get_submodule(name)).detach().float()

    def _float_model(self) -> nn.Module:
        model = copy.deepcopy(self.model)
        for name, w in self._masters.items():
            set_weight_matrix(model.get_submodule(name), w)
        return model

    def save(self, directory: str | Path, tokenizer=None, checkpoint_format: str = "gptq") -> Path:
        """Write a GPTQ checkpoint of the results (``gptq_lab.io.save``)."""
        from ..io import save
        config = self.config if not self.requantized else None     # mixed: inferred from results
        return save(self.model, directory, self.results, config=config, tokenizer=tokenizer,
                    checkpoint_format=checkpoint_format)

    # ------------------------------------------------------------------ display
    @property
    def widget(self) -> W.Widget:
        if self._widget is None:
            self._heat = figure_widget(self.loss_figure())
            self._bar, self._label = W.IntProgress(value=0, max=self.n_blocks), W.Label(self.status)
            self._widget = W.VBox([W.HBox([self._bar, self._label]), self._heat])
        return self._widget

    def _refresh(self) -> None:
        if self._widget is not None:
            refresh(self._heat, self.loss_figure())
            self._bar.value = len(self.block_times)
            self._label.value = self._status_line()

    def _status_line(self) -> str:
        total = sum(r.loss for r in self.results.values())
        loss = "" if math.isnan(total) else f", total GPTQ loss {total:.4g}"
        return (f"{self.status}: {len(self.results)}/{len(self.names)} layers{loss}, "
                f"{sum(self.block_times.values()):.1f}s")

    def __repr__(self) -> str:
        c = self.config
        lines = [(f"Quantizer {self.method.upper()} {c.bits}-bit g{c.group_size} "
                  f"{'sym' if c.sym else 'asym'}{' act-order' if c.act_order else ''} damp {c.damp}: "
                  f"{self._status_line()}")]
        t = self.table() if self.results else None
        key = "loss" if t is not None and t["loss"].notna().any() else "output_error"
        if t is not None and key in t and t[key].notna().any():
            top = t.sort_values(key, ascending=False).head(3)
            what = key.replace("_", " ")
            lines += [f"  highest {what}: {r.layer} {getattr(r, key):.4g}" for r in top.itertuples()]
        if self.requantized:
            lines.append(f"  requantized: {', '.join(self.requantized)}")
        return "\n".join(lines)

    def _ipython_display_(self) -> None:
        ipython_display(self)
