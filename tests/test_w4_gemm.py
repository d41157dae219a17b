"""The CUTLASS W4A16 GEMM (kernels/w4_ops.py, kernels/cuda/w4_gemm*) against the torch reference.

CPU: the GEMM's operands (the CUDA decode layout read as CUTLASS reads it, permuted x, dtype
scales and zeros) multiply as the reference; the layout formula against CUTLASS's own (a host
program built with nvcc, where nvcc and the CUTLASS headers are present); one configuration
compiles for sm_90a with no spills and no serialized wgmma; the Triton kernels that make the
scales and zeros (``w4_scales``) and the permuted x (``w4_input``) per call, under
TRITON_INTERPRET=1, equal the torch versions.
GPU (marked ``gpu``, Hopper only): a sweep of shapes, batch sizes, group sizes, act-order,
sym/asym and both dtypes, every built configuration, and torch.compile.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from gptq_lab.kernels import w4_ops
from gptq_lab.kernels.cuda_pack import CHUNK, _chunk_order, _pack_codes, prepare
from gptq_lab.kernels.reference import dequantize_gptq
from gptq_lab.kernels.w4_pack import dequantize_for_gemm, gemm_columns, gemm_input
from test_triton import TOL, make_layer, rel_err


def _cutlass_or_skip() -> list[str]:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    try:
        return w4_ops.cutlass_include_dirs()
    except RuntimeError as e:
        pytest.skip(str(e))


def _nvcc(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run(["nvcc", "-std=c++17", "--expt-relaxed-constexpr", *args],
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


# ------------------------------------------------------------------ CPU: layout

@pytest.mark.parametrize("n,k,group_size,sym,act_order,dtype", [
    (32, 256, 128, True, False, torch.float16),
    (48, 320, 64, False, True, torch.float16),       # act-order, K' padded
    (16, 200, -1, False, False, torch.bfloat16),     # per-channel, K padded to 256
    (64, 384, 128, True, True, torch.bfloat16),
])
def test_gemm_operands_multiply_as_the_reference(n, k, group_size, sym, act_order, dtype):
    """The GEMM's x (permuted columns) times its W (decode layout, dtype scales and zeros)
    equals x @ the reference weight."""
    layer = make_layer(n, k, 4, group_size, sym=sym, act_order=act_order)
    p = prepare(*layer, 4, dtype)
    x = torch.randn(3, k)
    got = gemm_input(x, p) @ dequantize_for_gemm(p)[:, :n]
    assert rel_err(got, x @ dequantize_gptq(*layer, 4)) < TOL[dtype]


@pytest.mark.parametrize("k,act_order", [(256, False), (200, False), (320, True)])
def test_gemm_input_is_x_gathered_by_gemm_columns(k, act_order):
    """The permuting copy (no act-order) and the gather both put x's columns in gemm_columns order."""
    p = prepare(*make_layer(32, k, 4, 64 if act_order else -1, sym=True, act_order=act_order), 4,
                torch.float16)
    x = torch.randn(5, k)
    want = torch.nn.functional.pad(x, (0, 1))[:, gemm_columns(p)]     # column k: zeros
    got = gemm_input(x, p)
    assert got.is_contiguous() and torch.equal(got, want)


def test_decode_layout_is_cutlass_layout(tmp_path):
    """CUTLASS's view of the weights (tile_to_shape(DecodeAtom, (N, K, 1)), evaluated by a host
    program compiled against the GEMM's header) finds code (n, GEMM column c) where cuda_pack
    put the code of kernel row gemm-order(c)."""
    include = _cutlass_or_skip()
    n, k = 48, 192
    codes = torch.randint(0, 16, (n, k))
    words = _pack_codes(codes).reshape(-1).to(torch.int64) & 0xFFFFFFFF
    nibbles = ((words[:, None] >> (4 * torch.arange(8))) & 0xF).reshape(-1)        # by offset
    src = tmp_path / "layout.cu"
    src.write_text(
        '#include "w4_gemm.cuh"\n#include <cstdio>\nint main() {\n'
        f"  auto f = cute::tile_to_shape(gptq_lab_w4::DecodeAtom{{}}, cute::make_shape({n}, {k}, 1));\n"
        f"  for (int i = 0; i < {n}; ++i) for (int j = 0; j < {k}; ++j)\n"
        '    std::printf("%d\\n", int(f(i, j, 0)));\n}\n')
    exe = tmp_path / "layout"
    _nvcc("-O0", "-gencode=arch=compute_90a,code=sm_90a", *(f"-I{d}" for d in include),
          f"-I{w4_ops.CUDA_DIR}", str(src), "-o", str(exe))
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout
    offsets = torch.tensor([int(v) for v in out.split()]).reshape(n, k)
    assert torch.equal(offsets.reshape(-1).sort().values, torch.arange(n * k))
    rows = (torch.arange(k // CHUNK)[:, None] * CHUNK + _chunk_order().reshape(-1)).reshape(-1)
    assert torch.equal(nibbles[offsets], codes[:, rows])


@pytest.mark.parametrize("config", ["f16_128_sk", "bf16_256"])
def test_configurations_compile_without_spills(tmp_path, config):
    """Every configuration is the same template; the stream-K fp16 one and the widest bf16 tile
    (most registers) must compile for sm_90a with no spills and with wgmma not serialized
    (ptxas warns C7510 when, e.g., device asserts put a call into the main loop: NDEBUG is
    needed)."""
    include = _cutlass_or_skip()
    src = w4_ops.CUDA_DIR / f"w4_gemm_{config}.cu"
    run = _nvcc("-c", *w4_ops.NVCC_FLAGS, *(f"-I{d}" for d in include), "-Xptxas", "-v",
                str(src), "-o", str(tmp_path / "w4.o"))
    log = run.stdout + run.stderr
    assert "C7510" not in log, log[-2000:]
    assert re.search(r"Used \d+ registers", log)
    assert all(int(s) == 0 for s in re.findall(r"(\d+) bytes spill stores", log))


SCALES_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_triton import make_layer
from gptq_lab.kernels import cuda_pack, w4_pack, w4_scales
for dtype in (torch.float16, torch.bfloat16):
    for n, k, gs, sym, act in ((272, 576, 64, False, True), (48, 256, 128, True, False),
                               (32, 192, -1, False, False)):
        p = cuda_pack.prepare(*make_layer(n, k, 4, gs, sym=sym, act_order=act), 4, dtype)
        want, got = w4_pack.gemm_scales(p), w4_scales.gemm_scales(p.meta, dtype)
        assert all(g.dtype == dtype and torch.equal(w, g) for w, g in zip(want, got)), (dtype, n, k)
print("ok")
"""


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_scales_kernel_compiles_for_sm90(dtype):
    """Triton's front end and PTX code generation, no GPU needed (the interpreter skips both)."""
    pytest.importorskip("triton")
    from gptq_lab.kernels.w4_scales import BLOCK, _scales_kernel
    signature = {"meta_ptr": "*i32", "scales_ptr": f"*{dtype}", "zeros_ptr": f"*{dtype}",
                 "records": "i32", "magic": "fp32", "g8_factor": "fp32"}
    assert ".entry _scales_kernel" in _sm90_ptx(_scales_kernel, signature,
                                                {"BF16": dtype == "bf16", "BLOCK": BLOCK})


def _sm90_ptx(kernel, signature: dict, constexprs: dict, aligned: tuple[str, ...] = ()) -> str:
    """PTX of a Triton kernel compiled for sm_90 (``signature`` without the constexprs;
    ``aligned``: the arguments a launch would find divisible by 16)."""
    from gptq_lab.kernels.sm90 import compile_for_sm90
    return compile_for_sm90(kernel, signature, constexprs, aligned).asm["ptx"]


INPUT_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_triton import make_layer
from gptq_lab.kernels import cuda_pack, w4_input, w4_pack
for n, k, gs, act, m in ((32, 256, -1, False, 5), (32, 200, -1, False, 37), (48, 320, 64, True, 33),
                         (16, 576, 128, True, 2)):
    p = cuda_pack.prepare(*make_layer(n, k, 4, gs, sym=True, act_order=act), 4, torch.float16)
    x = torch.randn(m, k + 24).half()[:, 3:k + 3]                     # rows strided, not contiguous
    want, got = w4_pack.gemm_input(x, p), w4_input.gemm_input(x, p)
    assert got.is_contiguous() and torch.equal(want, got), (n, k, act, m)
print("ok")
"""


@pytest.mark.parametrize("check", [SCALES_CHECK, INPUT_CHECK], ids=["scales", "input"])
def test_per_call_kernels_under_the_triton_interpreter(check):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", check, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("has_perm", [False, True])
def test_input_kernel_compiles_for_sm90(has_perm):
    """Without act-order, aligned rows of x are read and written as 16-byte vectors (the first
    version gathered 2-byte elements: 3x slower than the memory bandwidth on an H100)."""
    pytest.importorskip("triton")
    from gptq_lab.kernels.w4_input import BLOCK_C, BLOCK_M, _input_kernel
    signature = {"x_ptr": "*fp16", "perm_ptr": "*i64", "out_ptr": "*fp16", "m": "i32", "k": "i32",
                 "kp": "i32", "n_perm": "i32", "stride_xm": "i32"}
    ptx = _sm90_ptx(_input_kernel, signature, {"HAS_PERM": has_perm, "BLOCK_M": BLOCK_M,
                    "BLOCK_C": BLOCK_C}, aligned=("x_ptr", "perm_ptr", "out_ptr", "k", "kp", "stride_xm"))
    assert ".entry _input_kernel" in ptx and "st.global.v4" in ptx
    assert ("ld.global.b16" in ptx) == has_perm and ("ld.global.v4" in ptx) != has_perm


def test_every_configuration_has_its_source_and_python_entry():
    api = (w4_ops.CUDA_DIR / "w4_gemm_api.h").read_text()
    rows = re.findall(r"^\s*X\((\w+), (\d), (\d+), (\d), (\d+), (\d)\)", api, re.MULTILINE)
    assert rows and sorted(name for name, *_ in rows) == sorted(
        s.stem.removeprefix("w4_gemm_") for s in w4_ops.SOURCES if s.suffix == ".cu")
    assert w4_ops.CONFIGS == {name: (int(d), int(t), sk == "1", int(k), int(c))
                              for name, d, t, sk, k, c in rows}
    types = {"cutlass::half_t": 0, "cutlass::bfloat16_t": 1}
    for name, (dtype, tile, stream_k, k, cluster) in w4_ops.CONFIGS.items():    # each unit's values
        source = (w4_ops.CUDA_DIR / f"w4_gemm_{name}.cu").read_text()
        args = re.search(rf"^GPTQ_LAB_W4_DEFINE\({name}, ([^)]*)\)", source, re.MULTILINE)
        assert args, name
        mma, t, sk, kb, *c = (a.strip() for a in args.group(1).split(","))
        assert (types[mma], int(t), sk == "true", int(kb), int(c[0]) if c else 1) == (
            dtype, tile, stream_k, k, cluster), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_choose_takes_the_smallest_tile_that_holds_m_then_the_large_m_configuration(dtype):
    want = 1 if dtype == torch.bfloat16 else 0
    large = w4_ops.LARGE_M[dtype]
    assert w4_ops.CONFIGS[large][0] == want and large not in w4_ops.TRIAL
    tiles = [t for n, (d, t, *_) in w4_ops.CONFIGS.items() if d == want and n not in w4_ops.TRIAL]
    for m in (1, 64, 65, 128, 129, 256, 257, 2048):
        name = w4_ops.choose(m, dtype)
        d, tile, _, k, _ = w4_ops.CONFIGS[name]
        assert d == want and name not in w4_ops.TRIAL and k == 64
        assert tile == min(t for t in tiles if t >= m) if m <= max(tiles) else name == large, (m, name)
    assert [w4_ops.choose(m, torch.float16) for m in (64, 128, 256, 2048)] == [
        "f16_64_sk", "f16_128_sk", "f16_256", "f16_256_c2"]
    with pytest.raises(ValueError):
        w4_ops.choose(64, torch.float32)


# ------------------------------------------------------------------ GPU (Hopper)

hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="needs a Hopper (sm_90) GPU")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("n,k,group_size,sym,act_order,dtype", [
    (256, 512, 128, True, False, torch.float16),
    (384, 1024, 128, False, False, torch.float16),
    (272, 576, 64, True, True, torch.float16),        # N not a multiple of 128, act-order
    (512, 768, -1, True, False, torch.bfloat16),       # per-channel
    (1024, 4096, 128, False, True, torch.bfloat16),
])
@pytest.mark.parametrize("m", [1, 17, 64, 200, 1000])
def test_gpu_matches_reference(n, k, group_size, sym, act_order, dtype, m):
    assert w4_ops.unavailable() is None, w4_ops.unavailable()
    layer = make_layer(n, k, 4, group_size, sym=sym, act_order=act_order, device="cuda")
    p = prepare(*layer, 4, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = x.double() @ dequantize_gptq(*layer, 4).double()
    y = w4_ops.w4_mm(x, p)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.gpu
@hopper
def test_gpu_every_configuration_matches_reference():
    assert {name: tuple(rest) for name, *rest in w4_ops._build().w4_configs()} == w4_ops.CONFIGS
    for name, (dtype_id, *_) in w4_ops.CONFIGS.items():
        dtype = torch.bfloat16 if dtype_id else torch.float16
        layer = make_layer(384, 1024, 4, 128, sym=False, device="cuda")
        p = prepare(*layer, 4, dtype)
        ref_w = dequantize_gptq(*layer, 4).double()
        for m in (8, 130, 700):
            x = torch.randn(m, 1024, device="cuda", dtype=dtype)
            assert rel_err(w4_ops.w4_mm(x, p, name), x.double() @ ref_w) < TOL[dtype], (name, m)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_scales_kernel_equals_torch(dtype):
    from gptq_lab.kernels import w4_pack, w4_scales
    p = prepare(*make_layer(1040, 1536, 4, 128, sym=False, act_order=True, device="cuda"), 4, dtype)
    want, got = w4_pack.gemm_scales(p), w4_scales.gemm_scales(p.meta, dtype)
    assert all(torch.equal(w, g) for w, g in zip(want, got))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("k,act_order,m,pad", [(4096, False, 2048, 0), (4096, False, 2048, 8),
                                               (1000, False, 33, 8), (1536, True, 300, 0)])
def test_gpu_input_kernel_equals_torch(k, act_order, m, pad):
    """pad 0: contiguous rows (16-byte vector loads); 8: strided rows (Triton's scalar loads)."""
    from gptq_lab.kernels import w4_input
    p = prepare(*make_layer(64, k, 4, 128, sym=True, act_order=act_order, device="cuda"), 4,
                torch.float16)
    x = torch.randn(m, k + pad, device="cuda", dtype=torch.float16)[:, :k]
    assert torch.equal(gemm_input(x, p), w4_input.gemm_input(x, p))


@pytest.mark.gpu
@hopper
def test_gpu_torch_compile_fullgraph_matches_eager(monkeypatch):
    from gptq_lab.kernels import cuda_ops
    monkeypatch.setenv("GPTQ_LAB_W4", "1")
    layer = make_layer(512, 1024, 4, 128, sym=True, device="cuda")
    p = prepare(*layer, 4, torch.float16)
    x = torch.randn(300, 1024, device="cuda", dtype=torch.float16)
    eager = w4_ops.w4_mm(x, p)
    compiled = torch.compile(lambda t: w4_ops.w4_mm(t, p), fullgraph=True)(x)
    assert torch.equal(eager, compiled)
    dispatched = torch.compile(lambda t: cuda_ops.matmul(t, p), fullgraph=True)(x)   # runs() traced
    assert torch.equal(eager, dispatched)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("setting,expect_w4", [("1", True), ("0", False), (None, w4_ops.DEFAULT)])
def test_gpu_cuda_decode_layers_take_the_w4_gemm_when_turned_on(monkeypatch, setting, expect_w4):
    from gptq_lab.kernels import cuda_ops
    if setting is None:
        monkeypatch.delenv("GPTQ_LAB_W4", raising=False)
    else:
        monkeypatch.setenv("GPTQ_LAB_W4", setting)
    layer = make_layer(512, 1024, 4, 128, sym=False, device="cuda")
    p = prepare(*layer, 4, torch.float16)
    called, w4_mm = [], w4_ops.w4_mm
    monkeypatch.setattr(w4_ops, "w4_mm", lambda *a, **k: called.append(1) or w4_mm(*a, **k))
    x = torch.randn(cuda_ops.MAX_SLAB_M + 72, 1024, device="cuda", dtype=torch.float16)
    y = cuda_ops.matmul(x, p)
    assert bool(called) == expect_w4
    assert rel_err(y, x.double() @ dequantize_gptq(*layer, 4).double()) < TOL[torch.float16]


def test_the_w4_setting_turns_it_on_and_off(monkeypatch):
    """GPTQ_LAB_W4=1 on, 0 off, unset w4_ops.DEFAULT; layers whose N is not a multiple of 16 never."""
    monkeypatch.setattr(w4_ops, "unavailable", lambda: None)
    p, odd = (type("P", (), {"out_features": n})() for n in (512, 520))
    for setting, expect in (("1", True), ("0", False), (None, w4_ops.DEFAULT)):
        if setting is None:
            monkeypatch.delenv("GPTQ_LAB_W4", raising=False)
        else:
            monkeypatch.setenv("GPTQ_LAB_W4", setting)
        assert w4_ops.runs(p) == expect and not w4_ops.runs(odd)
    monkeypatch.setattr(w4_ops, "unavailable", lambda: "no CUDA device")
    assert not w4_ops.runs(p)
