"""Evaluation: perplexity by the standard protocol, and agreement with a reference model.

All functions take token windows [n, seqlen] (see ``gptq_lab.data.eval_windows``)
and return plain numbers; progress goes through an optional callback.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Progress = Callable[[int, int, str], None]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(_device_of(model)), use_cache=False).logits.float()


@torch.no_grad()
def token_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
              progress: Progress | None = None) -> torch.Tensor:
    """Negative log-likelihood of every predicted token: [n, seqlen - 1] float32 on CPU."""
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        logits = _logits(model, ids)[:, :-1]                         # [B, T-1, V]
        target = ids[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        out.append(nll.view(target.shape).cpu())
        if progress:
            progress(min(start + batch_size, windows.shape[0]), windows.shape[0], "perplexity")
    return torch.cat(out)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               progress: Progress | None = None) -> float:
    """exp(mean token NLL) over all windows (the protocol's definition)."""
    return math.exp(float(token_nll(model, windows, batch_size, progress).double().mean()))


@dataclass
class Agreement:
    kl: float        # mean over tokens of KL(reference || model), in nats
    top1: float      # fraction of tokens where both models' argmax agree
    tokens: int


@torch.no_grad()
def agreement(model: nn.Module, reference: nn.Module, windows: torch.Tensor, batch_size: int = 4,
              progress: Progress | None = None) -> Agreement:
    """KL divergence and top-1 agreement of ``model`` against ``reference`` on ``windows``."""
    kl_sum, agree, n = 0.0, 0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        logp_ref = F.log_softmax(_logits(reference, ids), dim=-1)   # [B, T, V]
        logp = F.log_softmax(_logits(model, ids).to(logp_ref.device), dim=-1)
        kl_sum += float((logp_ref.exp() * (logp_ref - logp)).sum(-1).double().sum())
        agree += int((logp_ref.argmax(-1) == logp.argmax(-1)).sum())
        n += ids.numel()
        if progress:
            progress(min(start + batch_size, windows.shape[0]), windows.shape[0], "agreement")
    return Agreement(kl=kl_sum / n, top1=agree / n, tokens=n)


@torch.no_grad()
def forward_speed(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Tokens per second of plain forward passes over ``windows`` (after one warm-up batch)."""
    _logits(model, windows[:1, :16])
    t0 = time.perf_counter()
    for start in range(0, windows.shape[0], batch_size):
        _logits(model, windows[start:start + batch_size])
    if _device_of(model).type == "cuda":
        torch.cuda.synchronize()
    return windows.numel() / (time.perf_counter() - t0)
