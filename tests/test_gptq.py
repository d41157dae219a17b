"""The GPTQ solver against an independent oracle, and its behaviour on hard Hessians."""
import math

import pytest
import torch

from gptq_lab import QuantConfig, rtn_result, solve
from gptq_lab.gptq import HessianAccumulator
from gptq_lab.quant import compute_qparams, quantize


def oracle_gptq(weight, hessian, bits, group_size, sym, act_order, damp):
    """Plain, unblocked OBS: one column at a time, the inverse Hessian updated by
    Gaussian elimination (no Cholesky trick, no lazy batches), in float64."""
    w = weight.double().clone()
    h = hessian.double().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros(n, k, dtype=torch.long)
    group = k if group_size == -1 else group_size
    scale = zero = None
    if group_size == -1:
        scale, zero = compute_qparams(w, bits, sym)
    for j in range(k):
        if group_size != -1 and j % group == 0:
            scale, zero = compute_qparams(w[:, j:j + group], bits, sym)
        c = quantize(w[:, j], scale, zero, bits)
        q = scale * (c - zero)
        codes[:, j] = c.long()
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    inv = torch.argsort(order)
    return codes[:, inv]


def correlated_problem(n, k, samples=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k)
    x = torch.randn(samples, k, generator=g) @ (torch.eye(k) + 2 * mix)     # correlated inputs
    x *= torch.linspace(0.2, 3.0, k)                                         # uneven channel scales
    w = torch.randn(n, k, generator=g) * 0.05
    acc = HessianAccumulator(k)
    acc.add(x)
    return w, acc.hessian(), x


@pytest.mark.parametrize("n,k,group_size,act_order,sym,bits", [
    (24, 64, 16, False, True, 4),
    (24, 64, 16, True, True, 4),
    (16, 96, 32, False, False, 3),
    (16, 96, 32, True, False, 3),
    (20, 80, -1, False, True, 4),
    (20, 80, -1, True, False, 2),
    (12, 72, 32, False, True, 4),     # last group shorter (72 = 32 + 32 + 8)
])
def test_solver_matches_unblocked_oracle(n, k, group_size, act_order, sym, bits):
    w, h, _ = correlated_problem(n, k)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                      block_size=32, damp=0.01)
    res = solve(w, h, cfg)
    expected = oracle_gptq(w, h, bits, group_size, sym, act_order, 0.01)
    agree = (res.codes.long() == expected).float().mean().item()
    # Blocked and unblocked orders differ in the last bits; a flipped rounding decision feeds
    # forward through the error updates. 0.995 held here but another machine's BLAS (the GPU
    # host's CPU, torch 2.11) gave 0.9915 on the first case; a wrong update gives far less.
    assert agree >= 0.99, f"only {agree:.4f} of codes agree with the oracle"
    if act_order and group_size != -1:
        assert not torch.equal(res.g_idx, torch.arange(k, dtype=torch.int32) // group_size)


def test_block_size_does_not_change_the_result():
    w, h, _ = correlated_problem(16, 128)
    a = solve(w, h, QuantConfig(group_size=32, block_size=32))
    b = solve(w, h, QuantConfig(group_size=32, block_size=128))
    assert (a.codes == b.codes).float().mean() > 0.999


def test_gptq_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 16, generator=g) @ torch.randn(16, 128, generator=g)   # low-rank structure
    x += 0.1 * torch.randn(1024, 128, generator=g)
    w = torch.randn(64, 128, generator=g) * 0.05
    acc = HessianAccumulator(128)
    acc.add(x)
    h = acc.hessian()
    cfg = QuantConfig(bits=3, group_size=32)
    gptq_w = solve(w, h, cfg).dequantize()
    rtn_w = rtn_result(w, cfg).dequantize()
    err_gptq = ((x @ (gptq_w - w).T) ** 2).mean()
    err_rtn = ((x @ (rtn_w - w).T) ** 2).mean()
    assert err_gptq < 0.5 * err_rtn, (float(err_gptq), float(err_rtn))


def test_loss_equals_output_error_identity():
    """The per-column losses sum to the layer's output error 1/2 tr(E H E^T) (undamped H)."""
    w, h, _ = correlated_problem(8, 64)
    res = solve(w, h, QuantConfig(group_size=-1, damp=0.0))
    e = res.dequantize() - w
    assert res.loss == pytest.approx(0.5 * float(torch.trace(e @ h @ e.T)), rel=1e-3)


def test_rank_deficient_hessian_escalates_damping_and_reports():
    torch.manual_seed(0)
    k = 64
    x = torch.randn(8, k)                      # 8 samples < 64 columns: rank 8
    x[:, 5] = 0                                 # and a dead channel
    acc = HessianAccumulator(k)
    acc.add(x)
    w = torch.randn(16, k)
    res = solve(w, acc.hessian(), QuantConfig(group_size=32, damp=0.0))
    assert res.damp_escalations >= 1
    assert res.damp_used > 0
    assert any("raising damping" in n for n in res.notes)
    assert bool(res.dead_channels[5]) and int(res.dead_channels.sum()) == 1
    assert torch.isfinite(res.dequantize()).all()
    assert (res.dequantize()[:, 5] == 0).all()


def test_all_dead_channels_quantize_to_zero_with_a_note():
    res = solve(torch.randn(8, 32), torch.zeros(32, 32), QuantConfig(group_size=-1))
    assert bool(res.dead_channels.all())
    assert (res.dequantize() == 0).all()
    assert any("dead" in n for n in res.notes)


def test_static_groups_keep_contiguous_g_idx_with_act_order():
    w, h, _ = correlated_problem(16, 64)
    res = solve(w, h, QuantConfig(group_size=16, act_order=True, static_groups=True))
    assert torch.equal(res.g_idx, torch.arange(64, dtype=torch.int32) // 16)


def test_solver_does_not_modify_inputs():
    w, h, _ = correlated_problem(8, 32)
    w0, h0 = w.clone(), h.clone()
    solve(w, h, QuantConfig(group_size=16, act_order=True))
    assert torch.equal(w, w0) and torch.equal(h, h0)


def test_bf16_inputs_give_the_float32_hessian_on_cpu():
    """bf16 calibration activations (the CPU forward's dtype) are exact in float32: H must be
    their float32 x^T x, not a product rounded to bf16 (0.2% per entry, negative eigenvalues,
    several-fold wrong GPTQ losses on the demo model's down_proj)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5000, 96, generator=g) @ torch.randn(96, 96, generator=g)).bfloat16()
    x[:, :4] *= 30                                     # a few large channels, as in LLM activations
    acc = HessianAccumulator(96)
    acc.add(x)
    exact = (x.double().t() @ x.double()) * (2 / x.shape[0])
    rel = (acc.hessian().double() - exact).abs().max() / exact.abs().max()
    assert rel < 1e-5, float(rel)
    assert float(torch.linalg.eigvalsh(acc.hessian().double()).min()) > -1e-6 * float(exact.diag().max())


def test_nan_input_is_named():
    acc = HessianAccumulator(4)
    with pytest.raises(ArithmeticError, match="NaN"):
        acc.add(torch.tensor([[1.0, float("nan"), 0, 0]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [
    QuantConfig(bits=4, group_size=128), QuantConfig(bits=3, group_size=64, act_order=True),
    QuantConfig(bits=4, group_size=-1, sym=False),
    QuantConfig(bits=4, group_size=128, act_order=True, static_groups=True)])
def test_cuda_graph_column_loop_equals_the_eager_loop(config, monkeypatch):
    from gptq_lab import graphs
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 320, generator=gen)
    w = torch.randn(200, 320, generator=gen).cuda()
    h = (2 * x.t() @ x / x.shape[0]).cuda()
    graphs.clear()
    graphed = solve(w, h, config)
    assert graphs._GRAPHS, "the CUDA solve did not use a graph"
    monkeypatch.setenv("GPTQ_LAB_CUDA_GRAPHS", "0")
    eager = solve(w, h, config)
    assert torch.equal(graphed.codes, eager.codes)
    assert torch.equal(graphed.scales, eager.scales) and torch.equal(graphed.zeros, eager.zeros)
    assert torch.equal(graphed.column_loss, eager.column_loss)
