"""Task accuracy through lm-evaluation-harness (the ``lmeval`` extra: ``pip install -e .[lmeval]``).

    table = score(model, tokenizer, ["mmlu"], limit=50)                       # hub data, if reachable
    table = score(model, tokenizer, ["my_task"], include_path="tasks/")     # local task YAMLs
    table = score(model, tokenizer, ["tasks/my_task.yaml"])                 # one YAML file

Any Hugging Face causal LM in memory (float, fake-quantized, or with QuantLinear layers) is
wrapped in lm_eval's ``HFLM`` as is: nothing is loaded from a hub. The result is a tidy
DataFrame with one row per (task, metric): value, stderr, n_docs. A task whose data cannot
be read (the hub unreachable, a missing local file) raises ``TaskDataError``; a missing
``lm_eval`` raises ``ExtraMissingError``.

Local data: in a task YAML given by its path, relative ``dataset_kwargs.data_files`` are read
relative to the YAML's folder; tasks found through ``include_path`` are loaded by lm_eval
itself, which reads relative ``data_files`` from the working directory.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import ConfigError, ExtraMissingError, TaskDataError

COLUMNS = ["task", "metric", "value", "stderr", "n_docs"]


def require_lm_eval():
    """The ``lm_eval`` module, or ExtraMissingError naming the install command."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 (fails early if broken)
    except ImportError as e:
        raise ExtraMissingError(f"task accuracy needs lm-evaluation-harness ({e}); install it with "
                                f"`pip install -e .[lmeval]` or `pip install lm-eval`") from e
    return lm_eval


def task_spec(task):
    """A task name or config dict unchanged; a ``.yaml`` path as a config dict whose relative
    ``data_files`` point into the YAML's folder (YAMLs with ``!function`` tags pass as paths)."""
    if not isinstance(task, (str, Path)) or not str(task).endswith((".yaml", ".yml")):
        return task
    import yaml
    path = Path(task).expanduser()
    if not path.is_file():
        raise TaskDataError(f"task file {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return str(path)                         # lm_eval's own loader knows its tags
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return config

    def resolve(f):
        return f if "://" in f or Path(f).is_absolute() else str(path.parent / f)

    if isinstance(files, str):
        files = resolve(files)
    elif isinstance(files, list):
        files = [resolve(f) for f in files]
    else:
        files = {split: resolve(f) if isinstance(f, str) else [resolve(x) for x in f]
                 for split, f in files.items()}
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": files}
    return config


def task_manager(tasks: list, include_path=None):
    """lm_eval's TaskManager: without the built-in tasks when ``include_path`` (or nothing, for
    configs and YAML paths) defines every named task, as indexing the built-ins takes ~20 s;
    else with them (built once per process and ``include_path``)."""
    from lm_eval.tasks import TaskManager
    path = None if include_path is None else str(include_path)
    names = [t for t in tasks if isinstance(t, str) and not t.endswith((".yaml", ".yml"))]
    local = TaskManager(include_path=path, include_defaults=False)
    if all(n in local.all_tasks for n in names):
        return local
    if path not in _FULL:
        _FULL[path] = TaskManager(include_path=path)
    return _FULL[path]


_FULL: dict = {}


@contextlib.contextmanager
def kept_rng_state() -> Iterator[None]:
    """lm_eval seeds python, numpy and torch globally; put the caller's generators back."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def score(model: nn.Module, tokenizer, tasks: list, include_path=None, limit: float | None = None,
          num_fewshot: int | None = None, batch_size: int = 1, max_length: int | None = None,
          bootstrap_iters: int = 1000) -> pd.DataFrame:
    """Run lm_eval ``tasks`` (names, config dicts or YAML paths) on ``model``.

    model: a transformers causal LM (PreTrainedModel), on any device; tokenizer: its HF
    tokenizer (a copy is given to lm_eval, which may add a pad token). limit: docs per task
    (an int) or a fraction. Returns the tidy table (COLUMNS); stderr is NaN where lm_eval
    gives none.
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"lm_eval scores transformers models; got a {type(model).__name__}")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ConfigError(f"lm_eval needs a Hugging Face tokenizer; got a {type(tokenizer).__name__} "
                          f"(pass tokenizer= to the Evaluator)")
    if not tasks:
        raise ConfigError("no tasks given; name lm_eval tasks, e.g. tasks=['arc_easy']")
    specs = [task_spec(t) for t in tasks]
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
              max_length=max_length)
    try:
        with kept_rng_state():
            out = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=task_manager(specs, include_path),
                                          limit=limit, num_fewshot=num_fewshot, log_samples=False,
                                          bootstrap_iters=bootstrap_iters)
    except (FileNotFoundError, ConnectionError) as e:
        raise TaskDataError(f"the data of {tasks} cannot be read: {e}. Hub datasets need network "
                            f"(or a filled HF cache); local tasks need their data_files") from e
    except KeyError as e:
        raise ConfigError(f"unknown lm_eval task in {tasks}: {e}; local task YAMLs need "
                          f"include_path= (or pass the .yaml path)") from e
    return tidy(out)


def tidy(out: dict) -> pd.DataFrame:
    """lm_eval's results dict -> one row per (task, metric[, filter]): value, stderr, n_docs."""
    rows = []
    n_samples = out.get("n-samples", {})
    for task, metrics in out["results"].items():
        n = n_samples.get(task, {}).get("effective", math.nan)
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue                                 # name, alias, sample_len; stderr below
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric if filt == "none" else f"{metric} ({filt})",
                         "value": float(value), "stderr": _number(stderr), "n_docs": n})
    return pd.DataFrame(rows, columns=COLUMNS)


def _number(x) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan


__all__ = ["COLUMNS", "score", "task_spec", "tidy"]
