"""Calibration studies: which calibration data, and how much of it.

    windows = study_windows(tokenizer)                       # tokenize once (needs the corpora)
    calib, evals = calibration_sets(windows), eval_sets(windows)
    matrix = cross_domain(load, calib, evals)                # calibrate on each, evaluate on each
    sweep = sample_sweep(load, windows["calib.austen"], (8, 16, 32, 64, 128), evals)
    sweep.enough("pride_and_prejudice")                      # where more samples stop helping

``load()`` returns a fresh float model on the device (see ``protocol.run_variants``), so
the studies run the same from the cache, from a GGUF, or on a bare GPU machine from a
windows file (``save_windows`` / ``load_windows``).

Held out: a calibration source that is also an evaluation set (Moby Dick, the Python docs)
samples its windows only from tokens *outside* the evaluation region the protocol uses
(after dropping the first 5%, the first ``eval_windows`` x ``seqlen`` tokens), so no
calibration window overlaps an evaluation window. Austen calibration is Emma + Mansfield
Park; its evaluation is Pride and Prejudice, a different book.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import data
from .atomic import chmod_per_umask
from .config import QuantConfig
from .errors import CalibrationError
from .protocol import Row, Variant, run_variants

Progress = Callable[[int, int, str], None]
Loader = Callable[[], torch.nn.Module]

# label -> corpora joined into that calibration source (the demo's three domains)
DEMO_SOURCES: dict[str, tuple[str, ...]] = {
    "austen": ("emma", "mansfield_park"),
    "moby_dick": ("moby_dick",),
    "python_docs": ("python_docs",),
}
EVAL_SETS = ("pride_and_prejudice", "moby_dick", "python_docs")
STUDY_CONFIG = QuantConfig(bits=4, group_size=128, sym=True)


# ------------------------------------------------------------------------------ windows

def heldout_windows(tokenizer, corpora: tuple[str, ...], n_samples: int, seqlen: int = 512, seed: int = 0,
                    eval_sets: tuple[str, ...] = EVAL_SETS, eval_windows: int = 64) -> torch.Tensor:
    """Random calibration windows int64 [n_samples, seqlen] of ``corpora`` (joined by blank lines),
    never overlapping the protocol's evaluation windows.

    Without an evaluation set among ``corpora`` this is exactly ``data.calibration_windows``
    (same seed, same windows, so n windows are the first n of any larger draw). A source that
    is an evaluation set must be a single corpus; its windows start at ``rng.randint`` over
    the starts whose window lies wholly before or after the evaluation region.
    """
    corpora = tuple(corpora)
    evaluated = [c for c in corpora if c in eval_sets]
    if "austen" in corpora and set(data._AUSTEN) & set(eval_sets):
        raise CalibrationError(f"'austen' joins all six novels, including the evaluation set(s) "
                               f"{sorted(set(data._AUSTEN) & set(eval_sets))}; name the novels to "
                               f"calibrate on instead, e.g. ('emma', 'mansfield_park')")
    if not evaluated:
        return data.calibration_windows(tokenizer, corpora, n_samples, seqlen, seed)
    if len(corpora) > 1:
        raise CalibrationError(f"calibration source {corpora} joins an evaluation set ({evaluated[0]}) with "
                               f"other corpora; give the evaluation corpus as a source of its own")
    if n_samples < 1 or seqlen < 1:
        raise CalibrationError(f"n_samples={n_samples}, seqlen={seqlen}: both must be >= 1")
    ids = data.tokenize(tokenizer, data.load_text(corpora[0]))                 # [T]
    t = len(ids)
    lo = int(0.05 * t)                                                         # as data.eval_windows
    hi = lo + min(eval_windows, (t - lo) // seqlen) * seqlen                   # eval region [lo, hi)
    starts = heldout_starts(t, seqlen, lo, hi, n_samples, seed)
    if not starts:
        raise CalibrationError(f"{corpora[0]} has {t} tokens; after holding out its evaluation region "
                               f"[{lo}, {hi}) no window of {seqlen} tokens is left for calibration")
    return torch.stack([ids[s:s + seqlen] for s in starts])                    # [n_samples, seqlen]


def heldout_starts(n_tokens: int, seqlen: int, lo: int, hi: int, n_samples: int, seed: int) -> list[int]:
    """``n_samples`` window starts s, drawn with ``random.Random(seed)`` uniformly among those whose
    window [s, s + seqlen) lies wholly before ``lo`` or wholly in [hi, n_tokens - 1) (leaving a next
    token, as data.calibration_windows does); [] if there is none."""
    before = max(0, lo - seqlen + 1)                                           # starts 0 .. lo - seqlen
    after = max(0, n_tokens - seqlen - hi)                                     # starts hi .. T - seqlen - 1
    if before + after < 1:
        return []
    rng = random.Random(seed)
    return [u if u < before else hi + u - before
            for u in (rng.randint(0, before + after - 1) for _ in range(n_samples))]


def apportion(n: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of n into integer parts proportional to ``weights`` (as the lab's
    "mixture" sampling strategy splits its windows)."""
    if len(weights) == 0 or min(weights) < 0 or sum(weights) <= 0:
        raise CalibrationError(f"mixture weights {weights} must be non-negative and not all zero")
    exact = [n * w / sum(weights) for w in weights]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[:n - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_windows(tokenizer, sources: dict[str, tuple[str, ...]], weights: dict[str, float],
                    n_samples: int, seqlen: int = 512, seed: int = 0, eval_sets: tuple[str, ...] = EVAL_SETS,
                    eval_windows: int = 64) -> torch.Tensor:
    """Windows [n_samples, seqlen] drawn from several held-out sources in the proportions ``weights``
    ({label: weight}; labels of ``sources``): source i gives its share, sampled with seed + i."""
    unknown = set(weights) - set(sources)
    if unknown:
        raise CalibrationError(f"mixture weights name {sorted(unknown)}, which are not sources {list(sources)}")
    labels = list(weights)
    counts = apportion(n_samples, [float(weights[label]) for label in labels])
    parts = [heldout_windows(tokenizer, sources[label], c, seqlen, seed + i, eval_sets, eval_windows)
             for i, (label, c) in enumerate(zip(labels, counts)) if c > 0]
    return torch.cat(parts)


def study_windows(tokenizer, sources: dict[str, tuple[str, ...]] = DEMO_SOURCES,
                  mixture: dict[str, float] | None = None, n_samples: int = 128, max_samples: int = 256,
                  seqlen: int = 512, seed: int = 0, eval_sets: tuple[str, ...] = EVAL_SETS,
                  eval_windows: int = 64, kl_windows: int = 8) -> dict[str, torch.Tensor]:
    """Every token window the studies need, in one dict of int64 tensors [n, seqlen]:

    ``calib.<label>``: n_samples held-out windows per source (``max_samples`` for the first
    source, whose prefixes the sample-count sweep uses); ``calib.mixture``: the mixture
    (equal weights of all sources by default); ``eval.<name>``: the protocol's evaluation
    windows; ``kl``: ``kl_windows`` windows of the first source with seed + 1000, for
    measuring a layer's effect on the output (held out from the evaluation sets too).
    """
    first = next(iter(sources))
    out = {f"calib.{label}": heldout_windows(tokenizer, corpora, max(n_samples, max_samples) if label == first
                                             else n_samples, seqlen, seed, eval_sets, eval_windows)
           for label, corpora in sources.items()}
    if len(sources) > 1:
        out["calib.mixture"] = mixture_windows(tokenizer, sources, mixture or dict.fromkeys(sources, 1.0),
                                               n_samples, seqlen, seed, eval_sets, eval_windows)
    out.update({f"eval.{name}": data.eval_windows(tokenizer, name, eval_windows, seqlen) for name in eval_sets})
    if kl_windows:
        out["kl"] = heldout_windows(tokenizer, sources[first], kl_windows, seqlen, seed + 1000, eval_sets,
                                    eval_windows)
    return out


def calibration_sets(windows: dict[str, torch.Tensor], n_samples: int | None = None) -> dict[str, torch.Tensor]:
    """{label: calibration ids} from ``study_windows``' dict (each cut to n_samples if given), the
    demo's sources first in their usual order (a safetensors file returns its keys sorted)."""
    out = {k.removeprefix("calib."): v[:n_samples] for k, v in windows.items() if k.startswith("calib.")}
    return _ordered(out, (*DEMO_SOURCES, "mixture"))


def eval_sets(windows: dict[str, torch.Tensor], n_windows: int | None = None) -> dict[str, torch.Tensor]:
    """{name: evaluation windows} from ``study_windows``' dict, the protocol's sets first, in order."""
    out = {k.removeprefix("eval."): v[:n_windows] for k, v in windows.items() if k.startswith("eval.")}
    return _ordered(out, EVAL_SETS)


def _ordered(d: dict, first: tuple[str, ...]) -> dict:
    return {**{k: d[k] for k in first if k in d}, **{k: v for k, v in d.items() if k not in first}}


def save_windows(path, windows: dict[str, torch.Tensor]) -> None:
    """Write ``study_windows``' dict to a safetensors file (through a temporary sibling, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in windows.items()}, tmp)
        chmod_per_umask(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_windows(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ------------------------------------------------------------------------------ runs

@dataclass
class Runner:
    """Quantize + evaluate with memoisation: the same (calibration ids, config) runs once."""

    load: Loader
    evals: dict[str, torch.Tensor]
    device: str = "cpu"
    progress: Progress | None = None
    on_row: Callable[[Row], None] | None = None
    done: dict[str, Row] = field(default_factory=dict)

    def run(self, label: str, ids: torch.Tensor | None, config: QuantConfig | None) -> Row:
        key = _key(ids, config)
        if key not in self.done:
            variant = Variant(label, "gptq" if config is not None else None, config)
            (row,) = run_variants(self.load, ids, self.evals, (variant,), self.device, self.progress, self.on_row)
            self.done[key] = row
        return self.done[key]


def _key(ids: torch.Tensor | None, config: QuantConfig | None) -> str:
    h = hashlib.sha1(repr(config.to_dict() if config else None).encode())
    if ids is not None and config is not None:
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class CrossDomain:
    """Perplexity of the model calibrated on each source (rows) on each evaluation set (columns)."""

    calib: list[str]
    evals: list[str]
    perplexity: dict[str, dict[str, float]]     # calib label (and "FP") -> eval set -> perplexity
    gptq_loss: dict[str, float]                 # calib label -> sum over layers of the solver's loss
    config: QuantConfig
    n_samples: dict[str, int]

    def matrix(self) -> list[list[float]]:
        """[len(calib), len(evals)] perplexities, rows in ``calib`` order."""
        return [[self.perplexity[c][e] for e in self.evals] for c in self.calib]

    def best(self) -> dict[str, str]:
        """eval set -> the calibration source with the lowest perplexity on it."""
        return {e: min(self.calib, key=lambda c: self.perplexity[c][e]) for e in self.evals}

    def table(self) -> str:
        c = self.config
        head = f"{'calibration':<16}{'samples':>8}" + "".join(f"{e:>22}" for e in self.evals) + f"{'GPTQ loss':>14}"
        lines = [(f"cross-domain: GPTQ {c.bits}-bit g{c.group_size} {'sym' if c.sym else 'asym'}"
                 f"{' act-order' if c.act_order else ''}; perplexity (lower is better)"), head, "-" * len(head)]
        if "FP" in self.perplexity:
            lines.append(f"{'FP (no quant.)':<16}{'':>8}" + "".join(f"{self.perplexity['FP'][e]:>22.3f}"
                                                                   for e in self.evals))
        best = self.best()
        for cal in self.calib:
            cells = "".join(f"{self.perplexity[cal][e]:>21.3f}{'*' if best[e] == cal else ' '}" for e in self.evals)
            lines.append(f"{cal:<16}{self.n_samples[cal]:>8}{cells}{self.gptq_loss[cal]:>14.4g}")
        lines.append("* best calibration for that evaluation set")
        return "\n".join(lines)


def cross_domain(load: Loader, calib: dict[str, torch.Tensor], evals: dict[str, torch.Tensor],
                 config: QuantConfig = STUDY_CONFIG, device: str = "cpu", fp: bool = True,
                 runner: Runner | None = None, progress: Progress | None = None) -> CrossDomain:
    """Calibrate GPTQ on each ``calib`` set ({label: ids [n, seqlen]}), evaluate each quantized
    model on every ``evals`` set ({name: windows}); with ``fp``, the float model too."""
    if not calib or not evals:
        raise CalibrationError(f"cross_domain needs calibration sets and evaluation sets, got "
                               f"{list(calib)} and {list(evals)}")
    runner = runner or Runner(load, evals, device, progress)
    ppl, loss = {}, {}
    if fp:
        ppl["FP"] = runner.run("FP", None, None).perplexity
    for label, ids in calib.items():
        row = runner.run(label, ids, config)
        ppl[label], loss[label] = row.perplexity, row.gptq_loss
    return CrossDomain(list(calib), list(evals), ppl, loss, config, {k: int(v.shape[0]) for k, v in calib.items()})


# ------------------------------------------------------------------------------ sample count

def enough_samples(n_samples: list[int], values: list[float], threshold: float = 0.01) -> int | None:
    """The smallest n of the sweep after which every further doubling improves ``values`` (lower is
    better, e.g. perplexity) by less than ``threshold`` (relative): the point where more samples
    stop helping. None if the last doubling of the sweep still helps by ``threshold`` or more.
    ``n_samples`` must be increasing, each twice the one before."""
    if len(n_samples) != len(values) or len(n_samples) < 2:
        raise CalibrationError(f"need at least two points with one value each, got {n_samples} and {values}")
    if any(b != 2 * a for a, b in itertools.pairwise(n_samples)):
        raise CalibrationError(f"n_samples={list(n_samples)} must double at each step (e.g. 8, 16, 32)")
    gains = [(a - b) / a for a, b in itertools.pairwise(values)]             # relative improvement per doubling
    if gains[-1] >= threshold:
        return None
    i = len(gains)
    while i > 0 and gains[i - 1] < threshold:
        i -= 1
    return n_samples[i]


@dataclass
class SampleSweep:
    n_samples: list[int]
    gptq_loss: list[float]                      # sum over layers of the solver's loss (own calibration)
    perplexity: dict[str, list[float]]          # eval set -> one value per n
    config: QuantConfig
    threshold: float = 0.01

    def enough(self, eval_set: str) -> int | None:
        return enough_samples(self.n_samples, self.perplexity[eval_set], self.threshold)

    def rule(self) -> str:
        return (f"rule: the smallest n after which every further doubling of the calibration samples "
                f"lowers perplexity by less than {self.threshold:.0%}")

    def table(self) -> str:
        names = list(self.perplexity)
        head = f"{'samples':>8}{'GPTQ loss':>14}" + "".join(f"{n:>22}" for n in names)
        lines = [(f"sample-count sweep: GPTQ {self.config.bits}-bit g{self.config.group_size}; "
                 f"perplexity (change vs. half as many samples)"), head, "-" * len(head)]
        for i, n in enumerate(self.n_samples):
            cells = ""
            for name in names:
                v = self.perplexity[name]
                change = "" if i == 0 else f" ({(v[i] - v[i - 1]) / v[i - 1]:+.1%})"
                cells += f"{v[i]:>13.3f}{change:>9}"
            lines.append(f"{n:>8}{self.gptq_loss[i]:>14.4g}{cells}")
        lines.append(self.rule())
        for name in names:
            e = self.enough(name)
            lines.append(f"  {name}: " + (f"enough at n = {e}" if e is not None else
                                          f"not reached: the last doubling ({self.n_samples[-2]} -> "
                                          f"{self.n_samples[-1]}) still helps by >= {self.threshold:.0%}"))
        return "\n".join(lines)


def sample_sweep(load: Loader, pool: torch.Tensor, n_samples: tuple[int, ...], evals: dict[str, torch.Tensor],
                 config: QuantConfig = STUDY_CONFIG, device: str = "cpu", threshold: float = 0.01,
                 runner: Runner | None = None, progress: Progress | None = None) -> SampleSweep:
    """GPTQ with the first n windows of ``pool`` [N, seqlen] for each n (nested sets, so a curve
    reflects the count, not a new draw), evaluated on ``evals``."""
    if max(n_samples) > pool.shape[0]:
        raise CalibrationError(f"the sweep needs {max(n_samples)} windows; the pool has {pool.shape[0]}")
    enough_samples(list(n_samples), [1.0] * len(n_samples))                # validates the doubling
    runner = runner or Runner(load, evals, device, progress)
    rows = [runner.run(f"n={n}", pool[:n], config) for n in n_samples]
    return SampleSweep(list(n_samples), [r.gptq_loss for r in rows],
                       {e: [r.perplexity[e] for r in rows] for e in evals}, config, threshold)
