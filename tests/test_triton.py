"""The Triton kernels against the torch reference.

CPU: the repacking (pure torch) and, in a subprocess under TRITON_INTERPRET=1, every kernel
on small shapes (a few seconds). GPU (marked ``gpu``): a sweep of shapes, group sizes, act-order,
sym/asym, 4/8 bits and both dtypes, and torch.compile / CUDA graphs on a tiny model.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from gptq_lab.kernels.reference import dequantize_gptq
from gptq_lab.kernels.triton_pack import dequantize_prepared, prepare

from gptq_lab.quant import pack_qweight, pack_qzeros, rtn

TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_layer(n: int, k: int, bits: int, group_size: int, sym: bool, act_order: bool = False,
               seed: int = 0, device: str = "cpu"):
    """Random GPTQ layer -> (qweight, scales fp16, qzeros v2, g_idx) in checkpoint layout."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    perm = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
    codes_p, scales, zeros, g_p = rtn(w[:, perm], bits, group_size, sym)   # groups in perm order
    codes, g_idx = torch.empty_like(codes_p), torch.empty_like(g_p)
    codes[:, perm], g_idx[perm] = codes_p, g_p                              # GPTQ act-order g_idx
    tensors = (pack_qweight(codes, bits), scales.t().contiguous().half(),
               pack_qzeros(zeros, bits, v1=False), g_idx.to(torch.int32))
    return tuple(t.to(device) for t in tensors)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "non-finite output (unwritten or overflowed)"
    return float((y.double() - ref.double()).norm() / ref.double().norm())


# ------------------------------------------------------------------ CPU: repacking

@pytest.mark.parametrize("bits,group_size,act_order", [
    (4, 128, False), (4, 32, True), (8, -1, False), (2, 64, True), (4, 64, False)])
def test_prepared_layout_dequantizes_to_the_reference(bits, group_size, act_order):
    layer = make_layer(48, 320, bits, group_size, sym=False, act_order=act_order)
    p = prepare(*layer, bits)
    ref = dequantize_gptq(*layer, bits)                                      # [K, N]
    rows = p.perm if p.perm is not None else torch.arange(ref.shape[0])
    assert (p.perm is not None) == act_order
    assert torch.allclose(dequantize_prepared(p), ref[rows], rtol=0, atol=1e-6)


def test_irregular_groups_are_padded_to_whole_blocks():
    qweight, scales, qzeros, _ = make_layer(16, 96, 4, 32, sym=True)
    g_idx = torch.tensor([0] * 20 + [1] * 40 + [2] * 36, dtype=torch.int32)[torch.randperm(96)]
    p = prepare(qweight, scales, qzeros, g_idx, 4)
    assert p.group_size == 64 and p.perm.numel() == 192 and p.zero == 8
    ref = dequantize_gptq(qweight, scales, qzeros, g_idx, 4)
    x = torch.randn(3, 96, dtype=torch.float64)
    xk = torch.nn.functional.pad(x, (0, 1))[:, p.perm]
    assert torch.allclose(xk @ dequantize_prepared(p).double(), x @ ref.double(), atol=1e-9)


def test_kernels_are_called_directly_only_in_eager_code_without_autograd():
    """Eager calls skip the custom op's dispatch (host time); torch.compile must still see the
    op, and so must autograd (the op then says it has no backward, instead of a silent None)."""
    from gptq_lab.kernels.ops import direct_call
    x = torch.randn(2, 8)
    assert direct_call(x)
    leaf = x.clone().requires_grad_()
    assert not direct_call(leaf)
    with torch.no_grad():
        assert direct_call(leaf)
    seen = torch.compile(lambda t: t + float(direct_call(t)), backend="eager", fullgraph=True)(x)
    assert torch.equal(seen, x)                    # traced: direct_call was False


def test_run_op_calls_the_implementation_eagerly_and_the_op_when_compiled():
    from gptq_lab.kernels.ops import run_op
    called = []

    def impl(t, k):
        called.append("impl")
        return t + k

    x = torch.randn(3)
    assert torch.equal(run_op(torch.ops.aten.add.Tensor, impl, x, 1.0), x + 1)
    assert called == ["impl"]
    compiled = torch.compile(lambda t: run_op(torch.ops.aten.sub.Tensor, impl, t, 1.0),
                             backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), x - 1) and called == ["impl"]      # the op, not impl


def test_unsupported_bits_say_what_to_do():
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        prepare(*make_layer(32, 64, 3, 32, sym=True), 3)


# ------------------------------------------------------------------ CPU: Triton interpreter

def patch_interpreter() -> None:
    """Work around two bugs of Triton's CPU interpreter (3.6): int() on 1-element arrays, which
    numpy >= 2.4 rejects, and tl.dot on bf16 operands, which multiplies their raw bits.
    (*A third is not worked around: bf16 arithmetic on a dequantized tile overflows there, so
    the bf16 deq_first paths are tested on the GPU only.)"""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    original_patch = interpreter._patch_lang_tensor
    original_dot = interpreter.InterpreterBuilder.create_dot

    def patch_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def as_f32(h):
        if h.dtype != tl.bfloat16:
            return h
        as_float = (h.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(as_float, tl.float32)

    def create_dot(self, a, b, d, *args):
        return original_dot(self, as_f32(a), as_f32(b), d, *args)

    interpreter._patch_lang_tensor = patch_tensor
    interpreter.InterpreterBuilder.create_dot = create_dot


def interpreter_cases():
    """(n, k, bits, group_size, sym, act_order, dtype, config): every kernel path, small."""
    from gptq_lab.kernels.triton_gemm import KernelConfig as C
    h, b = torch.float16, torch.bfloat16
    return [
        (72, 96, 4, 32, True, False, h, C("gemv", block_n=64, block_k=32, num_stages=1)),
        (72, 96, 4, 32, False, True, h, C("gemv", block_n=64, block_k=32, split_k=2, num_stages=2)),
        (72, 96, 4, 32, False, False, h, C("gemv", block_n=64, block_k=32, num_stages=3)),
        (72, 160, 8, -1, False, False, h, C("gemv", block_n=32, block_k=64)),
        (80, 160, 2, 64, False, False, b, C("gemv", block_n=32, block_k=64)),
        (72, 96, 4, 32, False, True, h, C("gemm", block_n=64, block_k=32, split_k=2)),
        (72, 160, 4, -1, True, False, h, C("gemm", block_n=64, block_k=64, deq_first=True)),
        (72, 128, 8, 64, False, False, h, C("gemm", block_n=32, block_k=64)),
        (72, 128, 4, 64, False, False, b, C("gemm", block_n=32, block_k=64)),
        (80, 128, 2, 64, True, False, h, C("gemm", block_n=32, block_k=64, deq_first=True)),
        (72, 96, 4, 32, False, True, h, C("gemm", block_n=64, block_k=32, swap=False)),
        (72, 128, 8, -1, True, False, h, C("gemm", block_n=32, block_k=64, swap=False,
                                           deq_first=True, split_k=2)),
        (72, 160, 4, -1, False, False, h, C("gemm", block_n=32, block_k=64, swap=False)),  # K % 64
    ]


def run_interpreter_cases() -> list[str]:
    """Run interpreter_cases() (TRITON_INTERPRET=1 must be set); return the failures."""
    patch_interpreter()
    from gptq_lab.kernels.triton_gemm import matmul
    failures = []
    for n, k, bits, gs, sym, act, dtype, cfg in interpreter_cases():
        layer = make_layer(n, k, bits, gs, sym, act, seed=n + k + bits)
        p, w = prepare(*layer, bits), dequantize_gptq(*layer, bits)
        for m in (1, 3, 19):                 # 19: a second row tile, past M clamped to row 18
            x = torch.randn(m, k).to(dtype)
            err = rel_err(matmul(x, p, cfg), x.double() @ w.double())
            if not err < TOL[dtype]:
                failures.append(f"{bits}-bit g{gs} sym={sym} act={act} {dtype} m={m} {cfg}: "
                                f"{err:.2e}")
    layer = make_layer(40, 192, 4, 64, sym=False, act_order=True)
    p, w = prepare(*layer, 4), dequantize_gptq(*layer, 4)
    for m in (1, 7, 20):                                   # config=None: the untimed heuristic
        x = torch.randn(m, 192).half()
        err = rel_err(matmul(x, p), x.double() @ w.double())
        if not err < TOL[torch.float16]:
            failures.append(f"heuristic m={m}: {err:.2e}")
    from gptq_lab.kernels.ops import dequant_mm  # prefill: dequantize once, then matmul
    x = torch.randn(5, 192).half()
    err = rel_err(dequant_mm(x, p), x.double() @ w.double())
    if not err < TOL[torch.float16]:
        failures.append(f"dequant_mm: {err:.2e}")
    return failures


def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__, "--interpreter"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------ GPU

def _poison():
    """Leave NaNs in the caching allocator's free blocks so unwritten outputs show up."""
    torch.empty(64 << 20, dtype=torch.float16, device="cuda").fill_(float("nan"))


h16, b16 = torch.float16, torch.bfloat16
GPU_CASES = [   # (N, K, bits, group_size, sym, act_order, dtype): N and K not powers of two
    (1512, 576, 4, 128, True, False, h16), (1512, 576, 4, 128, False, True, b16),
    (1000, 1320, 4, 32, False, False, h16), (1000, 1320, 4, 64, True, True, b16),
    (1000, 1320, 4, -1, False, False, h16), (4096, 4096, 4, 128, False, True, h16),
    (4096, 4096, 4, 128, True, False, b16), (1512, 576, 8, 128, False, False, h16),
    (1000, 1320, 8, -1, True, True, b16), (1512, 576, 8, 64, True, False, b16),
    (1008, 1312, 2, 64, False, True, h16), (1512, 576, 4, 32, True, True, b16),
]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n,k,bits,group_size,sym,act_order,dtype", GPU_CASES)
def test_gpu_matches_reference(n, k, bits, group_size, sym, act_order, dtype):
    from gptq_lab.kernels.triton_gemm import KernelConfig, check_config, matmul
    from gptq_lab.kernels.triton_tune import heuristic
    layer = make_layer(n, k, bits, group_size, sym, act_order, seed=n ^ k, device="cuda")
    p, w = prepare(*layer, bits), dequantize_gptq(*layer, bits).double()
    k_rows = p.perm.numel() if p.perm is not None else k
    bk = 32 if group_size == 32 else 64
    for m in (1, 5, 33, 130):
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = x.double() @ w
        configs = [heuristic(m, p, k_rows, 132), KernelConfig("dequant"),
                   KernelConfig("gemv", block_n=128, block_k=bk, split_k=3, num_stages=1),
                   KernelConfig("gemv", block_n=256, block_k=bk, num_stages=3),
                   KernelConfig("gemv", block_n=128, block_k=bk, split_k=2, num_stages=2),
                   KernelConfig("gemm", block_m=16, block_n=64, block_k=64, split_k=2),
                   KernelConfig("gemm", block_m=64, block_n=128, block_k=bk, deq_first=True),
                   KernelConfig("gemm", block_m=64, block_n=64, block_k=bk, swap=False)]
        for cfg in configs:
            if (cfg.kind == "gemv" and m > 5) or check_config(cfg, p, k_rows):
                continue
            _poison()
            err = rel_err(matmul(x, p, cfg), ref)
            assert err < TOL[dtype], f"m={m} {cfg}: relative error {err:.2e}"


@pytest.mark.gpu
@cuda
def test_gpu_tuned_selection_and_checkpoint_op():
    from gptq_lab.kernels import ops
    layer = make_layer(2048, 1536, 4, 128, sym=True, act_order=True, device="cuda")
    w = dequantize_gptq(*layer, 4).double()
    for m in (1, 16, 64):
        x = torch.randn(m, 1536, device="cuda", dtype=torch.float16)
        assert rel_err(ops.gptq_matmul(x, *layer, 4), x.double() @ w) < TOL[torch.float16]


class TinyQuantModel(torch.nn.Module):
    """Two GPTQ linears with a nonlinearity, calling the custom op like QuantLinear would."""

    def __init__(self, k: int = 256, hidden: int = 384, n: int = 200):
        super().__init__()
        self.layers = (make_layer(hidden, k, 4, 128, sym=False, act_order=True, device="cuda"),
                       make_layer(n, hidden, 4, 64, sym=True, seed=1, device="cuda"))
        self.p1, self.p2 = (prepare(*layer, 4) for layer in self.layers)

    def forward(self, x):
        from gptq_lab.kernels.ops import gptq_mm
        return gptq_mm(torch.nn.functional.silu(gptq_mm(x, self.p1)), self.p2)

    def reference(self, x):
        """The same in float64 from the checkpoint tensors (dequantize_gptq)."""
        w1, w2 = (dequantize_gptq(*layer, 4).double() for layer in self.layers)
        return torch.nn.functional.silu(x.double() @ w1) @ w2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_torch_compile_fullgraph_matches_eager(mode):
    torch.manual_seed(0)
    model = TinyQuantModel()
    x = torch.randn(2, 3, 256, device="cuda", dtype=torch.float16)
    eager = model(x)
    assert rel_err(eager, model.reference(x)) < TOL[torch.float16]
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):                                     # warm-up, record, replay
        out = compiled(x)
    assert rel_err(out, model.reference(x)) < TOL[torch.float16]
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)


if __name__ == "__main__" and sys.argv[1:] == ["--interpreter"]:
    found = run_interpreter_cases()
    print("\n".join(found) or "all interpreter cases passed")
    sys.exit(1 if found else 0)


# ------------------------------------------------------------------ offline SASS screen

def test_tuner_tiles_keep_the_wgmma_pipeline_and_the_screen_sees_serialization(monkeypatch, tmp_path):
    """benchmarks/triton_sass.py compiles for sm_90a without a GPU. The tuner's RS_PIPELINED
    tiles (weights as the wgmma register operand) never wait for all their wgmmas inside the K
    loop; the older block_k=64 tile is serialized by ptxas (warning C7515, a wait after each
    wgmma) and a swap=False tile waits once per tile, which the screen must report."""
    from pathlib import Path

    from benchmark_loader import load_benchmark
    pytest.importorskip("triton")
    from gptq_lab.kernels.triton_gemm import KernelConfig
    from gptq_lab.kernels.triton_tune import RS_PIPELINED
    screen = load_benchmark("triton_sass", monkeypatch, tmp_path)
    if not Path(screen._tool("ptxas")).exists():
        pytest.skip("this Triton ships no ptxas")
    for bm, warps in RS_PIPELINED:
        r = screen.inspect(KernelConfig("gemm", bm, 64, 128, 1, True, warps, 3, True))
        assert (r["serialized"], r["loop waits"], r["HGMMA"], r["spill bytes"]) == (False, 0, 8, 0), (bm, r)
    r = screen.inspect(KernelConfig("gemm", 128, 128, 128, 1, True, 8, 3, True))      # one chain
    assert r["serialized"] and r["loop waits"] == r["HGMMA"] == 8, r
    r = screen.inspect(KernelConfig("gemm", 128, 64, 64, 1, True, 4, 3, True))
    assert r["serialized"] and r["loop waits"] == r["HGMMA"] == 4, r
    r = screen.inspect(KernelConfig("gemm", 128, 128, 64, 1, True, 8, 3, False))   # swap=False
    assert not r["serialized"] and r["loop waits"] == 1, r
