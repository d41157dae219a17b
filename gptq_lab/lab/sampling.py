"""Calibration sources and sampling strategies (data only: no plotting, no model).

A source is a corpus name, a file path, raw text, a list of strings (documents) or a
``datasets.Dataset`` (its "text" column). ``read_sources`` turns any of these, or a list or
{label: source} dict of them, into labelled lists of documents.

Strategies, each returning ``Sample(ids [n, seqlen] int64, token_source [n, seqlen] int, ...)``:
- "random": the standard protocol (``data.calibration_windows``): all sources' texts joined
  by blank lines, tokenized once, windows at ``random.Random(seed)`` starts.
- "packed": documents shuffled with the seed, tokenized one by one and joined with the EOS
  token, cut into consecutive windows; ``n_samples`` of those chosen at random.
- "mixture": each source contributes ``weights[i]`` of the windows (equal by default),
  sampled at random starts within that source alone.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import CORPORA, load_text, tokenize
from ..errors import CalibrationError

STRATEGIES = ("random", "packed", "mixture")


@dataclass
class Sample:
    ids: torch.Tensor             # [n, seqlen] int64
    token_source: torch.Tensor    # [n, seqlen] int16: index into labels of each token's source
    labels: list[str]
    doc_lengths: list[int]        # tokens per document (for the summary plot; may be capped)


def _one_source(src, i: int) -> tuple[str, list[str]]:
    """-> (label, documents)."""
    if isinstance(src, str) and src in CORPORA:
        return src, [load_text(src)]
    if isinstance(src, os.PathLike) or (isinstance(src, str) and _is_file(src)):
        return Path(src).name, [load_text(src)]
    if isinstance(src, str):
        if "\n" not in src and " " not in src and (src.endswith((".txt", ".md", ".rst")) or "/" in src):
            raise CalibrationError(f"source {src!r} looks like a file path but no such file exists")
        return f"text {i}", [src]
    if isinstance(src, (list, tuple)) and all(isinstance(s, str) for s in src):
        return f"documents {i}", [s for s in src if s]
    if hasattr(src, "column_names"):                       # a datasets.Dataset
        if "text" not in src.column_names:
            raise CalibrationError(f"dataset has no 'text' column; columns: {src.column_names}")
        return getattr(getattr(src, "info", None), "dataset_name", None) or f"dataset {i}", \
            [t for t in src["text"] if t]
    raise CalibrationError(f"cannot read a calibration source from {type(src).__name__}; pass a corpus "
                           f"name ({', '.join(CORPORA)}), a file path, text, a list of strings or a "
                           f"datasets.Dataset")


def _is_file(s: str) -> bool:
    try:
        return "\n" not in s and len(s) < 4096 and Path(s).is_file()
    except OSError:                       # e.g. a name too long for the file system: it is text
        return False


def read_sources(sources) -> dict[str, list[str]]:
    """Any accepted ``sources`` -> {label: [document, ...]} (labels made unique).

    A list or tuple is a list of sources (each a corpus name, file, text, ...); to give one
    source made of many documents, use a dict: ``{"mine": ["doc 1", "doc 2"]}``."""
    if isinstance(sources, dict):
        items = [(str(k), _one_source(v, i)[1]) for i, (k, v) in enumerate(sources.items())]
    elif isinstance(sources, (list, tuple)):
        items = [_one_source(s, i) for i, s in enumerate(sources)]
    else:
        items = [_one_source(sources, 0)]
    out: dict[str, list[str]] = {}
    for label, docs in items:
        if not docs:
            raise CalibrationError(f"calibration source {label!r} is empty")
        key, j = label, 1
        while key in out:
            j += 1
            key = f"{label} ({j})"
        out[key] = docs
    return out


def sample(tokenizer, sources: dict[str, list[str]], n_samples: int, seqlen: int, seed: int,
           strategy: str = "random", weights=None, max_docs: int = 2000) -> Sample:
    if strategy not in STRATEGIES:
        raise CalibrationError(f"strategy={strategy!r} is not known; use one of {STRATEGIES}")
    if n_samples < 1 or seqlen < 1:
        raise CalibrationError(f"n_samples={n_samples}, seqlen={seqlen}: both must be >= 1")
    labels = list(sources)
    if strategy == "random":
        return _random(tokenizer, sources, labels, n_samples, seqlen, seed, max_docs)
    if strategy == "packed":
        return _packed(tokenizer, sources, labels, n_samples, seqlen, seed, max_docs)
    return _mixture(tokenizer, sources, labels, n_samples, seqlen, seed, weights)


def _random(tokenizer, sources, labels, n, seqlen, seed, max_docs) -> Sample:
    texts = ["\n\n".join(docs) for docs in sources.values()]
    ids = tokenize(tokenizer, "\n\n".join(texts))                       # [T]
    if len(ids) < seqlen + 1:
        raise CalibrationError(f"calibration text has {len(ids)} tokens; seqlen={seqlen} needs at least "
                               f"{seqlen + 1}: use more text or a shorter seqlen")
    # source of each token: by separately tokenized lengths (exact up to the seams)
    lengths = [len(tokenize(tokenizer, t)) for t in texts] if len(texts) > 1 else [len(ids)]
    owner = torch.repeat_interleave(torch.arange(len(texts), dtype=torch.int16), torch.tensor(lengths))
    owner = torch.cat([owner, owner[-1:].expand(max(0, len(ids) - len(owner)))])[:len(ids)]
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(n)]
    return Sample(torch.stack([ids[s:s + seqlen] for s in starts]),
                  torch.stack([owner[s:s + seqlen] for s in starts]), labels,
                  _doc_lengths(tokenizer, sources, max_docs))


def _packed(tokenizer, sources, labels, n, seqlen, seed, max_docs) -> Sample:
    docs = [(i, d) for i, label in enumerate(labels) for d in sources[label]]
    rng = random.Random(seed)
    rng.shuffle(docs)
    eos = getattr(tokenizer, "eos_token_id", None)
    pieces, owners, lengths = [], [], []
    for i, d in docs:
        t = tokenize(tokenizer, d)
        lengths.append(len(t))
        if eos is not None:
            t = torch.cat([t, torch.tensor([eos])])
        pieces.append(t)
        owners.append(torch.full((len(t),), i, dtype=torch.int16))
    stream, owner = torch.cat(pieces), torch.cat(owners)
    available = len(stream) // seqlen
    if available < n:
        raise CalibrationError(f"packed documents give {available} windows of {seqlen} tokens "
                               f"({len(stream)} tokens); n_samples={n} needs more text or a shorter seqlen")
    chosen = rng.sample(range(available), n)
    ids = torch.stack([stream[c * seqlen:(c + 1) * seqlen] for c in chosen])
    return Sample(ids, torch.stack([owner[c * seqlen:(c + 1) * seqlen] for c in chosen]), labels,
                  lengths[:max_docs])


def _mixture(tokenizer, sources, labels, n, seqlen, seed, weights) -> Sample:
    if weights is None:
        w = [1.0] * len(labels)
    elif isinstance(weights, dict):
        w = [float(weights.get(label, 0.0)) for label in labels]
    else:
        w = [float(x) for x in weights]
    if len(w) != len(labels) or min(w) < 0 or sum(w) <= 0:
        raise CalibrationError(f"weights={weights!r} must give one non-negative weight per source "
                               f"({labels}) and not all zero")
    counts = _apportion(n, w)
    rng = random.Random(seed)
    ids, owner = [], []
    for i, (label, count) in enumerate(zip(labels, counts)):
        if count == 0:
            continue
        t = tokenize(tokenizer, "\n\n".join(sources[label]))
        if len(t) < seqlen + 1:
            raise CalibrationError(f"source {label!r} has {len(t)} tokens; seqlen={seqlen} needs at least "
                                   f"{seqlen + 1} for the mixture strategy")
        for _ in range(count):
            s = rng.randint(0, len(t) - seqlen - 1)
            ids.append(t[s:s + seqlen])
            owner.append(torch.full((seqlen,), i, dtype=torch.int16))
    return Sample(torch.stack(ids), torch.stack(owner), labels, _doc_lengths(tokenizer, sources, 2000))


def _apportion(n: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of n into integer parts proportional to weights."""
    exact = [n * x / sum(weights) for x in weights]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[:n - sum(counts)]:
        counts[i] += 1
    return counts


def _doc_lengths(tokenizer, sources, max_docs) -> list[int]:
    docs = [d for docs in sources.values() for d in docs][:max_docs]
    return [len(tokenize(tokenizer, d)) for d in docs]
