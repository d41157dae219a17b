"""gptq_lab.fuse on CPU (the reference path): fused q/k/v and gate/up give the unfused logits,
eager and under torch.compile(fullgraph=True); groups that cannot fuse are skipped and reported."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
from checkpoint_fixture import tiny_model, token_ids
from test_decode import load_benchmark
from test_qlinear import rtn_layer

from gptq_lab import QuantConfig, UnsupportedModelError, convert, quantize_model, save
from gptq_lab.fuse import FusedSlice, fuse_model, fuse_quant_linears
from gptq_lab.generate import StaticGreedy, eager_greedy, prepare_model
from gptq_lab.qlinear import quant_linears


def quantized(family: str = "llama", overrides: dict | None = None) -> torch.nn.Module:
    model = tiny_model(family)
    config = QuantConfig(bits=4, group_size=32, overrides=overrides or {})
    return convert(model, quantize_model(model, config=config, method="rtn", progress=False))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def test_fused_llama_gives_the_unfused_logits_with_fewer_layers():
    plain = prepare_model(quantized())
    fused = copy.deepcopy(plain)
    report = fuse_model(fused)
    prepare_model(fused)
    assert len(quant_linears(plain)) == 14 and len(quant_linears(fused)) == 8     # 7 -> 4 per block
    assert report.skipped == {}
    assert report.fused["model.layers.1.mlp.fused_gate_proj_up_proj"] == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    ids = token_ids(2, 8)
    expected = logits(plain, ids)
    torch.testing.assert_close(logits(fused, ids), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(copy.deepcopy(fused), ids), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(StaticGreedy(fused, compile=False)(ids, 6), eager_greedy(plain, ids, 6))
    again = fuse_model(fused)                                          # idempotent
    assert again.fused == {} and set(again.skipped.values()) == {"already fused"}


def test_fused_opt_with_biases_gives_the_unfused_logits():
    plain = prepare_model(quantized("opt"))
    fused = prepare_model(copy.deepcopy(plain), fuse=True)
    assert fused.model.decoder.layers[0].self_attn.fused_q_proj_k_proj_v_proj.fused.bias.shape == (192,)
    ids = token_ids(2, 8)
    torch.testing.assert_close(logits(fused, ids), logits(plain, ids), rtol=1e-6, atol=1e-6)


def matmuls(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Matmuls in the graph dynamo traces (fullgraph) for one forward of ``model``."""
    counts = []

    def backend(gm, _inputs):
        counts.append(sum(n.target in (operator.matmul, torch.matmul, torch.mm) for n in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    logits(torch.compile(model, fullgraph=True, backend=backend), ids)
    return counts[0]


def test_compiled_fused_model_equals_eager_and_uses_the_shared_output():
    plain = prepare_model(quantized())
    fused = prepare_model(copy.deepcopy(plain), fuse=True)
    ids = token_ids(2, 8)
    assert matmuls(plain, ids) - matmuls(fused, ids) == 2 * 3       # no slice fell back to a matmul
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)                  # inductor on CPU: ~15 s
    torch.testing.assert_close(logits(compiled, ids), logits(fused, ids), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_a_member_called_with_another_input_computes_its_own_columns():
    plain = prepare_model(quantized())
    fused = prepare_model(copy.deepcopy(plain), fuse=True)
    attn, plain_attn = fused.model.layers[0].self_attn, plain.model.layers[0].self_attn
    group = attn.fused_q_proj_k_proj_v_proj
    x, other = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn.k_proj(other), plain_attn.k_proj(other), rtol=1e-6, atol=1e-6)
        group.input, group.output = x, group.fused(x)                # as inside the parent's forward
        try:
            torch.testing.assert_close(attn.v_proj(other), plain_attn.v_proj(other), rtol=1e-6, atol=1e-6)
            assert attn.v_proj(x).data_ptr() == group.output[..., 96:].data_ptr()     # the stored one
        finally:
            group.input = group.output = None
    assert isinstance(attn.k_proj, FusedSlice) and (attn.k_proj.start, attn.k_proj.end) == (64, 96)


def test_groups_that_cannot_fuse_are_left_and_reported():
    plain = prepare_model(quantized(overrides={r"layers\.0\.mlp\.up_proj$": {"group_size": 64}}))
    fused = copy.deepcopy(plain)
    fused.model.layers[1].self_attn.v_proj = torch.nn.Linear(64, 32, bias=False)  # a float member
    plain.model.layers[1].self_attn.v_proj = fused.model.layers[1].self_attn.v_proj
    prepare_model(fused)                                              # prepared layers still fuse
    report = fuse_model(fused)
    assert report.skipped == {
        "model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj":
            "group_size differs between the layers: [32, 64]",
        "model.layers.1.self_attn.q_proj, model.layers.1.self_attn.k_proj, model.layers.1.self_attn.v_proj":
            "self_attn.v_proj is a Linear, not a QuantLinear"}
    assert len(report.fused) == 2 and len(quant_linears(fused)) == 5 + 5     # q/k/v of 0, gate/up of 1
    prepare_model(fused)
    ids = token_ids(2, 8)
    torch.testing.assert_close(logits(fused, ids), logits(plain, ids), rtol=1e-6, atol=1e-6)


def test_fuse_quant_linears_checks_its_members():
    _, a = rtn_layer(64, 32, 4, 32, act_order=True, seed=0)
    _, b = rtn_layer(64, 32, 4, 32, act_order=True, seed=1)
    with pytest.raises(ValueError, match="g_idx differs"):
        fuse_quant_linears([a, b])
    _, c = rtn_layer(64, 32, 8, 32)
    with pytest.raises(ValueError, match=r"bits differs between the layers: \[4, 8\]"):
        fuse_quant_linears([rtn_layer(64, 32, 4, 32)[1], c])
    a._released = True
    with pytest.raises(ValueError, match="fuse before preparing"):
        fuse_quant_linears([a, a])


def test_save_refuses_a_fused_model_and_unknown_families_are_left_alone(tmp_path):
    model = prepare_model(quantized(), fuse=True)
    with pytest.raises(UnsupportedModelError, match="cannot save a fused model"):
        save(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    odd = torch.nn.Sequential(torch.nn.Linear(4, 4))
    report = fuse_model(odd)
    assert report.family is None and report.fused == {} and report.skipped == {}


def test_benchmark_smoke_run_with_fused_rows(monkeypatch, tmp_path):
    bench = load_benchmark("decode", monkeypatch, tmp_path)
    text = bench.main(["--tiny", "--device", "cpu", "--paths", "fast", "--kernels", "default,default+fuse"])
    rows = [line.split(" | ")[1:3] for line in text.splitlines() if line.startswith("| tiny")]
    assert rows == [["fast", "fp16"], ["fast", "int4"], ["fast", "int4/fp16"],
                    ["fast", "int4 default+fuse"], ["fast", "int4 default+fuse/fp16"]]
    assert "failed" not in text
