"""The standard evaluation protocol (../shared/DESIGN.md) as data plus one runner.

    rows = run_protocol(PROTOCOLS["quick"])
    print(format_table(rows, PROTOCOLS["quick"]))

Calibration: Emma + Mansfield Park, random 512-token windows, random.Random(0).
Evaluation: Pride and Prejudice (in domain, held out), Moby Dick, the Python docs;
first 5% of tokens dropped, first n non-overlapping 512-token windows.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import data
from .config import QuantConfig
from .eval import perplexity
from .pipeline import quantize_model

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Variant:
    label: str
    method: str | None          # None: the float model
    config: QuantConfig | None = None


G128_4 = QuantConfig(bits=4, group_size=128, sym=True)
G128_3 = QuantConfig(bits=3, group_size=128, sym=True)
STANDARD_VARIANTS = (
    Variant("FP", None),
    Variant("RTN 4b g128", "rtn", G128_4),
    Variant("GPTQ 4b g128", "gptq", G128_4),
    Variant("GPTQ 4b g128 act-order", "gptq", G128_4.replace(act_order=True)),
    Variant("RTN 3b g128", "rtn", G128_3),
    Variant("GPTQ 3b g128", "gptq", G128_3),
)


@dataclass(frozen=True)
class Protocol:
    name: str
    calib_sources: tuple[str, ...] = ("emma", "mansfield_park")
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    eval_sets: tuple[str, ...] = ("pride_and_prejudice", "moby_dick", "python_docs")
    eval_windows: int = 64
    variants: tuple[Variant, ...] = STANDARD_VARIANTS

    def describe(self) -> str:
        return (f"protocol '{self.name}': calibration {self.n_samples} x {self.seqlen} tokens of "
                f"{' + '.join(self.calib_sources)} (seed {self.seed}); perplexity on {self.eval_windows} "
                f"x {self.seqlen}-token windows of each eval set")


PROTOCOLS = {
    "full": Protocol("full"),
    # The CLI demo's default: same recipe, fewer samples and windows, no act-order row,
    # so that it finishes in minutes on a 2-core CPU.
    "quick": Protocol("quick", n_samples=32, eval_windows=4,
                      variants=tuple(v for v in STANDARD_VARIANTS if "act-order" not in v.label)),
}


@dataclass
class Row:
    label: str
    quantize_seconds: float | None
    perplexity: dict[str, float] = field(default_factory=dict)
    gptq_loss: float | None = None


def protocol_windows(protocol: Protocol, tokenizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(calibration [n_samples, seqlen], {eval set: windows [n, seqlen]}) as the protocol says."""
    calib = data.calibration_windows(tokenizer, protocol.calib_sources, protocol.n_samples,
                                     protocol.seqlen, protocol.seed)
    evals = {name: data.eval_windows(tokenizer, name, protocol.eval_windows, protocol.seqlen)
             for name in protocol.eval_sets}
    return calib, evals


def run_protocol(protocol: Protocol, model_name: str = "demo", progress: Progress | None = None,
                 on_row: Callable[[Row], None] | None = None, device: str = "cpu") -> list[Row]:
    """Quantize and evaluate every variant of ``protocol``; return one Row per variant."""
    _, tokenizer = data.load_model(model_name)
    calib, evals = protocol_windows(protocol, tokenizer)
    return run_variants(lambda: data.load_model(model_name, device=device)[0], calib, evals,
                        protocol.variants, device, progress, on_row)


def run_variants(load: Callable[[], torch.nn.Module], calib: torch.Tensor, evals: dict[str, torch.Tensor],
                 variants: tuple[Variant, ...], device: str = "cpu", progress: Progress | None = None,
                 on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """For each variant: a fresh float model from ``load()``, quantized on ``device``, then
    perplexity on every eval set."""
    rows = []
    for variant in variants:
        model = load()
        row = Row(variant.label, None)
        if variant.method:
            t0 = time.perf_counter()
            results = quantize_model(model, calib, variant.config, method=variant.method, device=device,
                                     progress=_tagged(progress, variant.label) or False)
            row.quantize_seconds = time.perf_counter() - t0
            if variant.method == "gptq":
                row.gptq_loss = sum(r.loss for r in results.values())
        for name, windows in evals.items():
            row.perplexity[name] = perplexity(model, windows, progress=_tagged(progress, f"{variant.label} {name}"))
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def _tagged(progress: Progress | None, tag: str) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total, msg: progress(done, total, f"{tag}: {msg}")


def format_table(rows: list[Row], protocol: Protocol) -> str:
    names = list(protocol.eval_sets)
    head = f"{'variant':<26}" + "".join(f"{n:>22}" for n in names) + f"{'quantize s':>12}"
    lines = [protocol.describe(), head, "-" * len(head)]
    for r in rows:
        secs = "" if r.quantize_seconds is None else f"{r.quantize_seconds:.1f}"
        lines.append(f"{r.label:<26}" + "".join(f"{r.perplexity[n]:>22.3f}" for n in names) + f"{secs:>12}")
    return "\n".join(lines)
