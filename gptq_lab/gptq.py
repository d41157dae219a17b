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
import os
from dataclasses import dataclass, field

import torch

from .config import QuantConfig
from .errors import NumericalError
from .quant import compute_qparams, maxq, pack_qweight, pack_qzeros, rtn, values_per_run

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

    def add(self, x: torch.Tensor, chunk_rows: int | None = None) -> None:
        """x [..., K]: every row is one token's input to the layer."""
        x = x.reshape(-1, x.shape[-1])
        if not torch.isfinite(x).all():
            raise NumericalError("layer input contains NaN or Inf; check the model's weights "
                                 "and the calibration data (or run in float32)")
        cuda = x.device.type == "cuda"
        # Chunks of ~256 MiB in float32 on CUDA, one addmm each, with float32 products and sums
        # (the reference code's inp.float()). On CUDA, fp16/bf16 values are exact in TF32 (10 and
        # 7 mantissa bits), so TF32 tensor cores lose nothing there. A bf16 x^T x on the CPU would
        # be about 4x faster but rounds every chunk's product to 8 bits: H then has negative
        # eigenvalues and GPTQ's loss estimates can be off several-fold (tests/test_gptq.py).
        rows = chunk_rows or (max(4096, (1 << 26) // x.shape[1]) if cuda else 4096)
        with _tf32(cuda and x.dtype in (torch.float16, torch.bfloat16)):
            for start in range(0, x.shape[0], rows):
                xc = x[start:start + rows].float()           # [rows, K]
                self.hessian_sum.addmm_(xc.t(), xc)          # [K, K]
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
    qweight: torch.Tensor | None = None   # [K * bits / 32, N] int32: codes in the checkpoint layout,
    qzeros: torch.Tensor | None = None    # [G, N * bits / 32] int32: true zeros; both set by pack()

    @property
    def loss(self) -> float:
        """Total GPTQ loss (the objective's value), summed over columns."""
        return float(self.column_loss.sum())

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long().to(self.scales.device)
        return self.scales[:, g] * (self.codes.float() - self.zeros[:, g].float())

    def pack(self) -> GPTQResult:
        """Set ``qweight`` and ``qzeros`` (QuantLinear's layout, packed on the codes' device) when
        K and N are multiples of ``values_per_run(bits)``; otherwise leave them None. -> self."""
        n, k = self.codes.shape
        per = values_per_run(self.bits)
        if k % per == 0 and n % per == 0:
            self.qweight = pack_qweight(self.codes, self.bits)                          # [K*b/32, N]
            self.qzeros = pack_qzeros(self.zeros, self.bits, v1=False)                  # [G, N*b/32]
        return self

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
def _tf32(enabled: bool):
    """Allow TF32 matmuls on CUDA inside the block (restored after)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or before
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


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


@dataclass
class InverseFactor:
    """What the column loop needs from a Hessian, computed once per (Hessian, damp, act_order)."""

    hinv_chol: torch.Tensor      # [K, K] upper Cholesky factor of the damped inverse, solve order
    perm: torch.Tensor | None    # [K] act-order permutation
    dead: torch.Tensor           # [K] bool: zero diagonal (inputs that were always zero)
    damp_abs: float
    escalations: int
    condition_number: float      # condition_estimate of the damped Hessian


def inverse_factor(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> InverseFactor:
    """Factor ``hessian`` [K, K] for ``solve``: dead inputs get a unit diagonal, optional
    act-order permutation (decreasing diagonal), damping (escalated on failure), then the upper
    Cholesky factor of the inverse. Runs on the Hessian's device."""
    h = hessian.detach().to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        h = h[perm][:, perm]
    hinv_chol, damp_abs, escalations, cond = _damped_inverse_cholesky(h, damp)
    return InverseFactor(hinv_chol, perm, dead, damp_abs, escalations, cond)


def solve(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig,
          factor: InverseFactor | None = None) -> GPTQResult:
    """Quantize ``weight`` [N, K] with GPTQ against ``hessian`` [K, K], on the weight's device.

    Follows the reference algorithm: dead inputs (zero Hessian diagonal) get a unit diagonal and
    zero weight; optional act-order permutation; damping; the upper Cholesky factor of the
    inverse; lazy block updates. Blocks are aligned to groups, so each group's grid is fitted on
    fully updated weights (exactly the unblocked algorithm). ``factor``: a precomputed
    ``inverse_factor(hessian, config.damp, config.act_order)`` (re-solving a cached layer with
    other bits or group sizes skips the factorisation). Inputs are not modified.
    """
    _n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight in_features={k}")
    dev = weight.device
    w = weight.detach().to(torch.float32).clone()                                   # [N, K]
    if not torch.isfinite(w).all():
        raise NumericalError("the weight contains NaN or Inf")
    if factor is None:
        factor = inverse_factor(hessian.to(dev), config.damp, config.act_order)
    f = factor
    w[:, f.dead.to(dev)] = 0
    static = None
    if config.static_groups and config.group_size != -1:
        static = [compute_qparams(w[:, s:s + config.group_size], config.bits, config.sym)
                  for s in range(0, k, config.group_size)]
    if f.perm is not None:
        w = w[:, f.perm.to(dev)]
    wt = w.t().contiguous()                                                          # [K, N], solve order
    with one_thread(dev.type == "cpu"):      # thousands of tiny ops: threads only hurt
        codes_t, err_t, scales, zeros, g_of_col = _columns(wt, f.hinv_chol.to(dev), config, f.perm, static)
    column_loss = (err_t ** 2).sum(1) / 2                                            # [K]
    codes = codes_t.t().to(torch.uint8)                                              # [N, K]
    if f.perm is not None:
        inv = torch.argsort(f.perm)
        codes, column_loss, g_of_col = codes[:, inv.to(dev)], column_loss[inv.to(dev)], g_of_col[inv.cpu()]
    notes = []
    if f.escalations:
        notes.append(f"Cholesky failed with damp={config.damp}; succeeded after raising damping "
                     f"{f.escalations} time(s) to {f.damp_abs:.3g} (absolute). The Hessian is (near-)singular: "
                     f"too few or duplicate calibration samples, or dead input channels "
                     f"({int(f.dead.sum())} here)")
    if bool(f.dead.all()):
        notes.append("every input channel is dead (always zero): the layer's output does not depend on "
                     "its weights for this calibration; quantized to zero")
    return GPTQResult(
        codes=codes.contiguous(), scales=scales, zeros=zeros.round().to(torch.int32),
        g_idx=g_of_col.to(torch.int32), column_loss=column_loss, perm=f.perm, damp_used=f.damp_abs,
        damp_escalations=f.escalations, dead_channels=f.dead.clone(), condition_number=f.condition_number,
        bits=config.bits, group_size=config.group_size, sym=config.sym, notes=notes)


def _columns(wt: torch.Tensor, hinv: torch.Tensor, config: QuantConfig, perm, static):
    """The GPTQ column loop on wt [K, N] (solve order, modified in place) with upper factor hinv.

    Returns codes_t [K, N] float, err_t [K, N] ((w - q) / d per column), scales/zeros [N, G],
    g [K] int64 (CPU). Each column is 8 in-place ops on an [N] row (no host sync, no
    temporaries but one); each lazy block ends with one addmm into the columns after it.
    """
    k, n = wt.shape
    dev = wt.device
    per_channel = config.group_size == -1
    group = k if per_channel else config.group_size
    n_groups = math.ceil(k / group)
    scales = torch.zeros(n, n_groups, device=dev)
    zeros = torch.zeros(n, n_groups, device=dev)
    if per_channel:
        block = config.block_size
        scales[:, 0], zeros[:, 0] = compute_qparams(wt.t(), config.bits, config.sym)
        g_of_col = torch.zeros(k, dtype=torch.int64)
    else:
        block = max(1, config.block_size // group) * group if group <= config.block_size else group
        g_of_col = torch.arange(k) // group
    if static is not None:
        for gi, (s, z) in enumerate(static):
            scales[:, gi], zeros[:, gi] = s, z
        g_of_col = (perm.cpu() if perm is not None else torch.arange(k)) // group
    fixed_grid = per_channel or static is not None
    groups = g_of_col.tolist()
    codes_t, err_t = torch.empty(k, n, device=dev), torch.empty(k, n, device=dev)
    run = block_runner(dev)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        grid = None
        if fixed_grid:
            cols = torch.tensor(groups[i1:i2], device=dev)
            grid = (scales[:, cols].t(), zeros[:, cols].t())                        # [B, N] each
        fitted = run(wt[i1:i2], hinv[i1:i2, i1:i2], codes_t[i1:i2], err_t[i1:i2], grid, group,
                     config.bits, config.sym)
        for j, (scale, zero) in enumerate(fitted):
            scales[:, groups[i1 + j * group]], zeros[:, groups[i1 + j * group]] = scale, zero
        if i2 < k:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err_t[i1:i2], alpha=-1)
    return codes_t, err_t, scales, zeros, g_of_col


def column_block(w1: torch.Tensor, h1: torch.Tensor, c1: torch.Tensor, e1: torch.Tensor,
                 grid: tuple[torch.Tensor, torch.Tensor] | None, group: int, bits: int,
                 sym: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One lazy block of the column loop, in place: w1 [B, N] weights in solve order (updated),
    h1 [B, B] its block of the inverse factor, c1/e1 [B, N] receive codes and (w - q) / d.

    grid: per-column (scales, zeros) [B, N] when the grid is fixed (per-channel or static
    groups); else None and each group's grid is fitted on the updated weights at the group's
    first column (the block starts on a group boundary) and returned, in order.
    Each column is 8 in-place ops on an [N] row: no host sync, so the block can be captured
    in a CUDA graph (``gptq_lab.graphs``).
    """
    top = float(maxq(bits))
    fitted = []
    scale = zero = None
    for i in range(w1.shape[0]):
        if grid is not None:
            scale, zero = grid[0][i], grid[1][i]
        elif i % group == 0:
            scale, zero = compute_qparams(w1[i:i + group].t(), bits, sym)
            fitted.append((scale, zero))
        wc, c, e = w1[i], c1[i], e1[i]
        torch.div(wc, scale, out=c)
        c.round_().add_(zero).clamp_(0, top)                   # codes
        torch.addcmul(wc, scale, c - zero, value=-1, out=e)    # w - q
        e.div_(h1[i, i])
        if i + 1 < w1.shape[0]:
            w1[i + 1:].addr_(h1[i, i + 1:], e, alpha=-1)
    return fitted


def block_runner(device: torch.device):
    """column_block itself, or on CUDA its CUDA-graph replay (one launch per block instead of
    about a thousand; same kernels, same results). GPTQ_LAB_CUDA_GRAPHS=0 turns graphs off."""
    if device.type == "cuda" and os.environ.get("GPTQ_LAB_CUDA_GRAPHS", "1") != "0":
        from .graphs import graphed_column_block
        return graphed_column_block
    return column_block


def rtn_result(weight: torch.Tensor, config: QuantConfig) -> GPTQResult:
    """Round-to-nearest in the same result shape as ``solve`` (no Hessian: losses are NaN)."""
    codes, scales, zeros, g_idx = rtn(weight.detach(), config.bits, config.group_size, config.sym)
    k = weight.shape[1]
    return GPTQResult(
        codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, column_loss=torch.full((k,), math.nan),
        perm=None, damp_used=0.0, damp_escalations=0, dead_channels=torch.zeros(k, dtype=torch.bool),
        condition_number=math.nan, bits=config.bits, group_size=config.group_size, sym=config.sym,
    )
