"""Figures for the calibration studies and the mixed-precision planner (thin glue: result -> view).

    cross_domain_figure(study.cross_domain(...))
    sample_curve_figure(study.sample_sweep(...))
    plan_figure(sens, planner.plan(sens, target_bits=3.5))
"""
from __future__ import annotations

import math

import plotly.graph_objects as go

from ..planner import Plan
from ..sensitivity import Sensitivity
from ..study import CrossDomain, SampleSweep
from . import views


def cross_domain_figure(result: CrossDomain) -> go.Figure:
    c = result.config
    title = (f"Perplexity by calibration source, GPTQ {c.bits}-bit g{c.group_size}"
             f"<br><sup>samples per source: {', '.join(f'{k} {v}' for k, v in result.n_samples.items())}; "
             f"colour: perplexity / best in its column</sup>")
    return views.cross_domain_figure(result.matrix(), result.calib, result.evals, title)


def sample_curve_figure(sweep: SampleSweep) -> go.Figure:
    enough = {e: sweep.enough(e) for e in sweep.perplexity}
    return views.sample_curve_figure(sweep.n_samples, sweep.gptq_loss, sweep.perplexity, enough, sweep.rule())


def plan_figure(sens: Sensitivity, plan: Plan | None = None, bits: int = 3, measure: str = "loss") -> go.Figure:
    """The sensitivity heatmap (``measure`` at ``bits``) with the plan's bits written in each cell."""
    values = sens.matrix(bits, measure)
    planned = [[math.nan] * len(sens.modules) for _ in values]
    for name, b in (plan.bits if plan else {}).items():
        block, module = sens.split(name)
        planned[block][sens.modules.index(module)] = b
    what = "GPTQ loss" if measure == "loss" else "KL (only this layer quantized)"
    title = f"{what} at {bits} bits (log10)" + (f"; cells: planned bits<br><sup>{plan.summary()}</sup>"
                                                 if plan else "")
    return views.plan_figure(values, planned, [str(i) for i in range(len(values))], list(sens.modules), title)


__all__ = ["cross_domain_figure", "plan_figure", "sample_curve_figure"]
