"""Calibrator: token windows from text, then the float model's per-layer Hessians, cached.

    calib = Calibrator(tokenizer, ["emma", "mansfield_park"], n_samples=128, seqlen=512)
    calib                              # summary + plots (per-source share, lengths, frequency)
    calib.collect(model, cache_dir="~/.cache/gptq_lab/hessians")
    calib.compare(other, model)        # per-layer Hessian similarity and cross-scored GPTQ loss
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..arch import weight_matrix
from ..config import QuantConfig
from ..hessians import CachedLayer, MemoryEstimate, collect_hessians, estimate_memory, output_error
from ..pipeline import _default_compute_dtype
from . import views
from .sampling import STRATEGIES, read_sources, sample
from .widgets import Progress, figure_widget, in_notebook, ipython_display, refresh, show


class Calibrator:
    """Calibration windows from ``sources`` and, after ``collect``, per-layer Hessians.

    tokenizer: the model's tokenizer (anything callable like a HF tokenizer).
    sources: a corpus name, file path, raw text, datasets.Dataset, a list of these, or a
        {label: source} dict (a list of strings as a dict value is one source of documents).
    strategy: "random" (the standard protocol), "packed" (whole documents packed with EOS) or
        "mixture" (each source gives ``weights`` of the windows; equal by default).
    """

    def __init__(self, tokenizer, sources=("emma", "mansfield_park"), n_samples: int = 128,
                 seqlen: int = 512, seed: int = 0, strategy: str = "random", weights=None,
                 name: str | None = None):
        self.tokenizer, self.n_samples, self.seqlen, self.seed = tokenizer, n_samples, seqlen, seed
        self.strategy, self.weights = strategy, weights
        self.sources = read_sources(sources)
        self.name = name or "+".join(self.sources)
        s = sample(tokenizer, self.sources, n_samples, seqlen, seed, strategy, weights)
        self.ids: torch.Tensor = s.ids                      # [n_samples, seqlen] int64
        self.token_source, self.labels, self.doc_lengths = s.token_source, s.labels, s.doc_lengths
        self.hessians: dict[str, torch.Tensor] | None = None
        self.absmax: dict[str, torch.Tensor] | None = None      # per layer: [K] largest |input|
        self.means: dict[str, torch.Tensor] | None = None       # per layer: [K] mean input
        self.memory_estimate: MemoryEstimate | None = None
        self.collect_time: float | None = None
        self._model_ref = None
        self._widget = self._fig_widget = None

    # ------------------------------------------------------------------ summary
    @property
    def shares(self) -> dict[str, int]:
        """Tokens per source in the windows."""
        counts = torch.bincount(self.token_source.flatten().long(), minlength=len(self.labels))
        return {label: int(c) for label, c in zip(self.labels, counts)}

    def token_counts(self) -> torch.Tensor:
        return torch.bincount(self.ids.flatten())

    def summary(self) -> dict:
        counts = self.token_counts()
        top = torch.argsort(counts, descending=True)[:10].tolist()
        decode = getattr(self.tokenizer, "decode", None)
        return {
            "name": self.name, "strategy": self.strategy, "n_samples": self.ids.shape[0],
            "seqlen": self.ids.shape[1], "tokens": self.ids.numel(),
            "distinct_tokens": int((counts > 0).sum()),
            "shares": self.shares, "documents": len(self.doc_lengths),
            "top_tokens": [(decode([t]) if decode else t, int(counts[t])) for t in top],
        }

    def figure(self) -> go.Figure:
        return views.calibration_figure(self.shares, self.doc_lengths, self.token_counts())

    def __repr__(self) -> str:
        s = self.summary()
        total = max(s["tokens"], 1)
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in s["shares"].items())
        lines = [(f"Calibrator {s['name']!r}: {s['n_samples']} x {s['seqlen']} tokens ({s['strategy']}), "
                  f"{s['distinct_tokens']:,} distinct tokens, seed {self.seed}"),
                 f"  sources: {shares}"]
        if self.hessians is None:
            lines.append("  Hessians: not collected (call .collect(model))")
        else:
            mb = sum(h.numel() * 4 for h in {id(h): h for h in self.hessians.values()}.values()) / 2 ** 20
            lines.append(f"  Hessians: {len(self.hessians)} layers, {mb:,.1f} MiB"
                         + (f", collected in {self.collect_time:.1f}s" if self.collect_time else ""))
        return "\n".join(lines)

    @property
    def widget(self) -> W.Widget:
        if self._widget is None:
            self._fig_widget = figure_widget(self.figure())
            self._text = W.HTML(f"<pre>{self!r}</pre>")
            self._bar, self._label = W.IntProgress(value=0, max=1), W.Label()
            self._widget = W.VBox([self._text, W.HBox([self._bar, self._label]), self._fig_widget])
        return self._widget

    def _ipython_display_(self) -> None:
        ipython_display(self)

    # ------------------------------------------------------------------ Hessians
    def estimate_memory(self, model: nn.Module, compute_dtype: torch.dtype | None = None) -> MemoryEstimate:
        dtype = compute_dtype or _default_compute_dtype(model, torch.device("cpu"))
        return estimate_memory(model, self.ids.shape[0], self.ids.shape[1], dtype)

    def collect(self, model: nn.Module, device=None, batch_size: int | None = None,
                compute_dtype: torch.dtype | None = None, cache_dir: str | Path | None = None,
                progress=True, names: list[str] | None = None,
                keep: bool | None = None) -> dict[str, torch.Tensor]:
        """Run the windows through ``model`` (unchanged) and keep each linear's Hessian, input
        |max| and mean input (``absmax``, ``means``).

        names: the full linear names to collect (default: all); the forward pass stops after
        the last block needed. Layers collected earlier from the same model are kept (a
        different model replaces them; ``keep=True`` keeps them anyway, for another copy of the
        same float model). Prints the memory estimate first (when ``progress``
        is True). With ``cache_dir``, the Hessians are read from / written to
        ``cache_dir/hessians-<key>.safetensors``, the key hashing the token ids, the model's
        config and first weights, the compute dtype and ``names``.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = compute_dtype or _default_compute_dtype(model, device)
        self.memory_estimate = self.estimate_memory(model, dtype)
        if keep is None:
            keep = names is not None and self._model_ref is model
        held = (self.hessians or {}, self.absmax or {}, self.means or {}) if keep else ({}, {}, {})
        self._model_ref = model
        key = self.cache_key(model, dtype, names)
        path = Path(cache_dir).expanduser() / f"hessians-{key}.safetensors" if cache_dir else None
        if path is not None and path.is_file():
            cached = load_hessians(path)
            if all(n in cached[2] for n in cached[0]):      # a cache from before means: collect anew
                return self._store(held, *cached)
            if progress is True:                            # as the message below: a callback prints nothing
                self._say(f"{path.name} was written before mean inputs were kept: collecting again")
        if progress is True:
            self._say(f"collecting Hessians of {self.ids.shape[0]} x {self.ids.shape[1]} tokens; "
                      f"memory {self.memory_estimate}")
        t0, absmax, means = time.perf_counter(), {}, {}
        if in_notebook() and progress is True:
            show(self)                                      # the progress bar lives in the widget
        bar = self.widget.children[1].children if in_notebook() else (None, None)
        with Progress(progress, "Hessians", *bar) as cb:
            hessians = collect_hessians(model, self.ids, names=names, batch_size=batch_size,
                                        device=device, compute_dtype=dtype, progress=cb, absmax=absmax,
                                        means=means)
        self.collect_time = time.perf_counter() - t0
        if path is not None:
            save_hessians(path, hessians, absmax, means)
        return self._store(held, hessians, absmax, means)

    def _store(self, held: tuple[dict, dict, dict], hessians: dict, absmax: dict,
               means: dict) -> dict[str, torch.Tensor]:
        """The layers ``held`` from before, updated with these; returns the Hessians."""
        self.hessians, self.absmax, self.means = ({**held[0], **hessians}, {**held[1], **absmax},
                                                  {**held[2], **means})
        self._refresh_text()
        return self.hessians

    def cache_key(self, model: nn.Module, dtype: torch.dtype, names: list[str] | None = None) -> str:
        first = next(p for p in model.parameters())
        h = hashlib.sha1(self.ids.numpy().tobytes())
        h.update(model.config.to_json_string(use_diff=False).encode())
        h.update(first.detach().flatten()[:4096].float().numpy().tobytes())
        h.update(str(dtype).encode())
        if names is not None:                               # a subset: its own cache file
            h.update(json.dumps(sorted(set(names))).encode())
        return h.hexdigest()[:16]

    def _say(self, text: str) -> None:
        if in_notebook() and self._widget is not None:
            self._label.value = text
        else:
            print(text)

    def _refresh_text(self) -> None:
        if self._widget is not None:
            self._text.value = f"<pre>{self!r}</pre>"
            refresh(self._fig_widget, self.figure())

    # ------------------------------------------------------------------ compare
    def compare(self, other: Calibrator, model: nn.Module | None = None, config: QuantConfig | None = None,
                layers: list[str] | None = None, cross: bool = True, progress=True) -> pd.DataFrame:
        """Per layer: Hessian cosine similarity and, with ``cross``, the output error on
        ``other``'s Hessian of the weights solved with this set's Hessian, relative to those
        solved with ``other``'s own (``cross_ratio`` >= ~1; higher = this set transfers worse).
        Both calibrators are collected on ``model`` if needed (default: the last one used)."""
        model = model or self._model_ref or other._model_ref
        if model is None:
            raise ValueError("compare needs the model: pass model= or collect() first")
        for c in (self, other):
            if c.hessians is None:
                c.collect(model, progress=progress)
        config = config or QuantConfig()
        names = layers or [n for n in self.hessians if n in other.hessians]
        rows = []
        with Progress(progress if cross else False, "compare") as cb:
            for j, name in enumerate(names):
                ha, hb = self.hessians[name], other.hessians[name]
                rows.append(_compare_layer(name, ha, hb, model, config, cross))
                cb(j + 1, len(names), name)
        return pd.DataFrame(rows)

    def sensitivity(self, model: nn.Module | None = None, bits: tuple[int, ...] = (2, 3, 4, 8),
                    config: QuantConfig | None = None, progress=True):
        """GPTQ loss of every linear at each of ``bits``, re-solved from this set's cached Hessians
        (collected on ``model`` first if needed): a ``gptq_lab.sensitivity.Sensitivity`` for
        ``gptq_lab.planner.plan``; draw it with ``gptq_lab.lab.studies.plan_figure``."""
        from ..sensitivity import layer_sensitivity
        model = model or self._model_ref
        if model is None:
            raise ValueError("sensitivity needs the model: pass model= or collect() first")
        if self.hessians is None:
            self.collect(model, progress=progress)
        with Progress(progress, "sensitivity") as cb:
            return layer_sensitivity(model, self.hessians, bits, config or QuantConfig(), progress=cb)

    def compare_figure(self, table: pd.DataFrame, other_name: str = "B") -> go.Figure:
        ratio = table.get("cross_ratio")
        return views.calibration_compare_figure(list(table["layer"]), table["similarity"], ratio,
                                                (self.name, other_name))


def _compare_layer(name, ha, hb, model, config, cross) -> dict:
    sim = float((ha * hb).sum() / (ha.norm() * hb.norm()).clamp_min(1e-30))
    row = {"layer": name, "similarity": sim}
    if cross:
        weight = weight_matrix(model.get_submodule(name)).detach().float()
        cfg = config.for_module(name)
        qa = CachedLayer(weight, ha).solve(cfg).dequantize()
        qb = CachedLayer(weight, hb).solve(cfg).dequantize()
        own, crossed = float(output_error(weight, qb, hb).sum()), float(output_error(weight, qa, hb).sum())
        row.update(loss_own=own, loss_cross=crossed, cross_ratio=crossed / own if own > 0 else float("nan"))
    return row


def save_hessians(path: Path, hessians: dict[str, torch.Tensor], absmax: dict | None = None,
                  means: dict | None = None) -> Path:
    """Write Hessians (and each layer's [K] input |max| and mean, where given) to one safetensors
    file (shared tensors stored once), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys, tensors, names = {}, {}, {}
    for name, h in hessians.items():
        if id(h) not in keys:
            keys[id(h)] = f"h{len(keys)}"
            tensors[keys[id(h)]] = h.contiguous()
            for suffix, stats in (("absmax", absmax), ("mean", means)):
                if stats and name in stats:
                    tensors[f"{keys[id(h)]}.{suffix}"] = stats[name].contiguous()
        names[name] = keys[id(h)]
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"names": json.dumps(names)})
    tmp.replace(path)
    return path


def load_hessians(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                       dict[str, torch.Tensor]]:
    """(hessians, absmax, means) as ``save_hessians`` wrote them (a file without means: {})."""
    with safe_open(str(path), framework="pt") as f:
        names = json.loads(f.metadata()["names"])
        loaded = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    hessians = {n: loaded[k] for n, k in names.items()}
    absmax, means = ({n: loaded[f"{k}.{suffix}"] for n, k in names.items() if f"{k}.{suffix}" in loaded}
                     for suffix in ("absmax", "mean"))
    return hessians, absmax, means


__all__ = ["STRATEGIES", "Calibrator", "load_hessians", "save_hessians"]
