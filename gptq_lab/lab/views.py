"""Pure functions: data -> plotly Figure. No state, no widgets, no model access.

Every function returns a new ``go.Figure`` whose trace count and trace types depend only
on its arguments' *kind*, never on their values, so a FigureWidget built from one call
can be refreshed in place from another (``widgets.refresh``). Tensors or arrays in; NaN
marks "not known yet" (heatmap cells stay blank).
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

TINY = 1e-30   # floor for log axes (zero eigenvalues of dead channels)
TEMPLATE = "plotly_white"


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=float)


def _json_safe(a) -> list:
    """NaN/Inf -> None: FigureWidget messages are strict JSON (plain figures accept either)."""
    a = np.asarray(a, dtype=float)
    return a if np.isfinite(a).all() else np.where(np.isfinite(a), a, None).tolist()


def _fig(title: str, height: int = 320, **layout) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, template=TEMPLATE, height=height,
                      margin={"l": 60, "r": 20, "t": 50, "b": 45}, **layout)
    return fig


def pool(t, max_rows: int, max_cols: int) -> tuple[np.ndarray, int, int]:
    """RMS over tiles so that ``t`` [R, C] fits in max_rows x max_cols -> (array, tile_r, tile_c).
    Edge tiles that do not divide evenly average over the entries they have."""
    a = _np(t)
    r, c = a.shape
    tr, tc = math.ceil(r / max_rows), math.ceil(c / max_cols)
    if tr == 1 and tc == 1:
        return np.abs(a), 1, 1
    rows, cols = math.ceil(r / tr), math.ceil(c / tc)
    sq = np.square(a, dtype=np.float32)
    if rows * tr != r or cols * tc != c:
        sq = np.pad(sq, ((0, rows * tr - r), (0, cols * tc - c)), constant_values=np.nan)
        return np.sqrt(np.nanmean(sq.reshape(rows, tr, cols, tc), axis=(1, 3))), tr, tc
    return np.sqrt(sq.reshape(rows, tr, cols, tc).mean(axis=(1, 3))), tr, tc


# ---------------------------------------------------------------------------- LayerInspector

def spectrum_figure(eigenvalues, damp_abs: float, condition_number: float, n_dead: int,
                    name: str = "") -> go.Figure:
    """Hessian eigenvalues (descending, log scale), the damped ones, and the damping level."""
    vals = np.sort(_np(eigenvalues))[::-1]
    x = np.arange(len(vals))
    fig = _fig(f"Hessian spectrum {name}<br><sup>cond(H + damp I) = {condition_number:.3g}, "
               f"damp = {damp_abs:.3g}, dead channels = {n_dead}</sup>", height=340)
    fig.add_scatter(x=x, y=np.maximum(vals, TINY), name="eigenvalues of H", mode="lines")
    fig.add_scatter(x=x, y=np.maximum(vals + damp_abs, TINY), name="H + damp I", mode="lines",
                    line={"dash": "dot"})
    fig.add_scatter(x=[0, max(len(vals) - 1, 1)], y=[max(damp_abs, TINY)] * 2, name="damping",
                    mode="lines", line={"color": "firebrick", "width": 1})
    fig.update_yaxes(type="log", title="eigenvalue")
    fig.update_xaxes(title="index (descending)")
    return fig


def outlier_channels(diag, factor: float = 10.0) -> np.ndarray:
    """Indices of input channels whose Hessian diagonal exceeds ``factor`` x the median."""
    d = _np(diag)
    med = np.median(d[d > 0]) if (d > 0).any() else 0.0
    return np.flatnonzero(d > factor * med) if med > 0 else np.array([], dtype=int)


def hessian_diagonal_figure(diag, absmax=None, name: str = "", factor: float = 10.0) -> go.Figure:
    """Hessian diagonal (2 x mean x_j^2) per input channel; outliers (> factor x median) marked."""
    d = _np(diag)
    out = outlier_channels(d, factor)
    fig = _fig(f"Hessian diagonal per input channel {name}<br><sup>{len(out)} outlier channels "
               f"(> {factor:g}x median), {int((d == 0).sum())} dead</sup>")
    hover = None if absmax is None else [f"max |x| = {v:.3g}" for v in _np(absmax)]
    fig.add_scatter(x=np.arange(len(d)), y=np.maximum(d, TINY), mode="lines", name="H_jj", text=hover)
    fig.add_scatter(x=out, y=np.maximum(d[out], TINY), mode="markers", name="outliers",
                    marker={"color": "firebrick", "size": 7})
    fig.update_yaxes(type="log", title="H_jj")
    fig.update_xaxes(title="input channel")
    return fig


def weight_error_figure(weight, dequantized, max_rows: int = 96, max_cols: int = 192,
                        name: str = "") -> go.Figure:
    """Side-by-side heatmaps of |W| and of the rounding error |W - Q|, RMS-pooled to fit."""
    w = _np(weight)
    err, tr, tc = pool(w - _np(dequantized), max_rows, max_cols)
    mag, _, _ = pool(w, max_rows, max_cols)
    tiles = "" if tr == tc == 1 else f" (RMS over {tr}x{tc} tiles)"
    fig = go.Figure()        # two panels on manual axis domains (make_subplots is slow to build)
    fig.add_heatmap(z=mag, colorscale="Viridis", colorbar={"x": 0.45, "len": 0.9}, xaxis="x", yaxis="y")
    fig.add_heatmap(z=err, colorscale="Inferno", colorbar={"x": 1.0, "len": 0.9}, xaxis="x2", yaxis="y2")
    fig.update_layout(
        title=f"Weights and rounding error {name}{tiles}", template=TEMPLATE, height=340,
        margin={"l": 50, "r": 20, "t": 70, "b": 40},
        xaxis={"domain": [0, 0.42], "title": "input channel / tile"},
        xaxis2={"domain": [0.55, 0.97], "title": "input channel / tile"},
        yaxis={"autorange": "reversed", "title": "output channel / tile"},
        yaxis2={"autorange": "reversed", "anchor": "x2"},
        annotations=[{"text": t, "x": x, "y": 1.0, "xref": "paper", "yref": "paper", "showarrow": False,
                      "yanchor": "bottom"} for t, x in (("|W|", 0.21), ("|W - Q|", 0.76))])
    return fig


def column_error_figure(gptq_error, rtn_error, name: str = "") -> go.Figure:
    """Per input column, its share of the layer-output error 1/2 tr(dW H dW^T): GPTQ vs RTN."""
    g, r = _np(gptq_error), _np(rtn_error)
    tg, tr = float(g.sum()), float(r.sum())
    ratio = f", {tr / tg:.2f}x lower" if tg > 0 and math.isfinite(tr) else ""
    fig = _fig(f"Output error per input column {name}<br><sup>total: GPTQ {tg:.4g} vs RTN {tr:.4g}"
               f"{ratio}</sup>")
    x = np.arange(len(g))
    fig.add_scatter(x=x, y=_json_safe(r), mode="lines", name="RTN",
                    line={"color": "gray", "width": 1})
    fig.add_scatter(x=x, y=_json_safe(g), mode="lines", name="GPTQ",
                    line={"color": "royalblue", "width": 1})
    fig.update_xaxes(title="input channel")
    fig.update_yaxes(title="share of output error")
    return fig


def group_scales_figure(scales, max_rows: int = 192, name: str = "") -> go.Figure:
    """Heatmap of the quantization scales [N, G]: output channels (RMS-pooled) x groups."""
    s, tr, _ = pool(scales, max_rows, 10 ** 9)
    rows = "output channel" if tr == 1 else f"output channel / {tr}"
    fig = _fig(f"Group scales {name}<br><sup>{_np(scales).shape[0]} x {_np(scales).shape[1]} "
               f"(output channels x groups)</sup>", height=340)
    fig.add_heatmap(z=s, colorscale="Cividis")
    fig.update_yaxes(autorange="reversed", title=rows)
    fig.update_xaxes(title="group")
    return fig


def act_order_figure(perm, diag, name: str = "") -> go.Figure:
    """Solve position -> original input channel, coloured by log10 of the Hessian diagonal."""
    d = _np(diag)
    order = np.arange(len(d)) if perm is None else _np(perm).astype(int)
    state = "off: columns solved in their original order" if perm is None else \
        "on: columns solved by decreasing Hessian diagonal"
    fig = _fig(f"Act-order permutation {name}<br><sup>{state}</sup>")
    fig.add_scatter(x=np.arange(len(order)), y=order, mode="markers", name="column",
                    marker={"size": 3, "color": np.log10(np.maximum(d[order], TINY)),
                            "colorscale": "Plasma", "colorbar": {"title": "log10 H_jj"}})
    fig.update_xaxes(title="solve position")
    fig.update_yaxes(title="original input channel")
    return fig


# ---------------------------------------------------------------------------- Calibrator

def calibration_figure(shares: dict[str, int], doc_lengths: list[int], token_counts) -> go.Figure:
    """Per-source share of the calibration tokens, document lengths, token rank-frequency."""
    counts = np.sort(_np(token_counts))[::-1]
    counts = counts[counts > 0]
    fig = make_subplots(1, 3, subplot_titles=("tokens per source", "document length (tokens)",
                                              "token rank-frequency"), horizontal_spacing=0.09)
    fig.add_bar(x=list(shares), y=list(shares.values()), name="tokens", row=1, col=1)
    fig.add_histogram(x=list(doc_lengths), nbinsx=40, name="documents", row=1, col=2)
    fig.add_scatter(x=np.arange(1, len(counts) + 1), y=counts, mode="lines", name="tokens", row=1, col=3)
    fig.update_xaxes(type="log", row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=3)
    total = int(sum(shares.values()))
    fig.update_layout(title=f"Calibration set: {total:,} tokens, {len(counts):,} distinct", template=TEMPLATE,
                      height=330, showlegend=False, margin={"l": 50, "r": 20, "t": 70, "b": 40})
    return fig


def calibration_compare_figure(layers: list[str], similarity, cross_ratio=None,
                               names: tuple[str, str] = ("A", "B")) -> go.Figure:
    """Per layer: cosine similarity of the two Hessians, and the GPTQ loss of solving with A's
    Hessian scored on B's, relative to solving with B's own (1 = no worse)."""
    fig = make_subplots(2, 1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("Hessian similarity <H_A, H_B> / (|H_A| |H_B|)",
                                        (f"output error on {names[1]} when solved with {names[0]}, "
                                         f"relative to solved with {names[1]}")))
    fig.add_scatter(x=layers, y=_np(similarity), mode="lines+markers", name="similarity", row=1, col=1)
    ratio = _np(cross_ratio) if cross_ratio is not None else np.full(len(layers), np.nan)
    fig.add_scatter(x=layers, y=_json_safe(ratio), mode="lines+markers", name="cross loss ratio", row=2, col=1)
    fig.update_layout(title=f"Calibration sets {names[0]} vs {names[1]}", template=TEMPLATE, height=480,
                      showlegend=False, margin={"l": 60, "r": 20, "t": 70, "b": 120})
    return fig


# ---------------------------------------------------------------------------- Quantizer

def loss_heatmap_figure(values, blocks: list[str], modules: list[str], title: str = "GPTQ loss",
                        log: bool = True) -> go.Figure:
    """Heatmap of a per-layer quantity [blocks, module types]; NaN cells are blank (pending)."""
    v = _np(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log10(np.where(v > 0, v, np.nan)) if log else v
    fig = _fig(title, height=max(300, 60 + 16 * len(blocks)))
    fig.add_heatmap(z=_json_safe(z), x=list(modules), y=list(blocks), customdata=_json_safe(v),
                    colorscale="Magma",
                    hovertemplate="%{y} %{x}<br>%{customdata:.4g}<extra></extra>",
                    colorbar={"title": "log10" if log else ""})
    fig.update_yaxes(autorange="reversed", title="block")
    return fig


def constant_shift_figure(values, blocks: list[str], modules: list[str],
                          title: str = "Constant-shift share of the output error") -> go.Figure:
    """Heatmap [blocks, module types] of each layer's share ||dW mean(x)||^2 / E||dW x||^2 of its
    output error, a fraction in [0, 1] on a fixed linear colour scale (so figures compare);
    NaN cells are blank."""
    v = _np(values)
    fig = _fig(title, height=max(300, 60 + 16 * len(blocks)))
    fig.add_heatmap(z=_json_safe(v), x=list(modules), y=list(blocks), zmin=0, zmax=1,
                    colorscale="Viridis", colorbar={"title": "share", "tickformat": ".0%"},
                    hovertemplate="block %{y} %{x}<br>%{z:.1%} of the output error<extra></extra>")
    fig.update_yaxes(autorange="reversed", title="block")
    fig.update_xaxes(title="module")
    return fig


# ---------------------------------------------------------------------------- Evaluator

def evaluation_figure(table) -> go.Figure:
    """Grouped bars from a long table with columns model, eval_set, perplexity, kl, top1."""
    fig = make_subplots(1, 3, subplot_titles=("perplexity", "KL to reference (nats/token)",
                                              "top-1 agreement"), horizontal_spacing=0.08)
    for model in dict.fromkeys(table["model"]):
        rows = table[table["model"] == model]
        for col, key in enumerate(("perplexity", "kl", "top1"), start=1):
            fig.add_bar(x=list(rows["eval_set"]), y=list(rows[key]), name=model, legendgroup=model,
                        showlegend=col == 1, row=1, col=col)
    fig.update_layout(title="Evaluation", template=TEMPLATE, barmode="group", height=360,
                      margin={"l": 50, "r": 20, "t": 70, "b": 40})
    return fig


def task_figure(table) -> go.Figure:
    """Grouped bars of lm_eval scores from a long table with columns model, task, metric,
    value, stderr, n_docs: one bar per (task, metric) and model, stderr as error bars."""
    fig = _fig("Task accuracy (lm-evaluation-harness)", height=360, barmode="group")
    for model in dict.fromkeys(table["model"]):
        rows = table[table["model"] == model]
        fig.add_bar(x=[f"{t} {m}" for t, m in zip(rows["task"], rows["metric"])],
                    y=_json_safe(rows["value"]), name=model,
                    error_y={"type": "data", "array": _json_safe(rows["stderr"])},
                    customdata=_json_safe(rows["n_docs"]),
                    hovertemplate="%{x}: %{y:.3f} (%{customdata} docs)<extra>" + str(model) + "</extra>")
    fig.update_yaxes(title="score", rangemode="tozero")
    return fig


def layer_error_figure(errors: dict[str, list[float]], layers: list[str]) -> go.Figure:
    """Relative output error ||y_q - y_ref||^2 / ||y_ref||^2 per linear, one line per model."""
    fig = _fig("Per-layer output error against the reference", height=380)
    for model, err in errors.items():
        fig.add_scatter(x=layers, y=_json_safe(_np(err)), mode="lines+markers", name=model)
    fig.update_yaxes(type="log", title="relative squared error")
    fig.update_layout(margin={"l": 60, "r": 20, "t": 50, "b": 120})
    return fig


# ---------------------------------------------------------------------------- calibration studies

def cross_domain_figure(perplexity, calib: list[str], evals: list[str], title: str = "") -> go.Figure:
    """Heatmap [calibration source, eval set] of perplexity, annotated; colour = perplexity over the
    best calibration for that eval set (1 = best), so columns of different scale compare."""
    p = _np(perplexity)                                                     # [C, E]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = p / np.nanmin(p, axis=0, keepdims=True)
    fig = _fig(title or "Perplexity by calibration source (rows) and evaluation set (columns)",
               height=max(280, 120 + 45 * len(calib)))
    fig.add_heatmap(z=_json_safe(ratio), x=list(evals), y=list(calib), colorscale="Reds",
                    text=[[f"{v:.2f}" for v in row] for row in p], texttemplate="%{text}",
                    customdata=_json_safe(p), colorbar={"title": "/ best"},
                    hovertemplate="calibrated on %{y}<br>evaluated on %{x}<br>perplexity %{customdata:.3f}"
                                  "<extra></extra>")
    fig.update_yaxes(autorange="reversed", title="calibration")
    fig.update_xaxes(title="evaluation")
    return fig


def sample_curve_figure(n_samples: list[int], gptq_loss, perplexity: dict[str, list[float]],
                        enough: dict[str, int | None], rule: str = "") -> go.Figure:
    """Perplexity per eval set and total GPTQ loss against the number of calibration samples (log2
    axis); a diamond marks where each curve stops improving by the ``rule``."""
    fig = make_subplots(1, 2, subplot_titles=("perplexity", "GPTQ loss (own calibration)"),
                        horizontal_spacing=0.1)
    for name, values in perplexity.items():
        fig.add_scatter(x=n_samples, y=_json_safe(values), mode="lines+markers", name=name, row=1, col=1)
    marks = [(n, perplexity[e][n_samples.index(n)], e) for e, n in enough.items() if n is not None]
    fig.add_scatter(x=[m[0] for m in marks], y=[m[1] for m in marks], text=[m[2] for m in marks],
                    mode="markers", marker={"symbol": "diamond", "size": 12, "color": "black"},
                    name="enough samples", hovertemplate="%{text}: enough at n = %{x}<extra></extra>",
                    row=1, col=1)
    fig.add_scatter(x=n_samples, y=_json_safe(gptq_loss), mode="lines+markers", name="GPTQ loss",
                    row=1, col=2)
    fig.update_xaxes(type="log", title="calibration samples", dtick=math.log10(2))
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title=f"How many calibration samples?<br><sup>{rule}</sup>", template=TEMPLATE,
                      height=380, margin={"l": 60, "r": 20, "t": 80, "b": 45})
    return fig


def plan_figure(values, bits, blocks: list[str], modules: list[str], title: str = "") -> go.Figure:
    """Sensitivity heatmap [blocks, module types] (log10 of ``values``) annotated with each layer's
    planned bits (``bits``, same shape; NaN = not planned)."""
    v, b = _np(values), _np(bits)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log10(np.where(v > 0, v, np.nan))
    fig = _fig(title or "Sensitivity (log10) and planned bits", height=max(300, 60 + 16 * len(blocks)))
    fig.add_heatmap(z=_json_safe(z), x=list(modules), y=list(blocks), colorscale="Magma",
                    text=[["" if math.isnan(x) else str(int(x)) for x in row] for row in b],
                    texttemplate="%{text}", customdata=_json_safe(v), colorbar={"title": "log10"},
                    hovertemplate="block %{y} %{x}<br>sensitivity %{customdata:.4g}<br>%{text} bits"
                                  "<extra></extra>")
    fig.update_yaxes(autorange="reversed", title="block")
    return fig
