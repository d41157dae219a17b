"""The Gluon int4 kernel (``kernels/gluon_mma.py``), a trial kernel for batches of 1-64 rows.

The Triton interpreter does not run Gluon, so on the CPU: the weight packing, the kernel's
dequantization asm (run by a small PTX emulator below), the kernel's algorithm replayed in torch
on the packed tensors against the reference, and the kernel compiled for sm_90 (its layout
conversions are asserted trivial at compile time: no shared memory, 16-byte loads). On a GPU
(marked): the kernel itself against the reference over shapes, dtypes, act-order and splits.
"""
from __future__ import annotations

import re

import pytest
import torch
from gptq_lab.kernels import gluon_mma as gm
from gptq_lab.kernels.reference import dequantize_gptq
from gptq_lab.kernels.triton_pack import permute_input, prepare
from test_triton import TOL, make_layer, rel_err

# ------------------------------------------------------------------ a PTX emulator for the asm


def _half(bits: int, bf16: bool) -> float:
    t = torch.tensor([bits], dtype=torch.int32).to(torch.int16)
    return float(t.view(torch.bfloat16 if bf16 else torch.float16))


def _bits(v: float, bf16: bool) -> int:
    return int(torch.tensor([v], dtype=torch.float64).to(torch.bfloat16 if bf16 else torch.float16)
               .view(torch.int16)) & 0xFFFF


def _pair(fn, bf16: bool, *regs: int) -> int:
    """A half2 instruction: fn on the low halves and on the high halves, each result rounded once."""
    lo = fn(*(_half(r & 0xFFFF, bf16) for r in regs))
    hi = fn(*(_half(r >> 16, bf16) for r in regs))
    return _bits(lo, bf16) | _bits(hi, bf16) << 16


def run_asm(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute the few PTX instructions the kernel's asm uses, on 32-bit unsigned values."""
    regs = dict(operands)

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else regs[tok]
    for ins in re.split(r"[;\n]", asm.replace("{", "").replace("}", "")):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            regs[d] = val(src[0])
        elif op == "shr.u32":
            regs[d] = val(src[0]) >> int(src[1])
        elif op == "lop3.b32":
            assert src[3] == "0xea"                                  # (a & b) | c
            regs[d] = (val(src[0]) & val(src[1])) | val(src[2])
        elif op in ("sub.f16x2", "sub.bf16x2"):
            regs[d] = _pair(lambda a, b: a - b, op.endswith("bf16x2"), val(src[0]), val(src[1]))
        elif op == "fma.rn.f16x2":
            regs[d] = _pair(lambda a, b, c: a * b + c, False, val(src[0]), val(src[1]), val(src[2]))
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return regs


@pytest.mark.parametrize("bf16", [False, True])
def test_dequantization_asm_gives_code_minus_zero_in_nibble_order(bf16):
    gen = torch.Generator().manual_seed(1)
    asm = (gm.ASM_BF16 if bf16 else gm.ASM_F16).value
    magic = 128.0 if bf16 else 1024.0
    for _ in range(64):
        word = int(torch.randint(0, 2**32, (1,), generator=gen, dtype=torch.int64))
        z = int(torch.randint(0, 16, (1,), generator=gen))
        zz, zn = _bits(magic + z, bf16), _bits(-(magic / 16 + z), bf16)
        ops = {f"${i}": word for i in range(4, 12)}
        ops |= {f"${i}": zz | zz << 16 for i in range(12, 16)}
        ops |= {f"${i}": zn | zn << 16 for i in range(16, 20)}
        out = run_asm(asm, ops)
        got = [_half(out[f"${i // 2}"] >> 16 * (i % 2) & 0xFFFF, bf16) for i in range(8)]
        want = [((word >> 4 * gm.NIBBLE[j]) & 15) - z for j in range(8)]
        assert got == want, f"word {word:#010x}, zero {z}"


# ------------------------------------------------------------------ CPU: the packing


def test_tile_order_is_undone_by_the_kernels_reshape_and_permute():
    words = torch.randint(-2**31, 2**31 - 1, (2 * gm.BN, 3 * gm.BK // 8), dtype=torch.int32)
    tiles = gm.words_to_tiles(words)
    assert tiles.shape == (2, 3, gm.NW * 32 * gm.R)
    for i in range(2):
        for j in range(3):
            raw = tiles[i, j].reshape(gm.NW, 32, gm.R)
            want = words[i * gm.BN:(i + 1) * gm.BN, j * gm.BK // 8:(j + 1) * gm.BK // 8]
            assert torch.equal(gm.tile_words_torch(raw), want)


def test_torch_tile_order_is_the_one_the_layouts_imply():
    """The kernel loads word (warp, lane, register) of a tile and its layouts say which (n, w)
    that thread and register hold (checked trivial when compiling); tile_words_torch must agree."""
    regs, lanes, warps = gm.word_bases(gm.NW, gm.BK)
    raw = torch.arange(gm.NW * 32 * gm.R, dtype=torch.int32).reshape(gm.NW, 32, gm.R)
    view = gm.tile_words_torch(raw)
    for warp in range(gm.NW):
        for lane in range(32):
            for reg in range(gm.R):
                n = w = 0
                for bits, bases in ((reg, regs), (lane, lanes), (warp, warps)):
                    for i, (dn, dw) in enumerate(bases):
                        if bits >> i & 1:
                            n, w = n ^ dn, w ^ dw
                assert view[n, w] == raw[warp, lane, reg]


def replay(x: torch.Tensor, g: gm.PreparedGluon) -> torch.Tensor:
    """The kernel's algorithm in torch, tile by tile, on the packed tensors (float64)."""
    p = g.base
    xk = permute_input(x, p).double()
    m, k_rows = xk.shape
    n_tiles = g.qweight.shape[0]
    out = torch.zeros(m, n_tiles * gm.BN, dtype=torch.float64)
    for i in range(n_tiles):
        rows = slice(i * gm.BN, (i + 1) * gm.BN)
        for t in range(-(-k_rows // gm.BK)):
            q = gm.tile_words_torch(g.qweight[i, t].reshape(gm.NW, 32, gm.R)).to(torch.int64)
            codes = torch.stack([(q >> 4 * gm.NIBBLE[j]) & 15 for j in range(8)], dim=2)
            codes = codes.reshape(gm.BN, gm.BK)                                # k = 8w + j
            grp = t * gm.BK // p.group_size
            z = p.zeros[grp, rows].double() if p.zero < 0 else torch.full((gm.BN,), float(p.zero))
            xt = torch.nn.functional.pad(xk[:, t * gm.BK:(t + 1) * gm.BK],
                                         (0, max(0, (t + 1) * gm.BK - k_rows)))
            part = (codes.double() - z[:, None]) @ xt.t()                       # [BN, M]
            out[:, rows] += (part * p.scales[grp, rows].double()[:, None]).t()
    return out[:, :p.out_features]


@pytest.mark.parametrize("n,k,group_size,sym,act_order", [
    (200, 384, 128, True, False), (72, 640, 128, False, True), (136, 328, -1, False, False),
    (64, 512, 256, True, True)])
def test_packed_layer_replayed_in_torch_matches_the_reference(n, k, group_size, sym, act_order):
    layer = make_layer(n, k, 4, group_size, sym, act_order, seed=n + k)
    p = prepare(*layer, 4)
    g = gm.prepare(p)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(2))
    ref = x.double() @ dequantize_gptq(*layer, 4).double()
    assert rel_err(replay(x, g), ref) < 1e-12


def test_prepare_refuses_what_the_kernel_cannot_read():
    with pytest.raises(ValueError, match="4-bit"):
        gm.prepare(prepare(*make_layer(64, 256, 8, 128, True), 8))
    with pytest.raises(ValueError, match="multiple of 128"):
        gm.prepare(prepare(*make_layer(64, 256, 4, 64, True), 4))
    g = gm.prepare(prepare(*make_layer(64, 256, 4, 128, True), 4))
    with pytest.raises(ValueError, match="1 to 64 rows"):
        gm.matmul(torch.randn(65, 256).half(), g)
    with pytest.raises(ValueError, match="CUDA GPU"):
        gm.matmul(torch.randn(3, 256).half(), g)


# ------------------------------------------------------------------ CPU: compiled for sm_90

@pytest.mark.parametrize("zero,bf16,bm,atomic,group_tiles,even_k", [
    (8, False, 16, False, 1, True), (-1, True, 64, True, 2, False), (-1, False, 32, True, 0, True),
    (8, True, 8, False, 1, False)])
def test_compiles_for_sm90_with_fragments_loaded_straight_from_memory(zero, bf16, bm, atomic,
                                                                      group_tiles, even_k):
    compiled = gm.compile_sm90(bm, bf16, zero, atomic, group_tiles, even_k)   # asserts pass
    ptx = compiled.asm["ptx"]
    assert compiled.metadata.shared == 0
    assert "ld.shared" not in ptx and "st.shared" not in ptx and "bar.sync" not in ptx
    # per K tile a warp runs (BK / 16) x (BM / 8) MMAs; the loop body appears once in the PTX
    assert ptx.count("mma.sync.aligned.m16n8k16") == (gm.BK // 16) * (bm // 8)
    # weights: two 16-byte vectors per thread per tile (this one and the next), x: BK * BM / 256
    assert ptx.count("ld.global.v4.b32") >= 2 + gm.BK * bm // 256


# ------------------------------------------------------------------ GPU

h16, b16 = torch.float16, torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k,group_size,sym,act_order,dtype", [
    (1512, 576, 128, True, False, h16), (1512, 576, 128, False, True, b16),
    (1000, 1320, -1, False, False, h16), (4096, 4096, 128, False, True, h16),
    (1000, 1320, 128, True, False, b16),
    (4096, 4096, 128, True, False, b16), (200, 1024, 256, False, False, h16)])
def test_gpu_matches_reference(n, k, group_size, sym, act_order, dtype):
    assert gm.unavailable() is None, gm.unavailable()
    layer = make_layer(n, k, 4, group_size, sym, act_order, seed=n ^ k, device="cuda")
    g = gm.prepare(prepare(*layer, 4))
    w = dequantize_gptq(*layer, 4).double()
    for m in (1, 5, 8, 16, 33, 64):
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = x.double() @ w
        for split in (1, 3):
            torch.empty(64 << 20, dtype=torch.float16, device="cuda").fill_(float("nan"))
            err = rel_err(gm.matmul(x, g, split_k=split), ref)
            assert err < TOL[dtype], f"m={m} split_k={split}: relative error {err:.2e}"


# ------------------------------------------------------------------ the benchmark's table


def test_kernel_speed_table_shows_the_gluon_column_up_to_64_rows(monkeypatch, tmp_path):
    from benchmark_loader import load_benchmark
    bench = load_benchmark("kernel_speed", monkeypatch, tmp_path)
    rows = []
    for m, gluon in ((1, 10.0), (16, 20.0), (32, "error"), (64, 40.0), (256, None)):
        r = {"shape": "8192x8192", "K": 8192, "N": 8192, "M": m, "timing": "rotate",
             "fp16_us": 50.0, "fp16_bytes": 134e6, "int4pack_us": 80.0, "int4pack_bytes": 34e6,
             "ours_us": 30.0, "ours_bytes": 34e6, "ours_eager_us": 35.0, "ours_host_us": 20.0}
        if gluon == "error":
            r["gluon_error"] = "CompilationError: at 1:2"
        elif gluon:
            r |= {"gluon_us": gluon, "gluon_bytes": 34e6}
        rows.append(r)
    text = bench.table(rows, "NVIDIA H100 80GB HBM3", 3352.0, 3000.0)
    assert "| gluon us | gluon GB/s | gluon %BW | gluon speedup |" in text.splitlines()[3]
    row256 = next(line for line in text.splitlines() if line.startswith("| 8192x8192 | 256 |"))
    assert "| - | - | - | - |" in row256 and text.count("| - | - | - | - |") == 2
    assert "Gluon kernel failures:\n- 8192x8192 M=32: CompilationError: at 1:2" in text
    gluon = text[text.index("Gluon kernel"):]
    assert "batch 1 8192x8192: 5.00x fp16" in gluon and "batch 16: min 2.50x" in gluon
    assert "batch 64: min 1.25x" in gluon
