"""Resumable quantization: a run killed with SIGKILL mid-way resumes to the bitwise-same result,
and a state that belongs to another run, or is damaged, is refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from gptq_lab import QuantConfig, quantize_model, save
from gptq_lab.resume import STATE_NAME, ResumeError

LAYERS = 4
CONFIG = QuantConfig(bits=4, group_size=32)

# The child process builds the same tiny model and calibration as ``tiny`` / ``calib`` below,
# and sleeps after each block so that the parent can kill it between two blocks.
CHILD = """
import sys, time, torch, transformers as tf
from gptq_lab import QuantConfig, quantize_model
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers={layers},
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = tf.AutoModelForCausalLM.from_config(cfg).eval()
ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
quantize_model(model, ids, QuantConfig(bits=4, group_size=32), device="cpu", progress=False,
               resume_dir=sys.argv[1], on_block=lambda i, r: time.sleep(1.5))
"""


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def calib(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(seed))


def blocks_done(state_dir: Path) -> int:
    try:
        return json.loads((state_dir / STATE_NAME).read_text())["blocks_done"]
    except (OSError, ValueError, KeyError):
        return 0


def assert_same_run(a: dict, b: dict, model_a, model_b) -> None:
    assert a.keys() == b.keys()
    for name, ra in a.items():
        rb = b[name]
        for f in ("codes", "scales", "zeros", "g_idx", "column_loss", "dead_channels"):
            assert torch.equal(getattr(ra, f), getattr(rb, f)), (name, f)
        assert ra.damp_used == rb.damp_used and ra.notes == rb.notes
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_killed_run_resumes_to_the_bitwise_same_checkpoint(tmp_path):
    state_dir = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(layers=LAYERS), str(state_dir)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while blocks_done(state_dir) < 2:
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the child wrote no state in time"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert child.returncode == -signal.SIGKILL
    killed_at = blocks_done(state_dir)
    assert 2 <= killed_at < LAYERS, killed_at          # really killed mid-way

    resumed_model, calls = tiny(), []
    resumed = quantize_model(resumed_model, calib(), CONFIG, device="cpu", resume_dir=state_dir,
                             progress=lambda done, total, msg: calls.append((done, msg)))
    assert calls[0] == (killed_at, f"resumed after block {killed_at - 1}")
    assert len(calls) == 1 + LAYERS - killed_at         # only the remaining blocks were run
    straight_model = tiny()
    straight = quantize_model(straight_model, calib(), CONFIG, device="cpu", progress=False)
    assert_same_run(resumed, straight, resumed_model, straight_model)

    save(resumed_model, tmp_path / "resumed", resumed, config=CONFIG)
    save(straight_model, tmp_path / "straight", straight, config=CONFIG)
    ta = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    tb = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_in_the_same_process_after_an_exception(tmp_path):
    """A notebook cell that died (here: in on_block) is rerun on the half-quantized model object."""
    def boom(i, _):
        if i == 1:
            raise KeyboardInterrupt
    model = tiny()
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, calib(), CONFIG, device="cpu", progress=False, resume_dir=tmp_path, on_block=boom)
    assert blocks_done(tmp_path) == 2
    resumed = quantize_model(model, calib(), CONFIG, device="cpu", progress=False, resume_dir=tmp_path)
    straight_model = tiny()
    straight = quantize_model(straight_model, calib(), CONFIG, device="cpu", progress=False)
    assert_same_run(resumed, straight, model, straight_model)
    again = quantize_model(tiny(), calib(), CONFIG, device="cpu", progress=False, resume_dir=tmp_path)
    assert_same_run(again, straight, model, straight_model)     # all blocks restored, none rerun


@pytest.fixture
def half_state(tmp_path):
    """A state directory with 2 of 4 blocks finished."""
    def stop(i, _):
        if i == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny(), calib(), CONFIG, device="cpu", progress=False, resume_dir=tmp_path, on_block=stop)
    return tmp_path


@pytest.mark.parametrize("change,match", [
    (lambda: {"model": tiny(seed=5)}, "model|weights of block"),
    (lambda: {"ids": calib(seed=7)}, "calibration"),
    (lambda: {"config": QuantConfig(bits=3, group_size=32)}, "config"),
    (lambda: {"compute_dtype": torch.float32}, "run"),
    (lambda: {"batch_size": 4}, "run"),
])
def test_a_state_of_another_run_is_refused(half_state, change, match):
    args = {"model": tiny(), "ids": calib(), "config": CONFIG} | change()
    kw = {k: v for k, v in args.items() if k not in ("model", "ids", "config")}
    with pytest.raises(ResumeError, match=match):
        quantize_model(args["model"], args["ids"], args["config"], device="cpu", progress=False,
                       resume_dir=half_state, **kw)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete", "garbage manifest"])
def test_a_damaged_state_is_refused(half_state, damage):
    target = half_state / "block_0001.safetensors"
    if damage == "flip a byte":
        data = bytearray(target.read_bytes())
        data[-10] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "delete":
        target.unlink()
    else:
        (half_state / STATE_NAME).write_text("{not json")
    with pytest.raises(ResumeError, match="damaged|missing|unreadable"):
        quantize_model(tiny(), calib(), CONFIG, device="cpu", progress=False, resume_dir=half_state)


def test_a_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ResumeError, match="not a resume directory"):
        quantize_model(tiny(), calib(), CONFIG, device="cpu", progress=False, resume_dir=tmp_path)


@pytest.mark.parametrize("text", ["{}", "[]", '{"version": 1}', '{"version": 1, "fingerprint": 3}'])
def test_a_manifest_of_the_wrong_shape_is_refused(tmp_path, text):
    (tmp_path / STATE_NAME).write_text(text)
    with pytest.raises(ResumeError):
        quantize_model(tiny(), calib(), CONFIG, device="cpu", progress=False, resume_dir=tmp_path)
