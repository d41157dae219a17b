"""Sensitivity, the knapsack planner, and a mixed-precision checkpoint round trip."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from test_lab_common import no_hooks, tiny_llama

from gptq_lab import QuantConfig, load, quantize_model, save
from gptq_lab.errors import ConfigError
from gptq_lab.hessians import collect_hessians
from gptq_lab.planner import make_plan, plan, random_plan, solve_mckp, storage_bits, uniform_plan
from gptq_lab.qlinear import quant_linears
from gptq_lab.sensitivity import layer_sensitivity, output_sensitivity

CONFIG = QuantConfig(bits=4, group_size=32)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(1, 128, (8, 32))
    sens = layer_sensitivity(model, collect_hessians(model, ids, device="cpu"), config=CONFIG)
    return model, ids, sens


def test_storage_bits_counts_codes_zeros_scales_and_g_idx():
    # K=576, N=192, 3-bit g128: codes 576*192*3, 5 groups x 192 x (3 zero bits + 16 scale bits), g_idx 576*32
    assert storage_bits(3, 128, 576, 192) == 576 * 192 * 3 + 5 * 192 * 19 + 576 * 32
    assert storage_bits(3, 128, 576, 192, count="codes") == 576 * 192 * 3
    assert storage_bits(8, -1, 64, 32) == 64 * 32 * 8 + 32 * 24 + 64 * 32
    with pytest.raises(ConfigError, match="count"):
        storage_bits(3, 128, 576, 192, count="bytes")


def test_solve_mckp_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        costs = rng.integers(1, 20, size=(5, 3)).astype(float)
        damages = rng.random((5, 3)) * 10
        budget = float(rng.integers(int(costs.min(1).sum()), int(costs.max(1).sum()) + 1))
        best = min(sum(damages[i, j] for i, j in enumerate(c)) for c in itertools.product(range(3), repeat=5)
                   if sum(costs[i, j] for i, j in enumerate(c)) <= budget)
        picks = solve_mckp(costs, damages, budget, resolution=int(budget))     # unit = 1: exact
        assert sum(costs[i, j] for i, j in enumerate(picks)) <= budget
        assert math.isclose(sum(damages[i, j] for i, j in enumerate(picks)), best)
    with pytest.raises(ConfigError, match="cheapest"):
        solve_mckp(np.ones((2, 2)), np.ones((2, 2)), 1.0)


def test_sensitivity_loss_falls_with_bits(setup):
    _, _, sens = setup
    assert len(sens.names) == 14 and sens.bits == (2, 3, 4, 8)
    for name in sens.names:
        losses = [sens.loss[name][b] for b in sens.bits]
        assert all(a > b > 0 for a, b in itertools.pairwise(losses)), name
    assert [len(g) for g in sens.groups] == [3, 1, 2, 1] * 2
    m = sens.matrix(3)
    assert len(m) == 2 and m[1][6] == sens.loss["model.layers.1.mlp.down_proj"][3]


def test_plan_fits_budget_and_beats_uniform(setup):
    _, _, sens = setup
    u3, u4 = uniform_plan(sens, 3), uniform_plan(sens, 4)
    same = plan(sens, target_bits=u3.average_bits)            # the budget uniform 3-bit uses
    assert same.storage_bits <= u3.storage_bits and same.predicted_damage <= u3.predicted_damage
    mid = plan(sens, target_bits=(u3.average_bits + u4.average_bits) / 2)
    assert u3.storage_bits < mid.storage_bits <= (u3.storage_bits + u4.storage_bits) / 2
    assert u4.predicted_damage < mid.predicted_damage < u3.predicted_damage
    for group in sens.groups:                                  # tied: one width per input group
        assert len({mid.bits[n] for n in group}) == 1
    loose = plan(sens, target_bits=mid.target_bits, tie=False)
    assert loose.predicted_damage <= mid.predicted_damage * (1 + 1e-3)
    by_bytes = plan(sens, budget_bytes=mid.storage_bytes)
    assert by_bytes.storage_bytes <= mid.storage_bytes
    for seed in (0, 1):
        r = random_plan(sens, mid.target_bits, seed=seed)
        assert r.storage_bits <= mid.storage_bits * 1.001 and r.predicted_damage >= mid.predicted_damage
    assert random_plan(sens, mid.target_bits, 0).bits == random_plan(sens, mid.target_bits, 0).bits


def test_plan_errors(setup):
    _, _, sens = setup
    with pytest.raises(ConfigError, match="exactly one"):
        plan(sens)
    with pytest.raises(ConfigError, match="cheapest"):
        plan(sens, target_bits=1.0)
    with pytest.raises(ConfigError, match="KL sensitivity is missing"):
        plan(sens, target_bits=4.0, measure="kl")


def test_plan_config_resolves_to_the_plan(setup):
    _, _, sens = setup
    mixed = make_plan(sens, {n: (8 if "down" in n else 2 if "gate" in n else 3) for n in sens.names}, "hand")
    cfg = mixed.config()
    assert cfg.bits == 3 and cfg.group_size == 32
    assert all(cfg.for_module(n).bits == mixed.bits[n] for n in sens.names)
    # gate/up differ, so each gets its own pattern; tied groups that agree share one (with vLLM's fused name)
    assert any("gate_proj$" in p for p in cfg.overrides)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_mixed_checkpoint_round_trip(setup, tmp_path):
    _model, ids, sens = setup
    p = make_plan(sens, {n: (8 if "down" in n else 2 if "v_proj" in n else 3 if "q_proj" in n else 4)
                         for n in sens.names}, "hand")
    fake = tiny_llama()
    results = quantize_model(fake, ids, p.config(), device="cpu", progress=False)
    assert {n: r.bits for n, r in results.items()} == p.bits
    save(fake, tmp_path / "ck", results, config=p.config())
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and {v["bits"] for v in qc["dynamic"].values()} == {2, 3, 8}
    loaded = load(tmp_path / "ck", dtype=torch.float32)
    assert {n: q.bits for n, q in quant_linears(loaded).items()} == p.bits
    with torch.no_grad():
        a, b = fake(ids).logits, loaded(ids).logits
    assert torch.allclose(a, b, atol=2e-3, rtol=1e-3)          # fp16 scales on disk


def test_output_sensitivity_kl(setup):
    model, _, sens = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    kl = output_sensitivity(model, sens, torch.randint(1, 128, (2, 32)), names=names, bits=(2, 8))
    assert set(kl) == set(names)
    for name in names:
        assert kl[name][2] > 0 and kl[name][2] > 10 * abs(kl[name][8])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and no_hooks(model)


def test_plan_figure(setup):
    pytest.importorskip("plotly")
    from gptq_lab.lab.studies import plan_figure
    _, _, sens = setup
    p = plan(sens, target_bits=4.5)
    fig = plan_figure(sens, p, bits=3)
    assert fig.data[0].type == "heatmap" and len(fig.data[0].text) == 2
    assert fig.data[0].text[0][6] == str(p.bits["model.layers.0.mlp.down_proj"])


def test_calibrator_sensitivity():
    pytest.importorskip("plotly")
    from test_lab_common import calibrator
    model, calib = tiny_llama(), calibrator()
    sens = calib.sensitivity(model, bits=(3, 8), config=CONFIG, progress=False)
    assert calib.hessians is not None and sens.bits == (3, 8) and len(sens.names) == 14
    assert all(sens.loss[n][3] > sens.loss[n][8] > 0 for n in sens.names)
