"""Hostile checkpoints and interrupted saves (issue 9): every refusal is a CheckpointError that
names the tensor or file and what to do; a failed save leaves the previous checkpoint intact.

Already covered in test_io.py (not repeated): truncated by 100 bytes, garbage header, missing
qzeros, bits disagreeing with qweight, F32 scales, float tensor shape, g_idx out of range,
unknown format / quant_method, broken config.json, a qweight naming no module, a pickle-only
directory (never unpickled), a weights link out of the directory, an index naming absent
shards, and ENOSPC while writing the second shard.
"""
import json
import os
import pickle

import pytest
import torch
from checkpoint_fixture import tiny_model, token_ids
from safetensors.torch import load_file, save_file

from gptq_lab import CheckpointError, QuantConfig, convert, io, quantize_model
from gptq_lab.qlinear import QuantLinear

Q = "model.layers.0.self_attn.q_proj"
CFG = QuantConfig(bits=4, group_size=32)


def quantized_model(seed=0):
    model = tiny_model("llama", seed=seed)
    return convert(model, quantize_model(model, None, CFG, method="rtn", progress=False), CFG)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "ckpt"
    io.save(quantized_model(), path)
    return path


def copy_dir(src, dst):
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def contents(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def edit_tensors(path, edit):
    tensors = load_file(str(path / io.WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(path / io.WEIGHTS_NAME), metadata={"format": "pt"})


def edit_config(path, qc=None, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    if qc:
        cfg["quantization_config"].update(qc)
        cfg["quantization_config"].pop("meta", None)
    (path / "config.json").write_text(json.dumps(cfg))


def put(key, value):
    return lambda t: t.update({key: value})


def drop(key):
    return lambda t: t.pop(key)


WEIGHTS = io.WEIGHTS_NAME
HOSTILE = {
    # missing tensors
    "missing float tensor": (lambda p: edit_tensors(p, drop("model.norm.weight")),
                             r"model.norm.weight: missing \(expected float \[64\]\)"),
    "missing qweight": (lambda p: edit_tensors(p, drop(f"{Q}.qweight")),
                        (rf"{Q}.qweight: missing \(the layer has \['g_idx', 'qzeros', 'scales'\] of a quantized "
                         rf"layer but no qweight\); the checkpoint is incomplete")),
    "missing g_idx": (lambda p: edit_tensors(p, drop(f"{Q}.g_idx")),
                      (rf"{Q}.g_idx: missing \(expected I32 \[64\] for in_features=64, out_features=64, bits=4, "
                       rf"group_size=32\)")),
    # wrong shapes
    "g_idx length": (lambda p: edit_tensors(p, put(f"{Q}.g_idx", torch.zeros(32, dtype=torch.int32))),
                     rf"{Q}.g_idx: expected I32 \[64\] .*found I32 \[32\]"),
    "qweight transposed": (lambda p: edit_tensors(p, put(f"{Q}.qweight", torch.zeros(64, 8, dtype=torch.int32))),
                           rf"{Q}.qweight: expected I32 \[8, 64\] .*found I32 \[64, 8\]"),
    "embedding rows": (lambda p: edit_tensors(p, put("model.embed_tokens.weight", torch.zeros(100, 64))),
                       r"model.embed_tokens.weight: expected float \[128, 64\], found F32 \[100, 64\]"),
    # wrong dtypes
    "qweight int64": (lambda p: edit_tensors(p, put(f"{Q}.qweight", torch.zeros(8, 64, dtype=torch.int64))),
                      rf"{Q}.qweight: expected I32 \[8, 64\] .*found I64 \[8, 64\]"),
    "g_idx float": (lambda p: edit_tensors(p, put(f"{Q}.g_idx", torch.zeros(64))),
                    rf"{Q}.g_idx: expected I32 \[64\] .*found F32 \[64\]"),
    "norm as int": (lambda p: edit_tensors(p, put("model.norm.weight", torch.ones(64, dtype=torch.int32))),
                    r"model.norm.weight: expected float \[64\], found I32 \[64\]"),
    # truncated safetensors
    "truncated to 0": (lambda p: os.truncate(p / WEIGHTS, 0), (r"model.safetensors is not a readable safetensors "
                                                               r"file .*truncated or corrupt: re-save or re-copy")),
    "truncated in length": (lambda p: os.truncate(p / WEIGHTS, 5), r"not a readable safetensors file"),
    "truncated in header": (lambda p: os.truncate(p / WEIGHTS, 40), r"not a readable safetensors file"),
    "truncated after header": (lambda p: os.truncate(p / WEIGHTS, 8 + int.from_bytes(
        (p / WEIGHTS).read_bytes()[:8], "little")), r"not a readable safetensors file"),
    # config disagreeing with the tensors
    "hidden_size": (lambda p: edit_config(p, hidden_size=128, intermediate_size=256),
                    r"does not match its config.json:\n  .*expected"),
    "extra layer": (lambda p: edit_config(p, num_hidden_layers=3),
                    r"model.layers.2.*missing"),
    "group_size": (lambda p: edit_config(p, qc={"group_size": 64}),
                   rf"{Q}.qzeros: expected I32 \[1, 8\] .*group_size=64\), found I32 \[2, 8\]"),
    "bits string": (lambda p: edit_config(p, qc={"bits": "4"}),
                    r"quantization_config is not a valid GPTQ config: bits='4' is not supported"),
    "no bits": (lambda p: edit_config(p, qc={"bits": None}) or _drop_qc_key(p, "bits"),
                r"quantization_config has no 'bits'"),
    "dynamic list": (lambda p: edit_config(p, qc={"dynamic": ["+:mlp"]}),
                     r"quantization_config.dynamic must map '\+:regex'/'-:regex' strings to dicts"),
    "dynamic bad bits": (lambda p: edit_config(p, qc={"dynamic": {"+:.*mlp": {"bits": 5}}}),
                         r"not a valid GPTQ config: override .*bits=5 is not supported"),
    "meta list": (lambda p: edit_config(p, qc={"meta": [1]}) or _set_qc_key(p, "meta", [1]),
                  r"quantization_config.meta must be an object"),
    "model_type int": (lambda p: edit_config(p, model_type=5), r"transformers cannot build the model"),
    "no quantization_config": (lambda p: (edit_config(p, quantization_config=None),
                                          (p / io.QUANTIZE_CONFIG_NAME).unlink()),
                               r"config.json has no quantization_config .*not a GPTQ checkpoint"),
}


def _drop_qc_key(path, key):
    for name in ("config.json", io.QUANTIZE_CONFIG_NAME):
        cfg = json.loads((path / name).read_text())
        (cfg.get("quantization_config") or cfg).pop(key, None)
        (path / name).write_text(json.dumps(cfg))


def _set_qc_key(path, key, value):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"][key] = value
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_checkpoint_is_refused_with_the_tensor_named(tmp_path, good, case):
    path = copy_dir(good, tmp_path / "c")
    damage, match = HOSTILE[case]
    damage(path)
    damaged = contents(path)
    with pytest.raises(CheckpointError, match=match):
        io.load(path, dtype=torch.float32)
    d = io.describe_checkpoint(path)                   # describe reports instead of raising
    assert isinstance(d, dict) and "checks" in d
    if case not in ("hidden_size", "extra layer", "model_type int", "missing qweight", "missing float tensor",
                    "embedding rows", "norm as int"):   # those need the model built: only load sees them
        assert not d["ok"], d["checks"]
    assert contents(path) == damaged                    # reading never writes


class Pwn:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_beside_safetensors_is_ignored_with_a_warning_never_unpickled(tmp_path, good, monkeypatch):
    path = copy_dir(good, tmp_path / "c")
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Pwn()))
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"pickle files \(pytorch_model.bin\); they are ignored, never unpickled"):
        model = io.load(path)
    assert isinstance(model.get_submodule(Q), QuantLinear)
    assert not (tmp_path / "PWNED").exists()


def test_index_pointing_at_a_pickle_is_refused(tmp_path, good, monkeypatch):
    path = copy_dir(good, tmp_path / "c")
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Pwn()))
    (path / io.INDEX_NAME).write_text(json.dumps({"weight_map": {"model.norm.weight": "pytorch_model.bin"}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"maps tensors to \['pytorch_model.bin'\], which are not "
                                              r".safetensors files; .*never unpickles"):
        io.load(path)
    assert not (tmp_path / "PWNED").exists()


def test_pickle_disguised_as_safetensors_is_never_unpickled(tmp_path, good, monkeypatch):
    path = copy_dir(good, tmp_path / "c")
    (path / WEIGHTS).write_bytes(pickle.dumps(Pwn()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        io.load(path)
    assert not io.describe_checkpoint(path)["ok"]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("how", ["config link", "index link", "shard ../", "shard absolute"])
def test_links_and_paths_out_of_the_directory_are_refused(tmp_path, good, how):
    path = copy_dir(good, tmp_path / "c")
    outside = tmp_path / "outside"
    outside.mkdir()
    if how == "config link":
        (path / "config.json").rename(outside / "config.json")
        (path / "config.json").symlink_to(outside / "config.json")
        match = r"config.json resolves to .*outside/config.json, outside .*refusing to follow a link"
    elif how == "index link":
        (outside / io.INDEX_NAME).write_text(json.dumps({"weight_map": {}}))
        (path / io.INDEX_NAME).symlink_to(outside / io.INDEX_NAME)
        match = r"model.safetensors.index.json resolves to .*, outside"
    else:
        (path / WEIGHTS).rename(outside / WEIGHTS)
        target = f"../outside/{WEIGHTS}" if how == "shard ../" else str(outside / WEIGHTS)
        index = {"weight_map": {k: target for k in load_file(str(outside / WEIGHTS))}}
        (path / io.INDEX_NAME).write_text(json.dumps(index))
        match = r"model.safetensors resolves to .*outside/model.safetensors, outside"
    with pytest.raises(CheckpointError, match=match):
        io.load(path)


def test_link_inside_the_directory_is_followed(tmp_path, good):
    path = copy_dir(good, tmp_path / "c")
    (path / WEIGHTS).rename(path / "real.safetensors")
    (path / WEIGHTS).symlink_to(path / "real.safetensors")
    assert isinstance(io.load(path).get_submodule(Q), QuantLinear)      # read once, not twice
    assert io.describe_checkpoint(path)["ok"]


# ------------------------------------------------------------------------ interrupted saves

@pytest.fixture
def target(tmp_path, good):
    return copy_dir(good, tmp_path / "ckpt")


def _assert_intact(target, before):
    assert contents(target) == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt"]      # no temporaries left
    assert isinstance(io.load(target).get_submodule(Q), QuantLinear)


def test_keyboard_interrupt_while_writing_tensors_keeps_the_old_checkpoint(target, monkeypatch):
    before = contents(target)

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr("gptq_lab.io.writer.save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        io.save(quantized_model(seed=1), target)
    _assert_intact(target, before)


def test_no_space_while_writing_the_config_keeps_the_old_checkpoint(target, monkeypatch):
    before = contents(target)
    from gptq_lab.io import writer
    real = writer._write_json

    def enospc_on_second(path, obj):
        if path.name == io.QUANTIZE_CONFIG_NAME:
            raise OSError(28, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(writer, "_write_json", enospc_on_second)
    with pytest.raises(OSError, match="No space left on device"):
        io.save(quantized_model(seed=1), target)
    _assert_intact(target, before)


def test_no_space_while_syncing_keeps_the_old_checkpoint(target, monkeypatch):
    before = contents(target)

    def enospc(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gptq_lab.atomic._fsync_tree", enospc)
    with pytest.raises(OSError, match="No space left on device"):
        io.save(quantized_model(seed=1), target)
    _assert_intact(target, before)


def test_keyboard_interrupt_between_the_fallback_renames_puts_the_old_checkpoint_back(target, monkeypatch):
    """Without renameat2 the swap is two renames; an interrupt between them must not lose the old one."""
    before = contents(target)
    from gptq_lab import atomic
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:                             # old moved aside; new not yet in place
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        io.save(quantized_model(seed=1), target)
    monkeypatch.undo()
    _assert_intact(target, before)
    io.save(quantized_model(seed=1), target)           # and a later save still works
    assert contents(target) != before
    with torch.no_grad():
        assert torch.isfinite(io.load(target, dtype=torch.float32)(token_ids(n=1, t=8)).logits).all()
