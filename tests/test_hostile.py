"""Hostile inputs (issue 9): every failure is gptq_lab's own error, names the problem and the
fix, and loses nothing. Config, calibration, numerics, models and interrupted quantization here;
checkpoints and interrupted saves in test_hostile_checkpoints.py; fuzzing in test_hostile_fuzz.py.

Already covered elsewhere (not repeated): bits 1/5/16, group_size 0/-2, damp -0.1/5/nan in
test_config.py; group_size larger than a layer (check_layer) in test_config.py; text shorter than
a window in test_data.py; ids >= vocab, windows > context and missing calibration in
test_pipeline.py; unknown family (Bloom) and overrides matching nothing in test_pipeline.py;
NaN input to HessianAccumulator, rank-deficient Hessian escalation and an all-dead solve in
test_gptq.py; no hooks after an interrupt in the progress callback in test_pipeline.py.
"""
import math
import warnings

import pytest
import torch
from checkpoint_fixture import V, tiny_model, token_ids
from torch import nn

from gptq_lab import (
    CalibrationError,
    ConfigError,
    GPTQLabError,
    NumericalError,
    QuantConfig,
    UnsupportedModelError,
    convert,
    data,
    quantize_model,
    solve,
)
from gptq_lab.checks import linear_names

CFG = QuantConfig(bits=4, group_size=32)


def run(model, ids=None, config=CFG, **kw):
    return quantize_model(model, token_ids() if ids is None else ids, config, device="cpu", progress=False, **kw)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bits_of(t):
    return t.detach().contiguous().view(torch.uint8)


def assert_same(model, before, prefix=""):
    """Bit-identical (NaN included) for every state entry under ``prefix``."""
    for k, v in model.state_dict().items():
        if k.startswith(prefix):
            assert torch.equal(bits_of(v), bits_of(before[k])), f"{k} changed"


def assert_no_hooks(model):
    for name, m in model.named_modules():
        assert not (m._forward_pre_hooks or m._forward_hooks), f"hook left on {name or 'model'}"


def assert_runs(model):
    with torch.no_grad():
        assert torch.isfinite(model(token_ids(n=2, t=16, seed=5)).logits).all()


# ------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("d,match", [
    ({"bits": 1}, r"bits=1 is not supported; use 2, 3, 4 or 8"),
    ({"bits": 16}, r"bits=16 is not supported; use 2, 3, 4 or 8"),
    ({"bits": 4.0}, r"bits=4.0 is not supported; use 2, 3, 4 or 8"),       # float from JSON
    ({"bits": "4"}, r"bits='4' is not supported"),
    ({"group_size": -5}, r"group_size=-5 is invalid; use a positive size such as 128, or -1"),
    ({"group_size": 0}, r"group_size=0 is invalid"),
    ({"group_size": 32.0}, r"group_size=32.0 must be an int"),
    ({"damp": -1e-3}, r"damp=-0.001 is outside \[0, 1\].*typically 0.01"),
    ({"damp": 1e6}, r"damp=1000000.0 is outside \[0, 1\]"),
    ({"damp": math.inf}, r"damp=inf must be a number.*such as 0.01"),
    ({"damp": "0.01"}, r"damp='0.01' must be a number"),
    ({"overrides": None}, r"overrides=None must be a dict \{regex: \{field: value\}\}"),
    ({"overrides": {5: {"bits": 8}}}, r"override pattern 5 must be a regex string"),
    ({"overrides": {"mlp": {"bits": 16}}}, r"override 'mlp': bits=16 is not supported"),
    ({"overrides": {"mlp": {"group_size": -5}}}, r"override 'mlp': group_size=-5 is invalid"),
    ({"overrides": {"mlp": {"damp": -1}}}, r"override 'mlp': damp=-1 is outside"),
    ({"bitz": 4, 7: 1}, r"unknown QuantConfig fields \['bitz', 7\]; known: \['act_order'"),
])
def test_config_dicts_with_bad_values_are_refused_with_the_fix(d, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig.from_dict(d)


def test_from_dict_of_a_non_dict_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a dict of fields, got list"):
        QuantConfig.from_dict(["bits", 4])


@pytest.mark.parametrize("config,match", [
    (QuantConfig(group_size=256), (r"group_size=256 is larger than model.layers.0.self_attn.q_proj's "
                                   r"in_features=64; use group_size <= 64 or -1")),
    (QuantConfig(group_size=32, overrides={r"down_proj": {"group_size": 256}}),
     r"group_size=256 is larger than model.layers.0.mlp.down_proj's in_features=128"),
    (QuantConfig(group_size=32, overrides={r"mlp\.fc1": {"bits": 8}, r"q_proj": {"bits": 8}}),
     (r"override patterns \['mlp\\\\.fc1'\] match no layer; layer names look like "
      r"'model.layers.0.self_attn.q_proj'")),
])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_config_that_does_not_fit_the_model_fails_before_touching_it(config, match, method):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        run(model, config=config, method=method)
    assert_same(model, before)


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="method='awq' is not known; use 'gptq' or 'rtn'"):
        run(tiny_model("llama"), method="awq")


# ------------------------------------------------------------------------------- calibration

class CharTokenizer:
    name_or_path = "hostile-char-tokenizer"

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        return {"input_ids": [ord(c) % V for c in text]}


@pytest.mark.parametrize("texts,seqlen,match", [
    ([""], 8, r"calibration text has 0 tokens; seqlen=8 needs at least 9: use more text or a shorter seqlen"),
    (["abcdefgh"], 8, r"has 8 tokens; seqlen=8 needs at least 9"),      # exactly one window: no next token
])
def test_empty_or_too_short_text(texts, seqlen, match):
    data._TOKEN_CACHE.clear()
    with pytest.raises(CalibrationError, match=match):
        data.calibration_windows(CharTokenizer(), [texts], n_samples=2, seqlen=seqlen)
    if texts == [""]:
        with pytest.raises(CalibrationError, match=r"has 0 tokens .*one window needs seqlen=8"):
            data.eval_windows(CharTokenizer(), texts, seqlen=seqlen)


def test_unknown_text_source_is_a_calibration_error():
    with pytest.raises(CalibrationError, match=r"neither an existing file nor a known corpus .*pass raw text as a list"):
        data.calibration_windows(CharTokenizer(), "no_such_corpus_or_file", n_samples=1, seqlen=4)
    with pytest.raises(CalibrationError, match=r"unknown corpus 'emmma'; known: emma"):
        data.corpus("emmma")


@pytest.mark.parametrize("ids,match", [
    (torch.zeros(0, 16, dtype=torch.long), r"calibration is empty \(shape \(0, 16\)\); pass at least one window"),
    (torch.zeros(4, 0, dtype=torch.long), r"calibration is empty \(shape \(4, 0\)\)"),
    (torch.full((2, 8), -1), r"token ids must lie in \[0, 128\); got \[-1, -1\].*this model's tokenizer"),
    (torch.full((2, 8), V), r"token ids must lie in \[0, 128\); got \[128, 128\]"),
    (torch.zeros(2, 65, dtype=torch.long), r"windows of 65 tokens exceed the model's context of 64; use seqlen <= 64"),
    (token_ids().float(), (r"integer tensor \[n_samples, seqlen\] of token ids, got torch.float32 \(4, 32\); "
                           r"tokenize with gptq_lab.data.calibration_windows")),
    (token_ids().half(), r"got torch.float16"),
    (token_ids()[0], r"got torch.int64 \(32,\)"),
    (token_ids().tolist(), r"got <class 'list'>"),
    (token_ids().to("meta"), r"calibration ids are on the meta device, which holds no values; pass real token ids"),
])
def test_bad_calibration_fails_before_touching_the_model(ids, match):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(CalibrationError, match=match):
        run(model, ids)
    assert_same(model, before)
    assert_no_hooks(model)


def test_gpt2_context_comes_from_n_positions():
    with pytest.raises(CalibrationError, match="exceed the model's context of 64"):
        run(tiny_model("gpt2"), torch.zeros(1, 80, dtype=torch.long))


def test_int32_ids_on_the_cpu_are_accepted():
    assert run(tiny_model("llama"), token_ids().int(), method="gptq")


# --------------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("layer,value", [("model.layers.1.self_attn.q_proj", math.nan),
                                         ("model.layers.0.mlp.down_proj", math.inf)])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_nan_or_inf_weight_is_named_before_any_work(layer, value, method):
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_submodule(layer).weight[3, 5] = value
    before = snapshot(model)
    with pytest.raises(NumericalError, match=rf"NaN or Inf in the weights of {layer} \(1 of \d+ values\).*"
                                             r"reload it in float32"):
        run(model, method=method)
    assert_same(model, before)


@pytest.mark.parametrize("batch_size", [None, 2])      # one pass per block, and the batched passes
def test_nan_activation_names_the_layer_and_keeps_finished_blocks(batch_size):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = math.nan
    before, done = snapshot(model), {}
    with pytest.raises(NumericalError, match=r"^model.layers.1.mlp.gate_proj: layer input contains NaN or Inf.*"
                                             r"Nothing was written to model.layers.1 or later blocks"):
        run(model, batch_size=batch_size, on_block=lambda i, res: done.update(res))
    assert_same(model, before, "model.layers.1.")
    assert sorted(done) == sorted(n for n in linear_names(model) if n.startswith("model.layers.0."))
    for name, res in done.items():                      # the finished block is kept, on its grid
        assert torch.equal(model.get_submodule(name).weight, res.dequantize())
    assert_no_hooks(model)


def test_inf_in_the_first_block_input_names_its_first_linear():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = math.inf
    before = snapshot(model)
    with pytest.raises(NumericalError, match=r"^model.layers.0.self_attn.q_proj: layer input contains NaN or Inf"):
        run(model)
    assert_same(model, before)


def test_hessian_not_pd_after_escalation_explains_with_diagnostics():
    h = -torch.eye(16)
    h[3, 3] = 0
    with pytest.raises(NumericalError, match=r"not positive definite even with damping raised to .*Diagnostics: "
                                             r"K=16, smallest eigenvalue -1, .*negative diagonal entries=15, zero "
                                             r"diagonal entries \(dead channels\)=0.*too few calibration tokens.*"
                                             r"duplicate samples.*raise damp"):
        solve(torch.randn(4, 16), h, QuantConfig(group_size=-1))
    with pytest.raises(NumericalError, match=r"the Hessian contains NaN or Inf.*compute_dtype=torch.float32"):
        solve(torch.randn(4, 16), torch.full((16, 16), math.nan), QuantConfig(group_size=-1))


def test_indefinite_hessian_in_the_pipeline_names_the_layer_and_touches_nothing(monkeypatch):
    monkeypatch.setattr("gptq_lab.pipeline.HessianAccumulator.hessian",
                        lambda self: -torch.eye(self.hessian_sum.shape[0]))
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(NumericalError, match=r"^model.layers.0.self_attn.q_proj: the Hessian is not positive "
                                             r"definite.*smallest eigenvalue -1.*Nothing was written to "
                                             r"model.layers.0"):
        run(model)
    assert_same(model, before)
    assert_no_hooks(model)


def test_duplicate_samples_recover_by_escalation_and_say_why():
    x = torch.randn(1, 32).repeat(64, 1)                # 64 identical rows: rank 1
    h = 2 * x.T @ x / 64
    res = solve(torch.randn(8, 32), h, QuantConfig(group_size=-1, damp=0.0))
    assert res.damp_escalations >= 1
    assert any("too few or duplicate calibration samples" in n for n in res.notes)
    assert torch.isfinite(res.dequantize()).all()


def test_layer_with_every_input_channel_dead_is_recorded_and_warned():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.zero_()      # q/k/v see only zeros
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(model)
    dead = sorted(str(w.message).split(":")[0] for w in caught if "every input channel was zero" in str(w.message))
    assert dead == [f"model.layers.0.self_attn.{n}" for n in ("k_proj", "o_proj", "q_proj", "v_proj")]
    assert "quantized the layer to zero (result.notes records it)" in str(caught[0].message)
    for leaf in ("q_proj", "k_proj", "v_proj"):
        r = res[f"model.layers.0.self_attn.{leaf}"]
        assert bool(r.dead_channels.all()) and any("every input channel is dead" in n for n in r.notes)
        assert (r.dequantize() == 0).all()
    assert not res["model.layers.0.mlp.up_proj"].dead_channels.any()
    assert_runs(model)


# ----------------------------------------------------------------------------------- models

class NoConfig(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


def test_model_without_known_layout_says_how_to_add_it():
    with pytest.raises(UnsupportedModelError, match=r"no block layout is known for model_type=None.*append a "
                                                    r"Family row to gptq_lab/arch.py FAMILIES"):
        quantize_model(NoConfig(), token_ids(), CFG, progress=False)


def test_already_quantized_model_is_refused():
    model = tiny_model("llama")
    convert(model, run(model, method="rtn"), CFG)
    for method in ("gptq", "rtn"):
        with pytest.raises(UnsupportedModelError, match=r"already quantized \(it holds QuantLinear layers\); "
                                                        r"quantize the float model instead"):
            run(model, method=method)


def test_weights_on_the_meta_device_are_refused():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match=r"parameter model.embed_tokens.weight is on the meta device "
                                                    r"\(not loaded\); load the model's weights"):
        run(model)


def test_model_with_no_blocks_is_refused():
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=0, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    with pytest.raises(UnsupportedModelError, match=r"has no model.layers blocks: nothing to quantize"):
        run(model)


# ------------------------------------------------------------------------------ interruption

def _interrupted(model, **kw):
    done = {}
    with pytest.raises(KeyboardInterrupt):
        run(model, on_block=lambda i, res: done.update(res), **kw)
    return done


def _check_after_interrupt(model, before, done, n_done_blocks):
    assert_no_hooks(model)
    finished = [f"model.layers.{i}." for i in range(n_done_blocks)]
    assert sorted(done) == sorted(n for n in linear_names(model) if n.startswith(tuple(finished)))
    for name, res in done.items():                      # finished blocks: kept, and their results delivered
        assert torch.equal(model.get_submodule(name).weight, res.dequantize())
    for i in range(n_done_blocks, 2):                   # unfinished blocks: bit-identical
        assert_same(model, before, f"model.layers.{i}.")
    assert_same(model, before, "model.embed_tokens.")
    assert_runs(model)


def test_keyboard_interrupt_in_a_user_forward_pre_hook_mid_block():
    model = tiny_model("llama")
    before = snapshot(model)

    def ctrl_c(_mod, _args):
        raise KeyboardInterrupt

    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(ctrl_c)
    done = _interrupted(model)
    handle.remove()                                     # the user's own hook; gptq_lab's are gone
    _check_after_interrupt(model, before, done, n_done_blocks=1)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_keyboard_interrupt_inside_gptq_labs_own_hook(monkeypatch, batch_size):
    """The solve of gate_proj (block 0's third group) runs inside a pre-hook of the working copy."""
    from gptq_lab import pipeline
    calls, real = [], pipeline.solve

    def solve_then_ctrl_c(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "solve", solve_then_ctrl_c)
    model = tiny_model("llama")
    before = snapshot(model)
    done = _interrupted(model, batch_size=batch_size)
    _check_after_interrupt(model, before, done, n_done_blocks=0)


def test_keyboard_interrupt_in_the_progress_callback_keeps_the_finished_block():
    model = tiny_model("llama")
    before, done = snapshot(model), {}

    def ctrl_c(done_blocks, total, message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, token_ids(), CFG, device="cpu", progress=ctrl_c,
                       on_block=lambda i, res: done.update(res))
    _check_after_interrupt(model, before, done, n_done_blocks=1)


def test_keyboard_interrupt_while_capturing_the_first_block_input():
    model = tiny_model("llama")
    before = snapshot(model)

    def ctrl_c(_mod, _args, _out):
        raise KeyboardInterrupt

    handle = model.model.embed_tokens.register_forward_hook(ctrl_c)
    done = _interrupted(model)
    handle.remove()
    _check_after_interrupt(model, before, done, n_done_blocks=0)


def test_every_refusal_here_is_a_gptq_lab_error():
    """The error types used above all derive from GPTQLabError (one except clause catches them)."""
    for cls in (ConfigError, CalibrationError, NumericalError, UnsupportedModelError):
        assert issubclass(cls, GPTQLabError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantConfig.from_dict(QuantConfig(bits=3, group_size=64).to_dict())
