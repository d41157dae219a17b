"""The GPTQ checkpoint format both ways: round trips, independent fixtures, refusals, atomicity."""
import json
import os
import pickle
import re
import stat

import pytest
import torch
from checkpoint_fixture import reference_model, tiny_model, token_ids, write_fixture
from safetensors.torch import load_file, save_file

from gptq_lab import CheckpointError, QuantConfig, io, quantize_model
from gptq_lab.qlinear import CONFIG_ATTR, QuantLinear, convert, quant_linears
from gptq_lab.quant import unpack_qzeros

CASES = [  # family, bits, sym, act_order, checkpoint_format
    ("llama", 4, True, False, "gptq"), ("llama", 3, False, True, "gptq"), ("llama", 2, True, True, "gptq_v2"),
    ("llama", 8, False, False, "gptq"), ("opt", 4, False, True, "gptq"), ("opt", 3, True, False, "gptq_v2"),
    ("gpt2", 4, True, True, "gptq"), ("gpt2", 8, False, False, "gptq"), ("gpt2", 2, False, False, "gptq"),
]


def quantized(family, config, tie=None):
    """GPTQ where act-order is wanted (it yields a permuted g_idx), RTN otherwise (faster; the
    format does not care which solver made the codes)."""
    model = tiny_model(family, **({} if tie is None else {"tie_word_embeddings": tie}))
    method = "gptq" if config.act_order else "rtn"
    results = quantize_model(model, token_ids(n=4, t=32), config, method=method)
    return model, results


@pytest.mark.parametrize("family,bits,sym,act_order,fmt", CASES)
def test_quantize_convert_save_load_gives_identical_logits(tmp_path, family, bits, sym, act_order, fmt):
    config = QuantConfig(bits=bits, group_size=32, sym=sym, act_order=act_order)
    model, results = quantized(family, config, tie=True if family == "llama" else None)
    convert(model, results, config)
    ids = token_ids(n=2, t=24, seed=3)
    with torch.no_grad():
        expected = model(ids).logits
    io.save(model, tmp_path / "ckpt", checkpoint_format=fmt)
    loaded = io.load(tmp_path / "ckpt", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert getattr(loaded, CONFIG_ATTR) == config
    assert {n: (q.bits, q.group_size, q.sym) for n, q in quant_linears(loaded).items()} == \
        {n: (bits, 32, sym) for n in results}
    emb, head = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    assert (emb is head) == bool(loaded.config.tie_word_embeddings)
    if family == "llama":
        assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
        assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_default_fp16_load_and_model_untouched_by_save_from_results(tmp_path):
    config = QuantConfig(bits=4, group_size=32, act_order=True)
    model, results = quantized("llama", config)
    io.save(model, tmp_path / "a", results, config=config)          # float model + results: packed here
    assert not quant_linears(model)
    convert(model, results, config)
    ids = token_ids(n=2, t=16)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(io.load(tmp_path / "a", dtype=torch.float32)(ids).logits, expected)
        half = io.load(tmp_path / "a")(ids).logits
    assert half.dtype == torch.float16
    assert (half.float() - expected).abs().max() < 0.02 * expected.abs().max()


def test_sharded_checkpoint_has_an_index_and_loads(tmp_path):
    config = QuantConfig(bits=4, group_size=32)
    model, results = quantized("opt", config)
    convert(model, results, config)
    io.save(model, tmp_path / "s", max_shard_size="40KB")
    index = json.loads((tmp_path / "s" / io.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "s" / io.WEIGHTS_NAME).exists()
    ids = token_ids(n=1, t=16)
    with torch.no_grad():
        assert torch.equal(io.load(tmp_path / "s", dtype=torch.float32)(ids).logits, model(ids).logits)
    assert io.describe_checkpoint(tmp_path / "s")["ok"]


def test_per_module_overrides_go_to_dynamic_and_come_back(tmp_path):
    config = QuantConfig(bits=4, group_size=32, overrides={r"mlp\.down_proj": {"bits": 8, "group_size": 64},
                                                           r"layers\.0\.self_attn\.q_proj": {"sym": False}})
    model, results = quantized("llama", config)
    convert(model, results, config)
    io.save(model, tmp_path / "d")
    qc = json.loads((tmp_path / "d" / "config.json").read_text())["quantization_config"]
    dynamic = {k: v for k, v in qc["dynamic"].items() if k.startswith("+:")}
    assert dynamic == {r"+:.*(?:mlp\.down_proj)": {"bits": 8, "group_size": 64},
                       r"+:.*(?:layers\.0\.self_attn\.q_proj)": {"sym": False}}
    # GPTQModel / vLLM match with re.match from the start of the module name
    name = "model.layers.1.mlp.down_proj"
    assert re.match(next(iter(dynamic))[2:], name) and not re.match(next(iter(dynamic))[2:], "model.layers.1.mlp.up_proj")
    ids = token_ids(n=1, t=16)
    with torch.no_grad():
        expected = model(ids).logits
    del qc["meta"]                                   # as another tool writes it: dynamic alone
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["quantization_config"] = qc
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    loaded = io.load(tmp_path / "d", dtype=torch.float32)
    layer = loaded.get_submodule(name)
    assert (layer.bits, layer.group_size) == (8, 64)
    assert not loaded.get_submodule("model.layers.0.self_attn.q_proj").sym
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_independent_v1_and_v2_fixtures_load_to_the_same_logits(tmp_path, family):
    model = tiny_model(family, **({"tie_word_embeddings": True} if family == "llama" else {}))
    linears = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "down_proj", "c_attn", "c_fc"))]
    w1 = write_fixture(model, linears, tmp_path / "v1", "gptq", bits=3, group_size=32, act_order=True)
    w2 = write_fixture(model, linears, tmp_path / "v2", "gptq_v2", bits=3, group_size=32, act_order=True)
    assert all(torch.equal(w1[n], w2[n]) for n in linears)
    ids = token_ids(n=2, t=16)
    with torch.no_grad():
        out1 = io.load(tmp_path / "v1", dtype=torch.float32)(ids).logits
        out2 = io.load(tmp_path / "v2", dtype=torch.float32)(ids).logits
        ref = reference_model(model, w1)(ids).logits
    assert torch.equal(out1, out2)
    assert (out1 - ref).abs().max() < 1e-4 * ref.abs().max()
    assert io.describe_checkpoint(tmp_path / "v1")["ok"]


def _zero_point_zero_model(top_code: bool):
    """A converted tiny model whose first layer has a group with true zero point 0."""
    config = QuantConfig(bits=4, group_size=32, sym=False)
    model = tiny_model("llama")
    results = quantize_model(model, method="rtn", config=config)
    r = results["model.layers.0.self_attn.q_proj"]
    r.zeros[0, 0] = 0
    r.codes[0, :32] = torch.arange(32) % (16 if top_code else 15)
    return convert(model, results, config), "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("top_code", [False, True])
def test_zero_point_zero_in_v1_is_shifted_and_v2_is_exact(tmp_path, top_code):
    model, name = _zero_point_zero_model(top_code)
    original = model.get_submodule(name).dequantize()
    with pytest.warns(UserWarning, match="1 groups have zero point 0.*" + ("2 weights" if top_code else "0 weights")):
        io.save(model, tmp_path / "v1")
    io.save(model, tmp_path / "v2", checkpoint_format="gptq_v2")
    v1 = io.load(tmp_path / "v1", dtype=torch.float32).get_submodule(name).dequantize()
    v2 = io.load(tmp_path / "v2", dtype=torch.float32).get_submodule(name).dequantize()
    assert torch.equal(v2, original)
    diff = (v1 - original).abs()
    if top_code:              # codes at 15 saturate: off by one step in those 2 weights only
        assert int((diff > 0).sum()) == 2 and float(diff.max()) == pytest.approx(float(model.get_submodule(name).scales[0, 0]))
    else:
        assert torch.equal(v1, original)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = QuantConfig(bits=4, group_size=32, act_order=True)
    model, results = quantized("llama", config)
    convert(model, results, config)
    path = tmp_path_factory.mktemp("good") / "ckpt"
    io.save(model, path)
    return path


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_tensors(path, edit):
    tensors = load_file(str(path / io.WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(path / io.WEIGHTS_NAME), metadata={"format": "pt"})


def _edit_qc(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    cfg["quantization_config"].pop("meta", None)
    (path / "config.json").write_text(json.dumps(cfg))


Q = "model.layers.0.self_attn.q_proj"
BREAKAGES = {
    "truncated": (lambda p: os.truncate(p / io.WEIGHTS_NAME, (p / io.WEIGHTS_NAME).stat().st_size - 100),
                  r"model.safetensors is not a readable safetensors file .*truncated or corrupt"),
    "garbage header": (lambda p: (p / io.WEIGHTS_NAME).write_bytes(b"\xff" * 64),
                       r"not a readable safetensors file"),
    "missing tensor": (lambda p: _edit_tensors(p, lambda t: t.pop(f"{Q}.qzeros")),
                       rf"{Q}.qzeros: missing \(expected I32 \[2, 8\] for in_features=64, out_features=64, bits=4"),
    "bits disagree": (lambda p: _edit_qc(p, bits=8),
                      (rf"{Q}.qweight: expected I32 \[16, 64\] .*found I32 \[8, 64\]; that is 4 bits per code, "
                       rf"the config says bits=8")),
    "scales dtype": (lambda p: _edit_tensors(p, lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"].float()})),
                     rf"{Q}.scales: expected F16 \[2, 64\] .*found F32 \[2, 64\]"),
    "float shape": (lambda p: _edit_tensors(p, lambda t: t.update({"model.norm.weight": torch.ones(32)})),
                    r"model.norm.weight: expected float \[64\], found F32 \[32\]"),
    "g_idx range": (lambda p: _edit_tensors(p, lambda t: t[f"{Q}.g_idx"].fill_(7)),
                    rf"{Q}.g_idx: values must lie in \[0, 2\)"),
    "bad format": (lambda p: _edit_qc(p, checkpoint_format="marlin"), r"checkpoint_format='marlin' is not readable"),
    "not gptq": (lambda p: _edit_qc(p, quant_method="awq"), r"quant_method='awq'; gptq_lab reads only 'gptq'"),
    "config json": (lambda p: (p / "config.json").write_text('{"model_type": "lla'), r"config.json .*not readable JSON"),
    "unknown model": (lambda p: (p / "config.json").write_text('{"model_type": "no-such-model"}'),
                      r"transformers cannot build the model of .*config.json"),
    "stray qweight": (lambda p: _edit_tensors(p, lambda t: t.update({"model.layers.7.mlp.up_proj.qweight": t[f"{Q}.qweight"].clone()})),
                      r"model.layers.7.mlp.up_proj.qweight names no module of this llama model"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_checkpoints_raise_checkpoint_error(tmp_path, checkpoint, breakage):
    path = _copy(checkpoint, tmp_path / "broken")
    damage, message = BREAKAGES[breakage]
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        io.load(path, dtype=torch.float32)
    if breakage in ("bits disagree", "truncated", "scales dtype"):
        assert not io.describe_checkpoint(path)["ok"]


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path, checkpoint, monkeypatch):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text((checkpoint / "config.json").read_text())
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"only pickle weight files \(pytorch_model.bin\).*never unpickles"):
        io.load(path)
    assert not (tmp_path / "PWNED").exists()
    d = io.describe_checkpoint(path)
    assert not d["ok"] and "never unpickles" in io.format_description(d)


def test_links_out_of_the_directory_and_missing_shards_are_refused(tmp_path, checkpoint):
    path = _copy(checkpoint, tmp_path / "linked")
    outside = tmp_path / "elsewhere.safetensors"
    (path / io.WEIGHTS_NAME).rename(outside)
    (path / io.WEIGHTS_NAME).symlink_to(outside)
    with pytest.raises(CheckpointError, match="resolves to .*elsewhere.safetensors, outside"):
        io.load(path)
    (path / io.WEIGHTS_NAME).unlink()
    (path / io.INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"lists shards that are not in .*model-00001-of-00002"):
        io.load(path)


def test_failed_save_leaves_the_earlier_checkpoint_intact(tmp_path, checkpoint, monkeypatch):
    target = _copy(checkpoint, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    config = QuantConfig(bits=2, group_size=32)
    model, results = quantized("opt", config)
    convert(model, results, config)
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:                           # the first shard is written, then the disk "fills"
            raise OSError(28, "No space left on device")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr("gptq_lab.io.writer.save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        io.save(model, target, max_shard_size="40KB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]          # no temp dirs left over
    assert isinstance(io.load(target).get_submodule(Q), QuantLinear)
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        io.save(model, tmp_path / "fresh", max_shard_size="40KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]          # nothing half-written
    monkeypatch.undo()
    io.save(model, target)                                 # a good save replaces it (renameat2 swap)
    assert io.describe_checkpoint(target)["model_type"] == "opt"
    monkeypatch.setattr("gptq_lab.atomic._exchange", lambda a, b: False)
    io.save(model, target, checkpoint_format="gptq_v2")   # the two-rename fallback
    assert io.describe_checkpoint(target)["format"] == "gptq_v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path, checkpoint):
    model = io.load(checkpoint)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to replace .*notes.txt"):
        io.save(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="holds no QuantLinear and no results"):
        io.save(tiny_model("llama"), tmp_path / "new")


def test_describe_reports_format_and_consistency(tmp_path, checkpoint):
    d = io.describe_checkpoint(checkpoint)
    assert d["ok"] and d["format"] == "gptq" and d["bits"] == 4 and d["group_size"] == 32
    assert d["desc_act"] and d["sym"] and d["n_quantized_layers"] == 14 and d["layers_by_bits"] == {4: 14}
    assert d["size_on_disk"] == sum(p.stat().st_size for p in checkpoint.iterdir())
    mask = os.umask(0)
    os.umask(mask)                                  # written privately, then opened up per umask
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(p.stat().st_mode) for p in checkpoint.iterdir()} == {0o666 & ~mask}
    text = io.format_description(d)
    assert "gptq (v1, zero points stored minus one)" in text and "14 layers" in text and "FAIL" not in text
    path = _copy(checkpoint, tmp_path / "c")
    _edit_qc(path, desc_act=False, sym=False)
    d = io.describe_checkpoint(path)
    failed = {c["check"]: c["detail"] for c in d["checks"] if not c["ok"]}
    assert "desc_act=false but g_idx is permuted" in failed["g_idx in range and consistent with desc_act"]
    assert "quantize_config.json agrees with config.json" in failed


def test_zeros_read_back_as_stored_for_v1(checkpoint):
    tensors = load_file(str(checkpoint / io.WEIGHTS_NAME))
    zeros = unpack_qzeros(tensors[f"{Q}.qzeros"], 4, 64, v1=False)
    assert bool((zeros == 7).all())                 # sym 4-bit: true zero 8 stored as 8 - 1


def test_tokenizer_is_saved_alongside(tmp_path, checkpoint):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                  unk_token="[UNK]")
    io.save(io.load(checkpoint), tmp_path / "t", tokenizer=tok)
    assert (tmp_path / "t" / "tokenizer.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "t").convert_tokens_to_ids("world") == 2
