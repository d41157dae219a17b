"""LayerInspector: re-solves a cached layer; widgets update the figures in place."""
import numpy as np
import pytest
import torch

pytest.importorskip("plotly")
from test_lab_common import CONFIG, calibrator, no_hooks, tiny_llama

from gptq_lab import QuantConfig, solve
from gptq_lab.hessians import (
    CachedLayer,
    collect_hessians,
    constant_shift,
    constant_shift_share,
    output_error,
)
from gptq_lab.lab import LayerInspector

DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    calib = calibrator()
    calib.collect(model, device="cpu", compute_dtype=torch.float32, progress=False)
    return model, calib


@pytest.mark.parametrize("cfg", [
    QuantConfig(group_size=32), QuantConfig(group_size=32, act_order=True, sym=False),
    QuantConfig(bits=3, group_size=-1), QuantConfig(group_size=32, act_order=True, static_groups=True),
    QuantConfig(bits=2, group_size=64, block_size=32, damp=0.1)])
def test_cached_layer_matches_engine_solve(cfg):
    torch.manual_seed(0)
    w, x = torch.randn(48, 128), torch.randn(512, 128) * torch.linspace(0.1, 3, 128)
    x[:, 3] = 0                                                  # a dead channel
    h = 2 * x.T @ x / 512
    a, b = solve(w, h, cfg), CachedLayer(w, h).solve(cfg)
    assert (a.codes == b.codes).float().mean() > 0.999
    torch.testing.assert_close(b.scales, a.scales)
    assert torch.equal(a.g_idx, b.g_idx) and torch.equal(a.zeros, b.zeros)
    torch.testing.assert_close(b.column_loss, a.column_loss, rtol=1e-3, atol=1e-6)
    assert b.damp_used == pytest.approx(a.damp_used) and bool(b.dead_channels[3])


def test_output_error_sums_to_trace():
    w, dq, x = torch.randn(8, 16), torch.randn(8, 16), torch.randn(100, 16)
    h = 2 * x.T @ x / 100
    e = output_error(w, dq, h)
    assert e.shape == (16,)
    torch.testing.assert_close(e.sum(), ((x @ (w - dq).T) ** 2).sum(1).mean(), rtol=1e-4, atol=1e-4)


def down_inputs(model, ids) -> torch.Tensor:
    """[tokens, 128]: what DOWN receives in one float forward of ``ids``."""
    x = []
    handle = model.get_submodule(DOWN).register_forward_pre_hook(lambda m, a: x.append(a[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return x[0].reshape(-1, 128)


def test_constant_shift_is_the_mean_inputs_part_of_the_output_error():
    torch.manual_seed(0)
    w, dq = torch.randn(8, 16), torch.randn(8, 16)
    x = torch.randn(200, 16) + torch.linspace(-3, 3, 16)          # channels with a nonzero mean
    mu, total = x.mean(0), output_error(w, dq, 2 * x.T @ x / 200).sum()
    shift = constant_shift(w, dq, mu)
    assert shift == pytest.approx(float(((w - dq) @ mu).pow(2).sum()), rel=1e-5)
    varying = ((x - mu) @ (w - dq).T).pow(2).sum(1).mean()      # E||dW x||^2 = shift + the rest
    assert float(total) == pytest.approx(shift + float(varying), rel=1e-4)
    assert constant_shift(w, w.clone(), mu) == 0.0
    assert constant_shift_share(w, dq, mu, float(total)) == pytest.approx(shift / float(total))
    assert np.isnan(constant_shift_share(w, w.clone(), mu, 0.0))           # no error to share


def test_collect_hessians_means_are_the_layer_input_means(setup):
    model, calib = setup
    means = {}
    hs = collect_hessians(model, calib.ids, names=[DOWN], device="cpu", compute_dtype=torch.float32,
                          means=means)
    x = down_inputs(model, calib.ids)
    assert set(means) == set(hs) == {DOWN} and means[DOWN].shape == (128,)
    torch.testing.assert_close(means[DOWN], x.mean(0), rtol=1e-4, atol=1e-5)


def test_collect_hessians_matches_accumulation_and_leaves_no_hooks(setup):
    model, calib = setup
    hs = calib.hessians
    assert len(hs) == 14 and hs["model.layers.0.self_attn.q_proj"] is hs["model.layers.0.self_attn.k_proj"]
    assert hs[DOWN].shape == (128, 128) and no_hooks(model)
    x = down_inputs(model, calib.ids)
    torch.testing.assert_close(hs[DOWN], 2 * x.T @ x / x.shape[0], rtol=1e-3, atol=1e-4)


def test_inspector_figures_and_text(setup):
    model, calib = setup
    insp = LayerInspector(model, calib, DOWN, CONFIG)
    figs = insp.figures()
    assert set(figs) == {"spectrum", "diagonal", "weights", "column_error", "scales", "act_order"}
    assert len(figs["spectrum"].data[0].y) == 128
    assert np.asarray(figs["scales"].data[0].z).shape[1] == 4              # 128 / 32 groups
    text = repr(insp)
    assert DOWN in text and "4-bit, group 32" in text and "RTN" in text
    g, r = (float(e.sum()) for e in insp._errors)
    assert g < r                                                          # GPTQ beats RTN
    share = constant_shift(insp.cached.weight, insp.result.dequantize(), calib.means[DOWN]) / g
    assert 0 <= share <= 1 and f"{share:.0%} of GPTQ's output error" in text


def test_widget_values_update_figures_in_place(setup):
    model, calib = setup
    insp = LayerInspector(model, calib, DOWN, CONFIG)
    c, figs = insp.controls, insp._widgets
    spectrum_trace, scales_trace = figs["spectrum"].data[2], figs["scales"].data[0]
    c["group_size"].value = 64
    assert insp.config.group_size == 64 and figs["scales"].data[0] is scales_trace
    assert np.asarray(figs["scales"].data[0].z).shape[1] == 2
    c["damp"].value = 0.1
    assert figs["spectrum"].data[2] is spectrum_trace
    assert figs["spectrum"].data[2].y[0] == pytest.approx(insp.result.damp_used)
    assert insp.result.damp_used == pytest.approx(insp.cached.damp_abs(0.1))
    c["act_order"].value = True
    order = list(figs["act_order"].data[0].y)
    assert order == insp.result.perm.tolist() and order != sorted(order)
    before = list(figs["column_error"].data[1].y)
    c["bits"].value = 2
    assert list(figs["column_error"].data[1].y) != before and "2-bit" in repr(insp)
    c["layer"].value = "model.layers.0.self_attn.o_proj"
    assert insp.layer == "model.layers.0.self_attn.o_proj" and len(figs["spectrum"].data[0].y) == 64


def test_bad_setting_is_reported_and_rolled_back(setup):
    model, calib = setup
    insp = LayerInspector(model, calib, "model.layers.0.self_attn.o_proj", CONFIG)
    insp.controls["group_size"].value = 128                                  # > in_features 64
    assert insp.config.group_size == 32 and insp.controls["group_size"].value == 32
    assert "larger than" in insp._status.value


@pytest.mark.slow
def test_demo_down_proj_inspector():
    from gptq_lab.data import load_model
    from gptq_lab.errors import AssetMissingError
    from gptq_lab.lab import Calibrator
    try:
        model, tok = load_model("demo")
        calib = Calibrator(tok, "emma", n_samples=4, seqlen=64)
    except AssetMissingError as e:
        pytest.skip(f"demo assets missing: {e}")
    name = "model.layers.0.mlp.down_proj"
    hs = collect_hessians(model, calib.ids, names=[name], device="cpu")
    assert list(hs) == [name] and hs[name].shape == (1536, 1536) and no_hooks(model)
    insp = LayerInspector(model, hs, name, QuantConfig(bits=4, group_size=128))
    assert np.asarray(insp.figure("scales").data[0].z).shape[1] == 12
    insp.set(bits=3, act_order=True)
    g, r = (float(e.sum()) for e in insp._errors)
    assert g < r and "[576 x 1536], 3-bit" in repr(insp)
