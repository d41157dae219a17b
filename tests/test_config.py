import pytest

from gptq_lab import ConfigError, QuantConfig


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 5}, r"bits=5 is not supported; use 2, 3, 4 or 8"),
    ({"bits": 1}, r"bits=1"),
    ({"bits": 16}, r"bits=16"),
    ({"group_size": 0}, r"group_size=0 is invalid.*-1 for per-channel"),
    ({"group_size": -2}, r"group_size=-2"),
    ({"damp": -0.1}, r"damp=-0.1 is outside \[0, 1\]"),
    ({"damp": 5.0}, r"damp=5.0"),
    ({"damp": float("nan")}, r"damp=nan"),
    ({"block_size": 0}, r"block_size=0"),
    ({"sym": "yes"}, r"sym='yes' must be True or False"),
    ({"static_groups": True, "group_size": -1}, r"static_groups=True needs grouped"),
    ({"overrides": {"mlp": {"bits": 7}}}, r"override 'mlp': bits=7"),
    ({"overrides": {"mlp": {"seqlen": 7}}}, r"cannot vary per module"),
    ({"overrides": {"mlp": {"": None, 0: None}}}, r"sets \['', 0\], which cannot vary"),   # (found by fuzzing)
    ({"overrides": {"(": {"bits": 8}}}, r"not a valid regex"),
])
def test_bad_values_are_rejected_with_the_value_and_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


def test_round_trip_dict():
    cfg = QuantConfig(bits=3, group_size=64, sym=False, act_order=True, overrides={r"down_proj": {"bits": 8}})
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_field_in_dict():
    with pytest.raises(ConfigError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({"bitz": 4})


def test_overrides_resolve_first_match():
    cfg = QuantConfig(bits=4, overrides={r"layers\.0\.": {"bits": 8}, r"mlp": {"bits": 3}})
    assert cfg.for_module("model.layers.0.mlp.down_proj").bits == 8
    assert cfg.for_module("model.layers.1.mlp.down_proj").bits == 3
    assert cfg.for_module("model.layers.1.self_attn.q_proj").bits == 4
    assert cfg.unused_overrides(["model.layers.1.mlp.up_proj"]) == [r"layers\.0\."]


def test_short_last_group_is_reported_and_too_large_group_rejected():
    notes = QuantConfig(group_size=128).check_layer("x.q_proj", 576)
    assert "[128, 128, 128, 128, 64]" in notes[0] and "group_size=64" in notes[0]
    assert QuantConfig(group_size=64).check_layer("x", 576) == []
    with pytest.raises(ConfigError, match="larger than x's in_features=64"):
        QuantConfig(group_size=128).check_layer("x", 64)
