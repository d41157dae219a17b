"""The GPTQ solver (Frantar et al., 2022): one layer, one Hessian, one solve.

Life of a layer, as in the reference code:
    acc = HessianAccumulator(in_features)
    acc.add(x)            # any number of batches of inputs [..., K]
    result = solve(weight, acc.hessian(), config)

``solve`` is a pure function of the weight, the Hessian and the config: it
never prints and never touches a module, so a notebook can re-solve a cached
layer with other settings in well under a second.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from .config import QuantConfig
from .errors import NumericalError
from .quant import compute_qparams, quantize, rtn

# Damping is raised by this factor, at most this many times, when Cholesky fails.
DAMP_ESCALATION = 10.0
MAX_ESCALATIONS = 6


class HessianAccumulator:
    """Running H = 2/n * sum_i x_i x_i^T over the rows x_i of every batch added.

    The scaling is the reference code's (2/nsamples): the mean over tokens of
    the layer-output squared error's Hessian. Accumulated in float32.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian_sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_rows = 0

    def add(self, x: torch.Tensor, chunk_rows: int = 4096) -> None:
        """x [..., K]: every row is one token's input to the layer."""
        x = x.reshape(-1, x.shape[-1])
        if not torch.isfinite(x).all():
            raise NumericalError("layer input contains NaN or Inf; check the model's weights "
                                 "and the calibration data (or run in float32)")
        for start in range(0, x.shape[0], chunk_rows):
            xc = x[start:start + chunk_rows]                 # [rows, K]
            if xc.device.type == "cuda":
                xc = xc.float()
            # On CPU, bf16 inputs multiply in bf16 (fp32 accumulation inside the kernel,
            # several times faster than fp32); each chunk's sum is added in float32.
            self.hessian_sum += (xc.t() @ xc).float()        # [K, K]
        self.n_rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n_rows == 0:
            raise NumericalError("no calibration rows reached this layer; its Hessian is empty")
        return self.hessian_sum * (2.0 / self.n_rows)


@dataclass
class GPTQResult:
    """What one solve produced. Shapes: N = out_features, K = in_features, G = groups."""

    codes: torch.Tensor          # [N, K] uint8, in original column order
    scales: torch.Tensor         # [N, G] float32
    zeros: torch.Tensor          # [N, G] int32, true zero points
    g_idx: torch.Tensor          # [K] int32
    column_loss: torch.Tensor    # [K] sum over rows of (w - q)^2 / [H^-1]_jj^2 / 2, original order
    perm: torch.Tensor | None    # [K] act-order permutation (None without act_order)
    damp_used: float             # absolute damping added to the diagonal
    damp_escalations: int        # how many times damping had to be raised
    dead_channels: torch.Tensor  # [K] bool: inputs that were always zero
    condition_number: float      # of the damped Hessian
    bits: int
    group_size: int
    sym: bool
    notes: list[str] = field(default_factory=list)

    @property
    def loss(self) -> float:
        """Total GPTQ loss (the objective's value), summed over columns."""
        return float(self.column_loss.sum())

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long().to(self.scales.device)
        return self.scales[:, g] * (self.codes.float() - self.zeros[:, g].float())

    def to(self, device: torch.device | str) -> GPTQResult:
        """The same result with every tensor on ``device``."""
        moved = {f: (v.to(device) if isinstance(v, torch.Tensor) else v) for f, v in self.__dict__.items()}
        return GPTQResult(**moved)


def _damped_inverse_cholesky(hessian: torch.Tensor, damp: float):
    """Upper Cholesky factor of (H + damp*mean(diag) I)^-1, escalating damp on failure."""
    if not bool(torch.isfinite(hessian).all()):
        raise NumericalError("the Hessian contains NaN or Inf; the layer's inputs overflowed (run the "
                             "calibration forward in float32: compute_dtype=torch.float32)")
    diag_mean = float(torch.diag(hessian).mean())
    base = max(diag_mean, 1e-12)
    rel = damp if damp > 0 else 1e-8
    for escalation in range(MAX_ESCALATIONS + 1):
        frac = damp if escalation == 0 else rel * DAMP_ESCALATION ** escalation
        h = hessian.clone()
        h.diagonal().add_(frac * base)
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            hinv = torch.cholesky_inverse(chol)
            hinv_chol, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                cond = condition_estimate(chol)
                return hinv_chol, frac * base, escalation, cond
    raise NumericalError(
        f"the Hessian is not positive definite even with damping raised to "
        f"{rel * DAMP_ESCALATION ** MAX_ESCALATIONS:g} x mean diagonal ({base:.3g}). {_diagnose(hessian)}"
    )


def _diagnose(hessian: torch.Tensor) -> str:
    """Why a Hessian resists damping, with the numbers (called only when the solve has failed)."""
    diag = torch.diag(hessian)
    try:
        eig = torch.linalg.eigvalsh((hessian + hessian.T).double() / 2)          # [K] ascending
        spectrum = (f"smallest eigenvalue {float(eig[0]):.3g}, largest {float(eig[-1]):.3g}, "
                    f"rank ~{int((eig > eig[-1].abs() * 1e-7).sum())}")
    except RuntimeError as e:                                 # torch.linalg.LinAlgError
        spectrum = f"eigenvalues not computable ({e})"
    asym = float((hessian - hessian.T).abs().max())
    return (f"Diagnostics: K={hessian.shape[0]}, {spectrum}, negative diagonal entries="
            f"{int((diag < 0).sum())}, zero diagonal entries (dead channels)={int((diag == 0).sum())}, "
            f"max asymmetry {asym:.3g}. A Hessian from HessianAccumulator (2/n X^T X) is positive "
            f"semi-definite and damping always repairs it when singular (too few calibration tokens "
            f"for in_features, duplicate samples, dead channels); negative eigenvalues mean it was built "
            f"or edited elsewhere or lost precision: rebuild it from calibration inputs in float32 with "
            f"more, distinct samples, or raise damp")


@contextlib.contextmanager
def one_thread(enabled: bool = True):
    """Run torch on one intra-op thread, restored after. The column loop is thousands of ops on
    vectors of N floats: thread hand-offs cost more than they save (5-7x slower with 2 threads
    on a busy 2-core CPU)."""
    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def condition_estimate(chol: torch.Tensor) -> float:
    """Condition number estimate of L L^T from its Cholesky factor: (max/min diag(L))^2.
    A lower bound that is cheap (no eigendecomposition); the inspector computes the
    exact spectrum when it is asked for."""
    d = torch.diagonal(chol).abs()
    return float((d.max() / d.min()) ** 2)


def _group_params(w: torch.Tensor, config: QuantConfig):
    """Static per-group qparams from w [N, K] in original order -> list of (scale, zero)."""
    size = config.group_size
    return [compute_qparams(w[:, s:s + size], config.bits, config.sym) for s in range(0, w.shape[1], size)]


def solve(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig) -> GPTQResult:
    """Quantize ``weight`` [N, K] with GPTQ against ``hessian`` [K, K].

    Follows the reference algorithm: dead inputs (zero Hessian diagonal) get a unit
    diagonal and zero weight; optional act-order permutation; damping; the upper
    Cholesky factor of the inverse Hessian; lazy block updates. Blocks are aligned
    to groups, so each group's grid is fitted on fully updated weights (exactly
    the unblocked algorithm). Inputs are not modified.
    """
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight in_features={k}")
    dev = weight.device
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=dev, dtype=torch.float32).clone()
    if not torch.isfinite(w).all():
        raise NumericalError("the weight contains NaN or Inf")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    notes = []
    if bool(dead.all()):
        notes.append("every input channel is dead (always zero): the layer's output does not depend on "
                     "its weights for this calibration; quantized to zero")

    group = k if config.group_size == -1 else config.group_size
    static = _group_params(w, config) if (config.static_groups and config.group_size != -1) else None

    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]

    hinv, damp_abs, escalations, cond = _damped_inverse_cholesky(h, config.damp)
    if escalations:
        notes.append(f"Cholesky failed with damp={config.damp}; succeeded after raising damping "
                     f"{escalations} time(s) to {damp_abs:.3g} (absolute). The Hessian is (near-)singular: "
                     f"too few or duplicate calibration samples, or dead input channels "
                     f"({int(dead.sum())} here)")

    q_codes = torch.zeros(n, k, dtype=torch.uint8, device=dev)
    losses = torch.zeros(n, k, device=dev)
    n_groups = math.ceil(k / group)
    scales = torch.zeros(n, n_groups, device=dev)
    zeros = torch.zeros(n, n_groups, device=dev)
    g_of_col = torch.zeros(k, dtype=torch.int32)   # group of each (permuted) column

    block = max(1, config.block_size // group) * group if group <= config.block_size else group
    if config.group_size == -1:
        block = config.block_size
        scales[:, 0], zeros[:, 0] = compute_qparams(w, config.bits, config.sym)
    scale = zero = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        with one_thread(dev.type == "cpu"):      # thousands of tiny ops: threads only hurt
            for i in range(i2 - i1):
                col = i1 + i
                gi = _group_of(col, perm, group, static is not None, config.group_size == -1)
                if config.group_size == -1:
                    scale, zero = scales[:, 0], zeros[:, 0]
                elif static is not None:
                    scale, zero = static[gi]
                elif col % group == 0:
                    scale, zero = compute_qparams(w1[:, i:i + group], config.bits, config.sym)
                    scales[:, gi], zeros[:, gi] = scale, zero
                g_of_col[col] = gi
                wc = w1[:, i]
                codes = quantize(wc, scale, zero, config.bits)
                qc = scale * (codes - zero)
                d = hinv1[i, i]
                q_codes[:, col] = codes.to(torch.uint8)
                losses[:, col] = (wc - qc) ** 2 / d ** 2
                e = (wc - qc) / d
                w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
                err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if static is not None:
        for gi, (s, z) in enumerate(static):
            scales[:, gi], zeros[:, gi] = s, z
    column_loss = losses.sum(0) / 2
    g_idx = g_of_col
    if perm is not None:
        inv = torch.argsort(perm)
        q_codes, column_loss, g_idx = q_codes[:, inv], column_loss[inv], g_of_col[inv.cpu()]
    return GPTQResult(
        codes=q_codes, scales=scales, zeros=zeros.round().to(torch.int32), g_idx=g_idx.to(torch.int32),
        column_loss=column_loss, perm=perm, damp_used=damp_abs, damp_escalations=escalations,
        dead_channels=dead, condition_number=cond, bits=config.bits, group_size=config.group_size,
        sym=config.sym, notes=notes,
    )


def rtn_result(weight: torch.Tensor, config: QuantConfig) -> GPTQResult:
    """Round-to-nearest in the same result shape as ``solve`` (no Hessian: losses are NaN)."""
    codes, scales, zeros, g_idx = rtn(weight.detach(), config.bits, config.group_size, config.sym)
    k = weight.shape[1]
    return GPTQResult(
        codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, column_loss=torch.full((k,), math.nan),
        perm=None, damp_used=0.0, damp_escalations=0, dead_channels=torch.zeros(k, dtype=torch.bool),
        condition_number=math.nan, bits=config.bits, group_size=config.group_size, sym=config.sym,
    )


def _group_of(col: int, perm, group: int, static: bool, per_channel: bool) -> int:
    """Group index of permuted column ``col``: by position in solve order, or, for static
    groups, by the column's original index."""
    if per_channel:
        return 0
    if static and perm is not None:
        return int(perm[col]) // group
    return col // group
