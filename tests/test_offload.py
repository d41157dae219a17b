"""Models bigger than the accelerator: only one block's copy goes to the device; activations can
stay in CPU memory; weights can be memory-mapped safetensors. CPU tests run the same code path
with device="cpu"; the GPU test (skipped without CUDA) checks that the model never leaves the CPU."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from gptq_lab import QuantConfig, quantize_model
from gptq_lab.arch import block_linears, family_of, weight_matrix
from gptq_lab.pipeline import _masters, block_to

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIG = QuantConfig(bits=4, group_size=32)


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def calib() -> torch.Tensor:
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n].codes, b[n].codes) and torch.equal(a[n].scales, b[n].scales)
                                        for n in a)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_offloaded_activations_give_the_same_result(batch_size):
    a, b = tiny(), tiny()
    ra = quantize_model(a, calib(), CONFIG, device="cpu", batch_size=batch_size, progress=False)
    rb = quantize_model(b, calib(), CONFIG, device="cpu", batch_size=batch_size, progress=False,
                        offload_activations=True)
    assert same(ra, rb)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_memory_mapped_safetensors_model_quantizes_like_the_in_memory_one(tmp_path):
    tiny().save_pretrained(tmp_path, safe_serialization=True)
    mapped = tf.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", torch_dtype=torch.float32).eval()
    in_memory = tiny()
    ra = quantize_model(mapped, calib(), CONFIG, device="cpu", batch_size=4, progress=False,
                        offload_activations=True)
    rb = quantize_model(in_memory, calib(), CONFIG, device="cpu", batch_size=4, progress=False)
    assert same(ra, rb)
    for n, r in ra.items():
        torch.testing.assert_close(mapped.get_submodule(n).weight, r.dequantize(), rtol=0, atol=0)


def test_block_copy_is_on_the_device_in_the_dtype_and_independent():
    block = tiny().model.layers[0]
    work = block_to(block, torch.device("cpu"), torch.bfloat16)
    pairs = list(zip(block.parameters(), work.parameters()))
    assert len(pairs) == len(list(block.parameters()))
    for p, q in pairs:
        assert q.dtype == torch.bfloat16 and q.data_ptr() != p.data_ptr()
        torch.testing.assert_close(q.float(), p.to(torch.bfloat16).float(), rtol=0, atol=0)
    with torch.no_grad():
        next(work.parameters()).zero_()
    assert next(block.parameters()).abs().sum() > 0


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masters_are_made_on_the_device_and_never_share_the_working_copy(model_dtype, dtype):
    model = tiny().to(model_dtype)
    family = family_of(model)
    block = model.model.layers[0]
    moved: dict = {}
    work = block_to(block, torch.device("cpu"), dtype, moved)
    masters = _masters(block_linears(block, family), moved, dtype)
    working = block_linears(work, family)
    for name, mod in block_linears(block, family).items():
        assert masters[name].dtype == torch.float32
        assert torch.equal(masters[name], weight_matrix(mod).float()), name
        assert masters[name].data_ptr() not in (mod.weight.data_ptr(), working[name].weight.data_ptr()), name


@cuda
def test_on_gpu_the_model_stays_on_the_cpu_and_matches_the_cpu_run():
    model = tiny()
    results = quantize_model(model, calib(), CONFIG, device="cuda", batch_size=4, progress=False,
                             offload_activations=True, compute_dtype=torch.float32)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(r.codes.device.type == "cpu" for r in results.values())
    reference = quantize_model(tiny(), calib(), CONFIG, device="cpu", batch_size=4, progress=False,
                               compute_dtype=torch.float32)
    # GPU and CPU sums differ in the last bits, and a flipped rounding moves the error GPTQ
    # feeds to the later columns, so codes drift apart, more in later blocks (seen: 95% of all
    # codes equal). Block 0 sees identical inputs: 97.6% of its codes agreed on an H200
    # (2026-11-27); every layer's GPTQ loss agrees within 3%.
    first = [n for n in results if ".layers.0." in n]
    agree = sum(int((results[n].codes == reference[n].codes).sum()) for n in first)
    assert first and agree / sum(results[n].codes.numel() for n in first) > 0.95
    for n in results:
        assert results[n].loss == pytest.approx(reference[n].loss, rel=0.03), n


def test_the_speed_benchmark_runs_on_cpu_with_offload_and_resume(tmp_path):
    """benchmarks/quantize_speed.py --tiny --device cpu: the code paths the GPU run takes."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(root / "benchmarks" / "quantize_speed.py"), "--tiny", "--device", "cpu",
           "--batch-size", "4", "--offload-activations", "--resume-dir", str(tmp_path / "state")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "quantize_speed_tiny.txt").read_text()
    for phase in ("capture inputs", "forward", "hessian", "solve", "packing", "save state", "total"):
        assert phase in table
    assert (tmp_path / "state" / "state.json").exists()
