"""The inference path: QuantLinear.prepare (kernel chosen once, large-M dequant buffer), greedy
generation eager vs static cache, measure_decode, and the decode benchmark's CPU smoke run.
GPU tests (marked ``gpu``) check the Triton paths and torch.compile + CUDA graphs."""
from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from benchmark_loader import load_benchmark
from checkpoint_fixture import tiny_model, token_ids
from gptq_lab.kernels import ops
from gptq_lab.kernels.reference import dequantize_unchecked as unpack_dequantize
from test_qlinear import reference_output, rtn_layer

from gptq_lab import QuantConfig, UnsupportedModelError, convert, quantize_model, save
from gptq_lab.generate import (
    DecodeSettings,
    StaticGreedy,
    eager_greedy,
    figure_names,
    measure_decode,
    prepare_model,
)
from gptq_lab.qlinear import QuantLinear, quant_linears

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def quantized_llama(bits: int = 4, group_size: int = 32, device: str = "cpu") -> torch.nn.Module:
    model = tiny_model("llama")
    results = quantize_model(model, config=QuantConfig(bits=bits, group_size=group_size), method="rtn",
                             progress=False)
    return convert(model, results).to(device)


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, True), (2, 64, False), (8, -1, False),
                                                       (3, 32, True)])
def test_prepared_layer_matches_the_reference_on_both_sides_of_the_threshold(bits, group_size, act_order):
    result, layer = rtn_layer(128, 64, bits, group_size, act_order=act_order, bias=True)
    x = torch.randn(QuantLinear.dequant_above + 20, 128, generator=torch.Generator().manual_seed(2))
    layer.prepare()
    assert layer.backend == "reference"
    for m in (1, 7, QuantLinear.dequant_above, QuantLinear.dequant_above + 20):       # small and big M
        y = layer(x[:m])
        expected = reference_output(result, layer, x[:m])
        assert (y.double() - expected).abs().max() / expected.abs().max() < 1e-5, f"m={m}"


def test_large_m_reuses_one_buffer_across_calls_and_layers():
    ops.clear_workspaces()
    _, a = rtn_layer(128, 64, 4, 32)
    _, b = rtn_layer(64, 128, 4, 32, seed=1)
    a.prepare(), b.prepare()
    x = torch.randn(200, 128)
    expected_a = x @ a.dequantize()
    y = b(a(x))
    buffers = list(ops._WORKSPACES.values())
    assert len(buffers) == 1 and buffers[0].numel() == 128 * 64             # one, the largest request
    ptr = buffers[0].data_ptr()
    torch.testing.assert_close(a(x), expected_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b(a(x)), y, rtol=0, atol=0)
    assert [t.data_ptr() for t in ops._WORKSPACES.values()] == [ptr]       # reused, not re-allocated
    ops.clear_workspaces()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_traceable_dequantize_equals_the_checked_one(bits):
    _, layer = rtn_layer(96, 64, bits, 32, sym=False, act_order=True)
    torch.testing.assert_close(unpack_dequantize(layer.qweight, layer.scales, layer.qzeros, layer.g_idx, bits),
                               layer.dequantize(), rtol=0, atol=0)


def test_prepare_checks_buffers_once():
    _, layer = rtn_layer(64, 64, 4, 32)
    layer.g_idx[3] = 7                                                       # only 2 groups
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 2\)"):
        layer.prepare()


def test_static_cache_greedy_equals_transformers_generate():
    model = prepare_model(quantized_llama())
    ids = token_ids(2, 8)
    eager = eager_greedy(model, ids, 12)
    fast = StaticGreedy(model, compile=False)
    assert torch.equal(fast(ids, 12), eager)
    assert torch.equal(fast(ids, 12), eager)                                 # the reused cache is reset
    assert torch.equal(fast(ids, 5, cache_length=20), eager[:, :13])       # a longer cache, same tokens
    with pytest.raises(ValueError, match="overrun"):
        next(fast.steps(eager[:, 7:8], fast.cache(2, 20), 8, 13))
    with pytest.raises(ValueError, match="not one of this"):
        next(fast.steps(eager[:, 7:8], StaticGreedy(model, compile=False).cache(2, 20), 8, 1))


def test_measure_decode_reports_every_figure():
    model = prepare_model(quantized_llama())
    s = DecodeSettings(prompt=4, long_prompt=8, new_tokens=3, batches=(2,), repeats=1, warmup=0,
                       compile=False)
    for path in ("eager", "fast"):
        out = measure_decode(model, path, s)
        assert list(out) == figure_names(s)
        assert all(out[k] > 0 for k in out if "GB" not in k and not math.isnan(out[k]))
        assert out["weights GB"] > 0 and math.isnan(out["peak GB"])
    with pytest.raises(ValueError, match="path='slow'"):
        measure_decode(model, "slow", s)


def test_measure_decode_prefill_only_runs_no_decode_step(monkeypatch):
    model = prepare_model(quantized_llama())
    s = DecodeSettings(prompt=4, long_prompt=8, new_tokens=3, batches=(2,), repeats=1, warmup=0,
                       decode=False)                         # compile stays on: it must go unused
    steps = StaticGreedy.steps

    def no_steps(self, token, cache, start, count):
        assert count == 0, "a decode step ran"
        return steps(self, token, cache, start, count)

    monkeypatch.setattr(StaticGreedy, "steps", no_steps)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("something was compiled"))
    out = measure_decode(model, "fast", s)
    assert list(out) == figure_names(s) == ["prefill p8", "weights GB", "peak GB"]
    assert out["prefill p8"] > 0


def test_released_layer_refuses_to_save(tmp_path):
    model = quantized_llama()
    layer = next(iter(quant_linears(model).values()))
    layer._released = True                                  # what prepare(release_checkpoint=True) sets on CUDA
    with pytest.raises(UnsupportedModelError, match="reload the checkpoint"):
        save(model, tmp_path / "ckpt")
    with pytest.raises(UnsupportedModelError, match="dequantize"):
        layer.dequantize()


def test_run_notebook_keeps_the_executed_copy_even_when_a_cell_fails(monkeypatch, tmp_path, capsys):
    """benchmarks/run_notebook.py (GPU runs of a tutorial): outputs kept, the error reported."""
    import nbformat
    runner = load_benchmark("run_notebook", monkeypatch, tmp_path)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)"),
                                         nbformat.v4.new_code_cell("1 / 0"),
                                         nbformat.v4.new_code_cell("print('not reached')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "nb" / "tiny.ipynb"
    src.parent.mkdir()
    nbformat.write(nb, src)
    assert runner.main([str(src), "--suffix", "test", "--timeout", "120"]) == 1
    done = nbformat.read(tmp_path / "tiny_test.ipynb", as_version=4)
    assert runner.text_outputs(done)[:2] == ["42\n", "ZeroDivisionError: division by zero"]
    assert "not reached" not in capsys.readouterr().out
    assert not [f for f in tmp_path.iterdir() if ".tmp-" in f.name]     # (atomic write)


def test_benchmark_smoke_run_on_cpu(monkeypatch, tmp_path):
    bench = load_benchmark("decode", monkeypatch, tmp_path)
    text = bench.main(["--tiny", "--device", "cpu"])
    rows = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert [r.split(" | ")[1:3] for r in rows] == [["eager", "fp16"], ["fast", "fp16"], ["eager", "int4"],
                                                   ["eager", "int4/fp16"], ["fast", "int4"],
                                                   ["fast", "int4/fp16"]]
    assert "failed" not in text
    assert (tmp_path / "decode.txt").read_text() == text + "\n"


def test_benchmark_compares_int4_settings_without_fp16(monkeypatch, tmp_path):
    bench = load_benchmark("decode", monkeypatch, tmp_path)
    text = bench.main(["--tiny", "--device", "cpu", "--paths", "fast", "--no-fp16", "--batches", "none"])
    assert "| shape | path | dtype | decode b1 p4 | decode b1 p16 | prefill p16 | weights GB | peak GB |" in text
    rows = [line.split(" | ")[1:3] for line in text.splitlines() if line.startswith("| tiny")]
    assert rows == [["fast", "int4"]]


def test_benchmark_isolate_times_each_model_in_its_own_process(monkeypatch, tmp_path):
    bench = load_benchmark("decode", monkeypatch, tmp_path)
    text = bench.main(["--tiny", "--device", "cpu", "--paths", "fast", "--batches", "none", "--isolate"])
    assert "each model timed in its own process" in text
    rows = [line.split(" | ")[1:3] for line in text.splitlines() if line.startswith("| tiny")]
    assert rows == [["fast", "fp16"], ["fast", "int4"], ["fast", "int4/fp16"]]
    assert (tmp_path / "decode.txt").read_text() == text + "\n"       # the parent's table only
    killed = type("Done", (), {"returncode": -9})
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: killed)   # a child killed
    text = bench.main(["--tiny", "--device", "cpu", "--paths", "fast", "--batches", "none", "--isolate"])
    assert "| tiny | all | fp16 | failed: its process exited with code -9 |" in text
    assert "| tiny | all | int4 | failed: its process exited with code -9 |" in text


def test_benchmark_prefill_ab_alternates_fp16_and_int4_in_one_process(monkeypatch, tmp_path):
    bench = load_benchmark("decode", monkeypatch, tmp_path)
    timed = []
    real = bench.measure_decode
    monkeypatch.setattr(bench, "measure_decode",
                        lambda model, *a, **k: timed.append(type(model.model.layers[0].mlp.up_proj).__name__)
                        or real(model, *a, **k))
    text = bench.main(["--tiny", "--device", "cpu", "--prefill-ab", "3"])
    assert timed == ["Linear", "QuantLinear"] * 3                       # alternated, fp16 first
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r[0] for r in rows] == ["| 1", "| 2", "| 3", "| median"]
    for r in rows[:3]:
        assert abs(float(r[3].rstrip("x |")) - float(r[2]) / float(r[1])) < 0.01
    assert (tmp_path / "prefill_ab.txt").read_text() == text + "\n"
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--device", "cpu", "--prefill-ab", "3", "--kernels", "default,cuda"])


def test_benchmark_prefill_ab_with_w4_off_and_on(monkeypatch, tmp_path):
    bench = load_benchmark("decode", monkeypatch, tmp_path)
    monkeypatch.setenv("GPTQ_LAB_W4", "keep")
    timed = []
    real = bench.measure_decode
    monkeypatch.setattr(bench, "measure_decode", lambda model, *a, **k: timed.append(
        (type(model.model.layers[0].mlp.up_proj).__name__, bench.os.environ.get("GPTQ_LAB_W4")))
        or real(model, *a, **k))
    text = bench.main(["--tiny", "--device", "cpu", "--prefill-ab", "2", "--kernels", "cuda", "--w4-ab"])
    fp16 = ("Linear", "keep")
    assert timed == [fp16, ("QuantLinear", "0"), ("QuantLinear", "1")] * 2
    assert bench.os.environ["GPTQ_LAB_W4"] == "keep"                      # restored
    head, *rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    assert head[2:4] == ["int4 cuda W4=0 prefill p16", "int4 cuda W4=1 prefill p16"]
    assert [r[0] for r in rows] == ["| 1", "| 2", "| median"]
    for r in rows[:2]:
        assert abs(float(r[4].rstrip("x")) - float(r[2]) / float(r[1])) < 0.01
        assert abs(float(r[5].rstrip("x |")) - float(r[3]) / float(r[1])) < 0.01
    with pytest.raises(SystemExit):          # the W4 GEMM serves cuda_decode layers only
        bench.main(["--tiny", "--device", "cpu", "--prefill-ab", "2", "--w4-ab"])


def test_compile_mode_adds_programmatic_dependent_launch_as_options():
    from gptq_lab.generate import compile_mode
    assert compile_mode("reduce-overhead", False) == {"mode": "reduce-overhead"}
    assert compile_mode("reduce-overhead", True) == {
        "options": {"triton.cudagraphs": True, "triton.enable_pdl": True}}
    assert compile_mode(None, True) == {"options": {"triton.enable_pdl": True}}
    assert StaticGreedy(tiny_model("llama"), compile=False).pdl is False      # CPU: never


def test_own_cuda_graphs_only_where_they_can_record_the_compiled_step():
    model = tiny_model("llama")                                              # on the CPU
    assert StaticGreedy(model, compile=False).graphs is False
    assert StaticGreedy(model).graphs is False                               # compiled, but no CUDA
    with pytest.raises(ValueError, match="CUDA device"):
        StaticGreedy(model, graphs=True)
    with pytest.raises(ValueError, match="compile=True"):
        StaticGreedy(model, compile=False, graphs=True)
    with pytest.raises(ValueError, match="reduce-overhead"):
        StaticGreedy(model, mode="reduce-overhead", graphs=True)


def test_profile_benchmark_smoke_run_on_cpu(monkeypatch, tmp_path):
    bench = load_benchmark("decode_profile", monkeypatch, tmp_path)
    text = bench.main(["--tiny", "--device", "cpu"])
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| fp16", "| int4"))]
    assert [r[0] for r in rows] == ["| fp16", "| int4 (cuda+fuse)"]
    for r in rows:                                   # the groups add up to the kernels' total
        groups = [float(c.split()[0]) for c in r[1:5]]
        assert float(r[5]) == pytest.approx(sum(groups), abs=2e-3) and float(r[5]) > 0
    assert bench.group_of("void gptq_lab::int4_decode_kernel<__half, 1>(...)") == "int4 matmul"
    assert bench.group_of("_gemv_kernel") == "int4 matmul"
    assert bench.group_of("sm90_xmma_gemm_f16f16_f16f32") == "float matmul"
    assert bench.group_of("nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT") == "float matmul"
    assert bench.group_of("flash_fwd_kernel") == "attention"
    assert bench.group_of("vectorized_elementwise_kernel") == "other"
    assert (tmp_path / "decode_profile.txt").read_text() == text + "\n"
    text = bench.main(["--tiny", "--device", "cpu", "--int4-first"])
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith(("| fp16", "| int4"))]
    assert rows == ["| int4 (cuda+fuse)", "| fp16"]


def test_evaluator_reports_the_same_figures():
    pytest.importorskip("plotly")
    from gptq_lab.lab import Evaluator
    ev = Evaluator({"fp": tiny_model("llama"), "int4": quantized_llama()})
    s = DecodeSettings(prompt=4, long_prompt=8, new_tokens=3, batches=(2,), repeats=1, warmup=0,
                       compile=False)
    df = ev.decode_speed(settings=s)
    assert list(df.index) == [("fp", "eager"), ("fp", "fast"), ("int4", "eager"), ("int4", "fast")]
    assert list(df.columns) == figure_names(s)
    assert df.loc[("int4", "fast"), "weights GB"] < df.loc[("fp", "fast"), "weights GB"]
    assert all(q.backend == "reference" for q in quant_linears(ev.models["int4"]).values())


def test_activation_dtype_is_the_models_float_dtype():
    from gptq_lab.generate import activation_dtype
    model = quantized_llama()
    assert activation_dtype(model) is None                               # float32
    assert activation_dtype(model.half()) == torch.float16
    assert activation_dtype(model.to(torch.bfloat16)) == torch.bfloat16


# ---------------------------------------------------------------------- GPU

@pytest.mark.gpu
@cuda
def test_gpu_evaluator_release_checkpoint_frees_the_checkpoint_layout():
    pytest.importorskip("plotly")
    from gptq_lab.lab import Evaluator
    ev = Evaluator({"int4": quantized_llama().cuda().half()})
    s = DecodeSettings(prompt=4, long_prompt=8, new_tokens=3, batches=(), repeats=1, warmup=0,
                       compile=False)
    kept = ev.decode_speed(paths=("eager",), settings=s, cuda_decode=True)
    freed = ev.decode_speed(paths=("eager",), settings=s, cuda_decode=True, release_checkpoint=True)
    assert freed.loc[("int4", "eager"), "weights GB"] < kept.loc[("int4", "eager"), "weights GB"]
    assert all(q.qweight.numel() == 0 for q in quant_linears(ev.models["int4"]).values())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("cuda_decode,rows,dtype", [
    (False, (1, 16, 300), torch.float16),   # Triton: gemv, tensor-core gemm, dequant + cuBLAS
    (True, (1, 16, 17, 64, 128, 129, 300), torch.float16),   # CUDA kernel to 128 rows, then dequant
    (True, (1, 16, 300), torch.bfloat16),   # the CUDA layout made for bf16 activations
])
def test_gpu_prepared_paths_match_the_reference(act_order, cuda_decode, rows, dtype):
    result, layer = rtn_layer(512, 256, 4, 128, act_order=act_order, bias=True)
    x = torch.randn(300, 512).to(dtype)
    expected = reference_output(result, layer, x.float())                           # on the CPU
    layer = layer.cuda().prepare(release_checkpoint=True, cuda_decode=cuda_decode, act_dtype=dtype)
    assert layer.backend == "triton" and layer.qweight.numel() == 0
    if cuda_decode:                          # one layout only: the CUDA kernel's
        assert layer.cuda_qweight is not None and not hasattr(layer, "kernel_qweight")
        assert layer._cuda_meta.dtype == dtype
    for m in rows:
        err = (layer(x[:m].cuda()).double().cpu() - expected[:m]).norm() / expected[:m].norm()
        assert err < (3e-3 if dtype == torch.float16 else 1e-2), f"m={m}: relative error {err:.2e}"
    if cuda_decode:                          # another dtype cannot fall back once released
        with pytest.raises(UnsupportedModelError, match="prepared for"):
            layer(x[:1].cuda().to(torch.float16 if dtype == torch.bfloat16 else torch.bfloat16))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cuda_decode,fuse,graphs", [(False, False, True), (True, False, True),
                                                     (False, True, True), (True, True, True),
                                                     (True, True, False)])
def test_gpu_compiled_cuda_graph_decode_equals_eager(cuda_decode, fuse, graphs):
    torch._dynamo.reset()                                 # each case compiles the same step anew
    model = quantized_llama(group_size=64)
    model.lm_head.weight.data *= 30                       # peaked logits: fp16 rounding cannot flip argmax
    model = model.cuda().half()
    plain = prepare_model(copy.deepcopy(model), cuda_decode=cuda_decode) if fuse else None
    model = prepare_model(model, release_checkpoint=True, cuda_decode=cuda_decode, fuse=fuse)
    assert all(q.backend == "triton" and q.qweight.numel() == 0 for q in quant_linears(model).values())
    assert len(quant_linears(model)) == (4 if fuse else 7) * model.config.num_hidden_layers
    ids = token_ids(2, 8).cuda()
    eager = eager_greedy(model, ids, 10)
    if fuse:                                              # fusing changes no token
        assert torch.equal(eager, eager_greedy(plain, ids, 10))
    # our own graph per cache, or torch's (reduce-overhead: cudagraph trees)
    fast = StaticGreedy(model) if graphs else StaticGreedy(model, mode="reduce-overhead", graphs=False)
    assert fast.graphs is graphs
    for _ in range(3):                                    # warm-up, record, replay
        out = fast(ids, 10)
    assert torch.equal(out, eager)
    assert torch.equal(fast(ids[:1], 10), eager_greedy(model, ids[:1], 10))    # a second shape


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
