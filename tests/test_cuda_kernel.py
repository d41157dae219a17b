"""The CUDA decode kernel (kernels/cuda/) against the torch reference.

CPU: the repacking (pure torch: the packed layout read back the way the kernel reads it gives
the reference weight), and the sources compile with nvcc for sm_80 and sm_90 with no register
spills. GPU (marked ``gpu``): a sweep of shapes, batch 1 to 64, group sizes, act-order,
sym/asym and both dtypes; the dispatcher's choice; torch.compile.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from gptq_lab.kernels import cuda_ops, gptq_matmul
from gptq_lab.kernels.cuda_pack import dequantize_prepared, kernel_input, prepare, supports
from gptq_lab.kernels.reference import dequantize_gptq
from test_triton import TOL, cuda, make_layer, rel_err

CUDA_SOURCES = [s for s in cuda_ops.SOURCES if s.suffix == ".cu"]


def nvcc(tmp_path, *flags: str) -> str:
    """Compile each .cu source with ``flags``; the compiler's output (ptxas -v included)."""
    log = ""
    for src in CUDA_SOURCES:
        cmd = ["nvcc", "-c", "-O3", "-std=c++17", *flags, "-Xptxas", "-v", str(src),
               "-o", str(tmp_path / (src.stem + ".o"))]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        log += run.stdout + run.stderr
    return log


def spills(log: str) -> list[int]:
    """Spill-store bytes of every kernel ptxas compiled, from ``nvcc``'s log."""
    return [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]


# ------------------------------------------------------------------ CPU: repacking

@pytest.mark.parametrize("n,k,group_size,sym,act_order,dtype", [
    (48, 256, 128, True, False, torch.float16),
    (24, 320, 64, False, True, torch.float16),       # N not a multiple of 16, act-order
    (40, 200, -1, False, False, torch.bfloat16),      # per-channel, K padded to 64
    (16, 384, 128, False, True, torch.bfloat16),
])
def test_packed_layout_reads_back_as_the_reference(n, k, group_size, sym, act_order, dtype):
    layer = make_layer(n, k, 4, group_size, sym=sym, act_order=act_order)
    p = prepare(*layer, 4, dtype)
    ref = dequantize_gptq(*layer, 4)                                          # [K, N] fp32
    rows = p.perm if p.perm is not None else torch.arange(k)
    got = dequantize_prepared(p)
    ref_rows = torch.nn.functional.pad(ref, (0, 0, 0, 1))[rows]               # zero column K
    # the kernel's arithmetic: (code - zero) exact, times the scale rounded to the dtype
    assert torch.allclose(got, ref_rows, rtol=TOL[dtype], atol=1e-6)
    x = torch.randn(3, k)
    assert rel_err(kernel_input(x, p)[:, :p.k_rows] @ got, x @ ref) < TOL[dtype]


def test_every_code_reaches_its_own_position():
    """Distinct codes per (k, n): a wrong nibble/lane mapping cannot cancel out."""
    from gptq_lab.quant import pack_qweight, pack_qzeros
    n, k = 32, 128
    codes = (torch.arange(n * k).reshape(n, k) * 7 + torch.arange(n)[:, None]) % 16
    scales = (torch.arange(n, dtype=torch.float32) / 64 + 0.5)[None, :].half()
    layer = (pack_qweight(codes, 4), scales, pack_qzeros(torch.zeros(n, 1, dtype=torch.long), 4,
             v1=False), torch.zeros(k, dtype=torch.int32))
    p = prepare(*layer, 4, torch.float16)
    assert torch.equal(dequantize_prepared(p), dequantize_gptq(*layer, 4))


def test_unsupported_layers_are_refused_with_the_reason():
    layer = make_layer(16, 128, 4, 32, sym=True)
    assert "multiple of 64" in supports(4, layer[3], layer[1].shape[0])
    with pytest.raises(ValueError, match="multiple of 64"):
        prepare(*layer, 4)
    assert "4-bit only" in supports(8, layer[3], 4)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_sources_compile_for_sm80_and_sm90_without_spills(tmp_path):
    log = nvcc(tmp_path, *cuda_ops.ARCH_FLAGS)
    for arch in ("sm_80", "sm_90"):
        assert f"for '{arch}'" in log
    counts = spills(log)
    assert len(counts) == 36 and max(counts) == 0, log     # 2 archs x 2 dtypes x (8 kernels + dequant)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("store", [0])
def test_dequant_store_variants_compile(tmp_path, store):
    """The timing variants of the dequantization's stores (benchmarks/prefill_matmul.py)."""
    log = nvcc(tmp_path, "-gencode=arch=compute_90,code=sm_90", f"-DGPTQ_LAB_DEQUANT_STORE={store}")
    counts = spills(log)
    assert len(counts) == 18 and max(counts) == 0


def test_process_wide_defines_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("GPTQ_LAB_CUDA_DEFINES", "GPTQ_LAB_B1_MINBLOCKS=3, GPTQ_LAB_STAGES=6")
    assert cuda_ops.env_defines() == ("GPTQ_LAB_B1_MINBLOCKS=3", "GPTQ_LAB_STAGES=6")
    monkeypatch.setenv("GPTQ_LAB_CUDA_DEFINES", "")
    assert cuda_ops.env_defines() == ()
    for bad in ("STAGES=6", "GPTQ_LAB_STAGES", "GPTQ_LAB_X=1;rm"):
        monkeypatch.setenv("GPTQ_LAB_CUDA_DEFINES", bad)
        with pytest.raises(ValueError, match="GPTQ_LAB_CUDA_DEFINES"):
            cuda_ops.env_defines()


def test_variant_names_become_compiler_defines(monkeypatch, tmp_path):
    """benchmarks/cuda_variants.py: "S", "S/A", then "+NAME=VALUE" defines; anything else is refused."""
    from test_decode import load_benchmark
    variants = load_benchmark("cuda_variants", monkeypatch, tmp_path)
    assert variants.defines("4") == ("GPTQ_LAB_STAGES=4",)
    assert variants.defines("6/3+GPTQ_LAB_B1_MINBLOCKS=3") == (
        "GPTQ_LAB_STAGES=6", "GPTQ_LAB_ABLATE=3", "GPTQ_LAB_B1_MINBLOCKS=3")
    for bad in ("", "x", "4/a", "4+GPTQ_LAB_XS"):
        with pytest.raises(ValueError, match="expected S, S/A"):
            variants.defines(bad)


# ------------------------------------------------------------------ GPU

@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,group_size,sym,act_order", [
    (4096, 4096, 128, True, False), (11008, 4096, 128, False, False),
    (4096, 11008, 128, True, True), (200, 320, 64, False, False), (1000, 576, -1, True, False),
    (520, 384, 128, False, True)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 33, 64])
def test_gpu_matches_reference(n, k, group_size, sym, act_order, dtype, m):
    layer = make_layer(n, k, 4, group_size, sym=sym, act_order=act_order, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = x.double() @ dequantize_gptq(*layer, 4).double()
    y = gptq_matmul(x, *layer, 4, backend="cuda")
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < TOL[dtype]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(8192, 8192), (28672, 8192), (4096, 14336), (8192, 28672)])
def test_gpu_batch1_large_k_matches_reference(n, k):
    """Batch 1 where x in shared memory (XS) just fits (K = 8192) or fits at lower occupancy
    (K = 14336), where the grid is several waves (N = 28672: no XS) and where x does not fit
    (K = 28672)."""
    layer = make_layer(n, k, 4, 128, sym=True, device="cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ dequantize_gptq(*layer, 4).double()
    assert rel_err(gptq_matmul(x, *layer, 4, backend="cuda"), ref) < TOL[torch.float16]


@cuda
@pytest.mark.gpu
def test_gpu_dispatch_picks_cuda_for_decode_batches():
    assert cuda_ops.unavailable() is None, cuda_ops.unavailable()
    layer = make_layer(256, 512, 4, 128, sym=True, device="cuda")
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)      # 2 <= M <= 16
    cuda_ops._PREPARED.clear()
    y = gptq_matmul(x, *layer, 4)
    assert any(v[1] is not None for v in cuda_ops._PREPARED.values())
    assert torch.allclose(y, gptq_matmul(x, *layer, 4, backend="reference"), rtol=3e-3, atol=3e-2)


@cuda
@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_matches_eager():
    layer = make_layer(512, 1024, 4, 128, sym=False, device="cuda")
    p = prepare(*layer, 4, torch.float16)
    x = torch.randn(2, 1024, device="cuda", dtype=torch.float16)
    eager = cuda_ops.cuda_mm(x, p)
    compiled = torch.compile(lambda t: cuda_ops.cuda_mm(t, p), fullgraph=True)(x)
    assert torch.equal(eager, compiled)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,group_size,sym,act_order", [
    (4096, 4096, 128, True, False), (200, 320, 64, False, False), (1000, 576, -1, True, False),
    (520, 384, 128, False, True)])
def test_gpu_dequant_equals_the_layout_read_back(n, k, group_size, sym, act_order, dtype):
    layer = make_layer(n, k, 4, group_size, sym=sym, act_order=act_order, device="cuda")
    p = prepare(*layer, 4, dtype)
    k_rows = p.qweight.shape[0] * 64
    w = torch.ops.gptq_lab.cuda_int4_dequant(p.qweight, p.meta, p.group_size, n, k_rows, dtype)
    expected = torch.nn.functional.pad(dequantize_prepared(p), (0, 0, 0, k_rows - p.k_rows))
    assert torch.equal(w, expected.t().to(dtype))             # one rounding of scale * (q - z)
    x = torch.randn(300, k, device="cuda", dtype=dtype)
    ref = x.double() @ dequantize_gptq(*layer, 4).double()
    assert rel_err(cuda_ops.dequant_mm(x, p), ref) < TOL[dtype]
    compiled = torch.compile(lambda t: cuda_ops.dequant_mm(t, p), fullgraph=True)(x)
    assert torch.equal(compiled, cuda_ops.dequant_mm(x, p))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_gpu_dependent_launch_reads_the_previous_kernels_output(graph):
    """On sm_90 the kernel starts before the kernel that writes its x has finished (programmatic
    dependent launch) and must wait for it: each x is written by the kernel right before."""
    layer = make_layer(4096, 4096, 4, 128, sym=False, device="cuda")
    p = prepare(*layer, 4, torch.float16)
    base = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    scales = [float(i + 1) for i in range(8)]
    expected = [cuda_ops.cuda_mm(base * s, p) for s in scales]
    torch.cuda.synchronize()

    def run():
        return [cuda_ops.cuda_mm(base * s, p) for s in scales]   # producer, then the kernel

    if graph:
        run()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = run()
        for _ in range(3):
            g.replay()
    else:
        outs = run()
    torch.cuda.synchronize()
    for s, y, e in zip(scales, outs, expected):
        assert torch.equal(y, e), f"x scaled by {s}"


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("nt", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 5, 16, 40])
@pytest.mark.parametrize("n,k,group_size", [(200, 320, 64), (4096, 1024, 128)])
def test_gpu_every_tiles_per_block_matches_reference(n, k, group_size, m, nt):
    """Forced tiles per block (the launcher picks by shape), a short last tile group included."""
    layer = make_layer(n, k, 4, group_size, sym=False, device="cuda")
    p = prepare(*layer, 4, torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ dequantize_gptq(*layer, 4).double()
    for warps in (0, 1, 8):
        y = cuda_ops._build().int4_decode(kernel_input(x, p), p.qweight, p.meta, p.group_size, n, warps, nt)
        assert rel_err(y, ref) < TOL[torch.float16], f"warps={warps}"
