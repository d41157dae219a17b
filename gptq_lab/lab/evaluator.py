"""Evaluator: compare models (float reference, RTN, GPTQ variants, loaded checkpoints).

    ev = Evaluator({"fp": model, "gptq": q, "ckpt": "out/"}, tokenizer, n_windows=16)
    ev.run()              # long DataFrame: perplexity, KL to reference, top-1 per eval set
    ev.table()            # one row per model, with size and memory
    ev.layer_errors()     # per-linear output error against the reference (scoped hooks)
    ev.generate("Once upon a time")      # side-by-side greedy generations
    ev.speed()            # forward tokens/s (and generation tokens/s)
    ev.decode_speed()     # decode/prefill tokens/s and GPU memory, eager and compiled paths
    table, fig = ev.tasks(["arc_easy"], limit=100)     # lm-evaluation-harness (``lmeval`` extra)

Eval sets follow the standard protocol (``data.eval_windows``: drop the first 5% of tokens,
then consecutive windows); ``n_windows`` below the protocol's 64 is said in the figure title.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

from ..checks import linear_names
from ..data import eval_windows
from ..eval import agreement, forward_speed, perplexity
from ..generate import weight_bytes
from ..pipeline import scoped_hooks
from ..qlinear import quant_linears
from . import views
from .widgets import Progress, figure_widget, ipython_display, refresh

PROTOCOL_SETS = ("pride_and_prejudice", "moby_dick", "python_docs")


class TaskScores(NamedTuple):
    """``Evaluator.tasks``'s answer: the long table and its bar chart."""
    table: pd.DataFrame
    figure: go.Figure


def as_model(model) -> nn.Module:
    """An nn.Module, a Quantizer (its quantized model) or a GPTQ checkpoint directory."""
    if isinstance(model, nn.Module):
        return model
    if hasattr(model, "model") and isinstance(model.model, nn.Module):
        return model.model
    if isinstance(model, (str, Path)):
        from ..io import load
        return load(model, dtype=torch.float32)
    raise TypeError(f"cannot evaluate a {type(model).__name__}; pass an nn.Module, a Quantizer or a "
                    f"checkpoint directory")


class Evaluator:
    """models: {name: nn.Module | Quantizer | checkpoint dir}; reference: the name others are
    compared with (default: the first). eval_sets: corpus names / sources, a {label: source}
    dict, or {label: LongTensor [n, seqlen]} windows (default: the protocol's three)."""

    def __init__(self, models: dict | None = None, tokenizer=None, reference: str | None = None,
                 eval_sets=None, n_windows: int = 16, seqlen: int = 512, batch_size: int = 4):
        self.models: dict[str, nn.Module] = {}
        self.tokenizer, self.n_windows, self.seqlen = tokenizer, n_windows, seqlen
        self.batch_size = batch_size
        sets = PROTOCOL_SETS if eval_sets is None else eval_sets
        self.eval_sets = dict(sets) if isinstance(sets, dict) else {str(s): s for s in (
            [sets] if isinstance(sets, str) else sets)}
        self._windows: dict[str, torch.Tensor] = {}
        self.reference = reference
        for name, m in (models or {}).items():
            self.add(name, m)
        self.results = pd.DataFrame()
        self.speeds: dict[str, dict] = {}
        self.generations: dict[str, str] = {}
        self._layer_errors: pd.DataFrame | None = None
        self.task_results = pd.DataFrame()
        self._widget = None

    def add(self, name: str, model) -> Evaluator:
        self.models[name] = as_model(model)
        self.reference = self.reference or name
        return self

    def windows(self, eval_set: str) -> torch.Tensor:
        """[n, seqlen] token windows of one eval set (cached)."""
        if eval_set not in self._windows:
            src = self.eval_sets[eval_set]
            if isinstance(src, torch.Tensor):
                self._windows[eval_set] = src[:self.n_windows]
            else:
                if self.tokenizer is None:
                    raise ValueError("a tokenizer is needed to make eval windows from text")
                self._windows[eval_set] = eval_windows(self.tokenizer, src, self.n_windows, self.seqlen)
        return self._windows[eval_set]

    # ------------------------------------------------------------------ quality
    def run(self, progress=True) -> pd.DataFrame:
        """Perplexity of every model on every set, and KL / top-1 against the reference."""
        ref = self.models[self.reference]
        rows, total = [], len(self.models) * len(self.eval_sets)
        with Progress(progress, "evaluate") as cb:
            for name, model in self.models.items():
                for s in self.eval_sets:
                    ids = self.windows(s)
                    row = {"model": name, "eval_set": s, "windows": ids.shape[0],
                           "perplexity": perplexity(model, ids, self.batch_size)}
                    if model is ref:
                        row.update(kl=0.0, top1=1.0)
                    else:
                        a = agreement(model, ref, ids, self.batch_size)
                        row.update(kl=a.kl, top1=a.top1)
                    rows.append(row)
                    cb(len(rows), total, f"{name} on {s}")
        self.results = pd.DataFrame(rows)
        self._refresh()
        return self.results

    def table(self) -> pd.DataFrame:
        """One row per model: perplexity per set, mean KL and top-1, memory and size."""
        sizes = {n: self.size(n) for n in self.models}
        df = pd.DataFrame.from_dict(sizes, orient="index")
        if not self.results.empty:
            r = self.results
            ppl = r.pivot(index="model", columns="eval_set", values="perplexity").add_prefix("ppl ")
            agg = r.groupby("model")[["kl", "top1"]].mean()
            df = ppl.join(agg).join(df)
        for name, s in self.speeds.items():
            for k, v in s.items():
                df.loc[name, k] = v
        return df.loc[[n for n in self.models if n in df.index]]

    def size(self, name: str) -> dict:
        """In-memory MiB, and quantized linears' packed MiB (real for QuantLinear models,
        estimated from ``gptq_config`` for fake-quantized ones)."""
        model = self.models[name]
        ql = quant_linears(model)
        packed = sum(weight_bytes(m) for m in ql.values())
        if not ql and getattr(model, "gptq_config", None) is not None:
            cfg = model.gptq_config
            for n in linear_names(model):
                w = model.get_submodule(n).weight
                c = cfg.for_module(n)
                k = w.shape[1] if type(model.get_submodule(n)).__name__ != "Conv1D" else w.shape[0]
                g = k if c.group_size == -1 else c.group_size
                packed += w.numel() * (c.bits + (16 + c.bits) / g) / 8
        return {"memory_mb": weight_bytes(model) / 2 ** 20, "quantized_linears_mb": packed / 2 ** 20}

    def figure(self) -> go.Figure:
        if self.results.empty:
            raise RuntimeError("run() first")
        fig = views.evaluation_figure(self.results)
        n = int(self.results["windows"].min())
        note = "" if n >= 64 else f" ({n} windows per set; the protocol uses 64)"
        fig.update_layout(title=f"Evaluation against {self.reference!r}{note}")
        return fig

    # ------------------------------------------------------------------ layers
    @torch.no_grad()
    def layer_errors(self, models: list[str] | None = None, eval_set: str | None = None,
                     n_windows: int = 1, progress=False) -> pd.DataFrame:
        """Relative output error ||y - y_ref||^2 / ||y_ref||^2 of every linear, per model, on
        ``n_windows`` windows (hooks are scoped: nothing stays attached, even on error)."""
        ref = self.models[self.reference]
        names = linear_names(ref)
        ids = self.windows(eval_set or next(iter(self.eval_sets)))[:n_windows]
        ref_out: dict[str, torch.Tensor] = {}

        def keep(name):
            return lambda _m, _a, out: ref_out.__setitem__(name, out.detach().float().cpu())

        with scoped_hooks(lambda: [ref.get_submodule(n).register_forward_hook(keep(n)) for n in names]):
            ref(ids.to(next(ref.parameters()).device), use_cache=False)
        chosen = models or [n for n in self.models if n != self.reference]
        errors: dict[str, list[float]] = {}
        with Progress(progress, "layer errors") as cb:
            for j, m in enumerate(chosen):
                errors[m] = _errors_against(self.models[m], names, ref_out, ids)
                cb(j + 1, len(chosen), m)
        self._layer_errors = pd.DataFrame(errors, index=names)
        return self._layer_errors

    def layer_error_figure(self) -> go.Figure:
        df = self._layer_errors if self._layer_errors is not None else self.layer_errors()
        return views.layer_error_figure({c: list(df[c]) for c in df.columns}, list(df.index))

    # ------------------------------------------------------------------ generation and speed
    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 32,
                 models: list[str] | None = None) -> pd.DataFrame:
        """Greedy continuations of ``prompt`` by each model, side by side, with tokens/s."""
        ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        rows = []
        for name in models or list(self.models):
            model = self.models[name]
            t0 = time.perf_counter()
            out = model.generate(ids.to(next(model.parameters()).device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=getattr(self.tokenizer, "eos_token_id", 0))
            dt = time.perf_counter() - t0
            new = out[0, ids.shape[1]:].tolist()
            self.generations[name] = self.tokenizer.decode(new)
            rows.append({"model": name, "text": self.generations[name], "tokens_per_s": len(new) / dt})
        return pd.DataFrame(rows).set_index("model")

    def speed(self, eval_set: str | None = None, n_windows: int = 2) -> pd.DataFrame:
        """Forward tokens/s per model (on each model's own device; meaningful on a GPU)."""
        ids = self.windows(eval_set or next(iter(self.eval_sets)))[:n_windows]
        for name, model in self.models.items():
            self.speeds[name] = {"forward_tokens_per_s": forward_speed(model, ids, self.batch_size),
                                 "device": str(next(model.parameters()).device)}
        return pd.DataFrame.from_dict(self.speeds, orient="index")

    # ------------------------------------------------------------------ lm-evaluation-harness
    def tasks(self, tasks: list, models: list[str] | None = None, include_path=None,
              limit: float | None = None, num_fewshot: int | None = None) -> TaskScores:
        """lm-evaluation-harness scores of each model (needs the ``lmeval`` extra and a Hugging
        Face tokenizer). tasks: lm_eval task names, config dicts or task YAML paths;
        include_path: a folder of local task YAMLs; limit: docs per task. Returns
        ``(table, figure)``: one row per model, task and metric (value, stderr, n_docs)."""
        from .tasks import COLUMNS, score
        frames = []
        for name in models or list(self.models):
            t = score(self.models[name], self.tokenizer, tasks, include_path=include_path, limit=limit,
                      num_fewshot=num_fewshot, batch_size=self.batch_size)
            frames.append(t.assign(model=name))
        self.task_results = pd.concat(frames, ignore_index=True)[["model", *COLUMNS]]
        return TaskScores(self.task_results, self.task_figure())

    def task_figure(self) -> go.Figure:
        if self.task_results.empty:
            raise RuntimeError("tasks() first")
        return views.task_figure(self.task_results)

    def decode_speed(self, models: list[str] | None = None, paths=("eager", "fast"),
                     settings=None, progress=None, cuda_decode: bool = False,
                     fuse: bool = False, release_checkpoint: bool = False) -> pd.DataFrame:
        """Decode and prefill tokens/s, weights and peak GB per model and generation path, by
        ``gptq_lab.generate.measure_decode`` (what benchmarks/decode.py runs). Quantized layers
        are ``prepare``d first (``cuda_decode=True``: with the CUDA decode kernel's layout instead of
        the Triton one, faster decoding on a GPU for the same memory; ``fuse=True``: q/k/v and
        gate/up fused into one matmul each, in place, after which those models cannot be
        saved; ``release_checkpoint=True``: the checkpoint-layout tensors are freed, so the
        weights figure is what a deployed model holds, after which the models cannot be saved
        either). Meaningful on a GPU; on a CPU pass small ``DecodeSettings(..., compile=False)``
        (the defaults time 2048-token prompts). All models are timed in this process: on an
        H100 ``benchmarks/decode.py`` timed an int4 model after a compiled fp16 one ~7% slower at
        batch 1 than alone (429 against 461 tokens/s; not understood yet), while this method's
        own run in notebook 06 lost nothing measurable (453); ``benchmarks/decode.py --isolate``
        times each model in a process of its own."""
        from ..generate import measure_decode, prepare_model
        rows = []
        for name in models or list(self.models):
            model = prepare_model(self.models[name], cuda_decode=cuda_decode, fuse=fuse,
                                  release_checkpoint=release_checkpoint)
            for path in paths:
                rows.append({"model": name, "path": path,
                             **measure_decode(model, path, settings, progress=progress)})
        self.decode_speeds = pd.DataFrame(rows).set_index(["model", "path"])
        return self.decode_speeds

    # ------------------------------------------------------------------ display
    @property
    def widget(self) -> W.Widget:
        if self._widget is None:
            self._text = W.HTML(f"<pre>{self!r}</pre>")
            self._fig = figure_widget(self.figure()) if not self.results.empty else figure_widget(go.Figure())
            self._widget = W.VBox([self._text, self._fig])
        return self._widget

    def _refresh(self) -> None:
        if self._widget is not None:
            self._text.value = f"<pre>{self!r}</pre>"
            refresh(self._fig, self.figure())

    def __repr__(self) -> str:
        head = (f"Evaluator: {len(self.models)} models ({', '.join(self.models)}), reference "
                f"{self.reference!r}, eval sets {list(self.eval_sets)}")
        if self.results.empty:
            return head + "\n  not run (call .run())"
        with pd.option_context("display.width", 120, "display.precision", 4):
            return head + "\n" + self.table().to_string()

    def _ipython_display_(self) -> None:
        ipython_display(self)


def _errors_against(model, names, ref_out, ids) -> list[float]:
    err: dict[str, float] = {}

    def cmp(name):
        def hook(_m, _a, out):
            ref = ref_out[name]
            diff = ((out.detach().float().cpu() - ref) ** 2).sum()
            err[name] = float(diff / (ref ** 2).sum().clamp_min(1e-30))
        return hook

    present = [n for n in names if _has(model, n)]
    with scoped_hooks(lambda: [model.get_submodule(n).register_forward_hook(cmp(n)) for n in present]):
        model(ids.to(next(model.parameters()).device), use_cache=False)
    return [err.get(n, float("nan")) for n in names]


def _has(model, name) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
