"""Int4 GPTQ matmul against fp16 and PyTorch's own int4 kernel, on one CUDA GPU.

    python benchmarks/kernel_speed.py --out kernels.txt          # full table (H100: ~3 min)
    python benchmarks/kernel_speed.py --shapes 8192x8192 --batches 1,16

Every timing is GPU time of CUDA-graph replays (decode runs under CUDA graphs), so Python
launch costs do not count. Two ways to keep weights out of the L2 cache (``--timing``):
``rotate`` (default): each kernel runs back to back on R copies of the layer's weights (R x
weight bytes > 3 x L2), captured in one graph, timed with CUDA events, median replay / R; like
a model's forward, where each layer's weights are cold and the L2 holds clean lines.
``flush``: one call per graph, each replay timed by ``triton.testing.do_bench`` after it
zero-fills a 256 MB buffer; the L2 is then full of dirty lines that must be written back while
the kernel runs, which costs a small kernel a large share of its time (measured so before
2026-11-27). "ours eager" times plain calls (host cost included). Columns per kernel: microseconds,
achieved GB/s (the bytes it must move: weights, scales/zeros, x and the output, once), percent
of the card's peak memory bandwidth, and speedup over fp16 ``torch.matmul``. int4pack is
``torch.ops.aten._weight_int4pack_mm`` on bf16 (its only dtype), group size 128.
Ours: int4, group 128, symmetric, fp16 activations, tuned per shape on first use.
cuda: the CUDA layout as a ``cuda_decode`` layer runs it (``cuda_ops.matmul``, same layer,
fp16), built on first use; ``--no-cuda`` leaves it out: the decode kernel up to
``cuda_ops.MAX_SLAB_M`` rows (one slab per 16 rows, slabs of a tile side by side so that the
weights come from L2 after the first), the layout's dequantization + cuBLAS above.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = ["4096x4096", "4096x11008", "11008x4096", "8192x8192", "8192x28672", "28672x8192"]
BATCHES = [1, 16, 64, 256]
PEAK_GBS = {"H100 PCIe": 2000.0, "H100": 3352.0, "H200": 4800.0, "A100": 2039.0}


def peak_bandwidth(name: str) -> float:
    return next((v for k, v in PEAK_GBS.items() if k in name), float("nan"))


def copy_bandwidth() -> float:
    """Measured device-to-device copy, GB/s counting bytes read and written."""
    from triton.testing import do_bench
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() / ms / 1e6


def gptq_layer(k: int, n: int, group: int = 128):
    """Random symmetric int4 layer in checkpoint layout (codes are any bit pattern)."""
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
    scales = (torch.rand(k // group, n, device="cuda") * 0.02 + 0.001).half()
    qzeros = torch.full((k // group, n // 8), 0x88888888 - 2**32, dtype=torch.int32, device="cuda")
    g_idx = (torch.arange(k, device="cuda") // group).int()
    return qweight, scales, qzeros, g_idx


def int4pack(k: int, n: int, group: int = 128):
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
    sz = (torch.rand(k // group, n, 2, device="cuda") * 0.02).to(torch.bfloat16)
    return packed, sz


TIMING = {"mode": "rotate"}


def bench(fn, rotate=None) -> float:
    """GPU microseconds of one call. ``rotate``: the same call on each weight copy (a list of
    callables); used in "rotate" mode, else ``fn`` alone with an L2 flush."""
    if TIMING["mode"] == "rotate" and rotate:
        return rotating_time(rotate) * 1e3
    from gptq_lab.kernels.triton_tune import gpu_time
    return gpu_time(fn, warmup=10, rep=60) * 1e3                            # microseconds


def rotating_time(fns, replays: int = 30) -> float:
    """Median milliseconds per call of ``fns`` run back to back in one CUDA graph."""
    for f in fns:
        f()                                                      # compile, tune, allocate
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    times = []
    for i in range(replays + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2] / len(fns)


def copies_for(weight_bytes: int) -> int:
    """Weight copies to rotate through: together at least 3 x the L2 size, and at least 2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return max(2, -(-3 * l2 // weight_bytes))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in ref's precision."""
    return float((y.to(ref.dtype) - ref).norm() / ref.norm())


def bench_eager(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def host_us(fn, n: int = 200) -> float:
    """Host microseconds per call when calls are issued back to back."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def run(shapes, batches, act_order: bool, with_cuda: bool = True, with_gluon: bool = False) -> list[dict]:
    rows = []
    for shape in shapes:
        k, n = map(int, shape.split("x"))
        rows += bench_shape(k, n, batches, act_order, with_cuda, with_gluon)
        torch.cuda.empty_cache()
    return rows


def bench_shape(k: int, n: int, batches, act_order: bool, with_cuda: bool = True,
                with_gluon: bool = False) -> list[dict]:
    """All batch sizes for one K x N layer (the weights live only in this call)."""
    from gptq_lab.kernels import triton_tune
    from gptq_lab.kernels.triton_gemm import matmul
    from gptq_lab.kernels.triton_pack import prepare
    w16 = torch.randn(k, n, device="cuda", dtype=torch.float16)
    layer = gptq_layer(k, n)
    p = prepare(*layer, 4)
    p_act = None
    if act_order:
        perm = torch.randperm(k, device="cuda")
        p_act = prepare(layer[0], layer[1], layer[2], layer[3][perm].contiguous(), 4)
    packed, sz = int4pack(k, n)
    p_cuda = None
    if with_cuda:
        from gptq_lab.kernels import cuda_ops, cuda_pack
        p_cuda = cuda_pack.prepare(*layer, 4, torch.float16)
    p_gluon = None
    if with_gluon:
        from gptq_lab.kernels import gluon_mma
        p_gluon = gluon_mma.prepare(p)
    rot = (_copies(k, n, w16, p, (packed, sz), p_cuda, p_gluon) if TIMING["mode"] == "rotate"
           else None)
    w_ref = _dequant_sym(layer)                                                  # [K, N] fp32
    groups, rows = k // 128, []
    for m in batches:
        x16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xbf = x16.to(torch.bfloat16)
        io = 2 * m * (k + n)
        r = {"shape": f"{k}x{n}", "K": k, "N": n, "M": m, "timing": TIMING["mode"]}
        r["fp16_us"] = bench(lambda: torch.matmul(x16, w16),                    # noqa: B023
                             rot and [lambda w=c["w16"]: torch.matmul(x16, w)  # noqa: B023
                                      for c in rot if "w16" in c])
        r["fp16_bytes"] = 2 * k * n + io
        r["int4pack_us"] = bench(
            lambda: torch.ops.aten._weight_int4pack_mm(xbf, packed, 128, sz),   # noqa: B023
            rot and [lambda w=c["int4pack"]: torch.ops.aten._weight_int4pack_mm(xbf, w[0], 128, w[1])  # noqa: B023
                     for c in rot])
        r["int4pack_bytes"] = k * n // 2 + 4 * groups * n + io
        t0 = time.time()
        y = matmul(x16, p)                                                        # tunes
        r["tune_s"] = round(time.time() - t0, 2)
        ours = lambda: matmul(x16, p)                                             # noqa: B023
        r["ours_us"] = bench(ours, rot and [lambda q=c["triton"]: matmul(x16, q) for c in rot])  # noqa: B023
        r["ours_eager_us"] = bench_eager(ours)
        r["ours_host_us"] = host_us(ours)
        r["ours_bytes"] = k * n // 2 + 2 * groups * n + io
        key = triton_tune.tuning_key(x16, p)
        r["config"] = str(triton_tune._CHOSEN.get(key))
        timings = triton_tune.TIMINGS.get(key, {})
        r["candidates"] = {str(c): round(t * 1e3, 2) for c, t in timings.items()}
        if p_act is not None:
            matmul(x16, p_act)
            r["ours_act_us"] = bench(lambda: matmul(x16, p_act))                 # noqa: B023
        ref = x16.float() @ w_ref
        r["rel_err"] = rel_err(y, ref)
        if p_cuda is not None:
            y_cuda = cuda_ops.matmul(x16, p_cuda)
            r["cuda_us"] = bench(lambda: cuda_ops.matmul(x16, p_cuda),               # noqa: B023
                                 rot and [lambda q=c["cuda"]: cuda_ops.matmul(x16, q) for c in rot])  # noqa: B023
            r["cuda_bytes"] = k * n // 2 + 4 * groups * n + io
            r["cuda_rel_err"] = rel_err(y_cuda, ref)
        if p_gluon is not None and m <= gluon_mma.MAX_M:
            try:                          # a trial kernel: a failure leaves the other columns
                r |= bench_gluon(x16, p_gluon, rot, ref)
                r["gluon_bytes"] = r["ours_bytes"]
            except Exception as e:        # noqa: BLE001 (reported in the row and the table)
                r["gluon_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        rows.append(r)
        print(_row_line(r), flush=True)
    return rows


def bench_gluon(x16, g, rot, ref) -> dict:
    """The Gluon kernel's figures for x16: its split, time, and error against ``ref``."""
    from gptq_lab.kernels import gluon_mma
    split, splits = gluon_split(x16, g)
    us = bench(lambda: gluon_mma.matmul(x16, g, split),
               rot and [lambda q=c["gluon"]: gluon_mma.matmul(x16, q, split) for c in rot])
    return {"gluon_split": split, "gluon_splits": splits, "gluon_us": us,
            "gluon_rel_err": rel_err(gluon_mma.matmul(x16, g, split), ref)}


def gluon_split(x, g) -> tuple[int, dict]:
    """The Gluon kernel's K split for x, timed (L2 flushed) over 1, 2, 4, ... while every split
    keeps at least two tiles: -> (fastest, {split: microseconds})."""
    from gptq_lab.kernels import gluon_mma
    from gptq_lab.kernels.triton_tune import gpu_time
    tiles = -(-x.shape[1] // gluon_mma.BK)
    times = {s: gpu_time(lambda s=s: gluon_mma.matmul(x, g, s)) * 1e3
             for s in (1, 2, 4, 8, 16, 32) if s == 1 or tiles // s >= 2}
    return min(times, key=times.get), {s: round(t, 2) for s, t in times.items()}


def _copies(k: int, n: int, w16, p, int4pack_pair, p_cuda, p_gluon=None) -> list[dict]:
    """The layer and R - 1 more random copies, in each kernel's layout (for "rotate" timing)."""
    from gptq_lab.kernels import cuda_pack, gluon_mma
    from gptq_lab.kernels.triton_pack import prepare
    copies = [{"w16": w16, "triton": p, "int4pack": int4pack_pair, "cuda": p_cuda,
               "gluon": p_gluon}]
    for _ in range(copies_for(k * n // 2) - 1):
        layer = gptq_layer(k, n)
        pt = prepare(*layer, 4)
        copies.append({"triton": pt, "int4pack": int4pack(k, n),
                       "cuda": p_cuda and cuda_pack.prepare(*layer, 4, torch.float16),
                       "gluon": p_gluon and gluon_mma.prepare(pt)})
    for c in copies[1:copies_for(2 * k * n)]:
        c["w16"] = torch.randn(k, n, device="cuda", dtype=torch.float16)
    return copies


def _dequant_sym(layer):
    from gptq_lab.kernels.reference import dequantize_gptq
    return dequantize_gptq(*layer, 4)


def _row_line(r):
    return (f"{r['shape']:>11} M={r['M']:<4} fp16 {r['fp16_us']:8.1f} us  "
            f"int4pack {r['int4pack_us']:8.1f} us  ours {r['ours_us']:8.1f} us  "
            f"x{r['fp16_us'] / r['ours_us']:.2f}  err {r['rel_err']:.1e}"
            + (f"  cuda {r['cuda_us']:8.1f} us x{r['fp16_us'] / r['cuda_us']:.2f} "
               f"err {r['cuda_rel_err']:.1e}" if "cuda_us" in r else "")
            + (f"  gluon {r['gluon_us']:8.1f} us x{r['fp16_us'] / r['gluon_us']:.2f} "
               f"err {r['gluon_rel_err']:.1e} split {r['gluon_split']} {r['gluon_splits']}"
               if "gluon_us" in r else "")
            + (f"  gluon FAILED {r['gluon_error']}" if "gluon_error" in r else "")
            + f"  {r['config']}")


def table(rows, card: str, peak: float, copy_gbs: float) -> str:
    how = ("weights rotated through copies > 3 x L2, back to back in one graph (median)"
           if rows and rows[0].get("timing") == "rotate" else
           "L2 flushed before each (triton do_bench, median)")
    head = (f"Card: {card}; peak {peak:.0f} GB/s (datasheet), device-to-device copy measured "
            f"{copy_gbs:.0f} GB/s. GPU time of CUDA-graph replays, {how}.\n"
            "Ours: int4 g128 sym fp16; int4pack: torch _weight_int4pack_mm bf16 g128; "
            "fp16: torch.matmul [M,K]@[K,N].\n\n")
    kernels = ("fp16", "int4pack", "ours") + (("cuda",) if all("cuda_us" in r for r in rows)
                                               else ()) + (("gluon",) if any("gluon_us" in r for r in rows)
                                                           else ())
    cols = ["K x N", "M"]
    for name in kernels:
        cols += [f"{name} us", f"{name} GB/s", f"{name} %BW", f"{name} speedup"]
    cols += ["ours eager us", "ours host us/call"]
    act = any("ours_act_us" in r for r in rows)
    if act:
        cols += ["ours act-order us"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["shape"], str(r["M"])]
        for name in kernels:
            if f"{name}_us" not in r:                 # the Gluon kernel stops at 64 rows
                cells += ["-"] * 4
                continue
            us = r[f"{name}_us"]
            gbs = r[f"{name}_bytes"] / us / 1e3
            speedup = r["fp16_us"] / us
            cells += [f"{us:.1f}", f"{gbs:.0f}", f"{100 * gbs / peak:.0f}%", f"{speedup:.2f}x"]
        cells += [f"{r['ours_eager_us']:.1f}", f"{r['ours_host_us']:.1f}"]
        if act:
            cells.append(f"{r.get('ours_act_us', float('nan')):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = head + "\n".join(lines) + "\n\nTriton (issue #6):\n" + targets(rows)
    if "cuda" in kernels:
        text += "\nCUDA decode kernel (issue #7):\n" + cuda_targets(rows, peak)
    if "gluon" in kernels:
        text += ("\nGluon kernel (trial, issue #6's targets up to 64 rows):\n"
                 + targets([r for r in rows if "gluon_us" in r], "gluon"))
    failed = [f"- {r['shape']} M={r['M']}: {r['gluon_error']}" for r in rows if "gluon_error" in r]
    if failed:
        text += "\nGluon kernel failures:\n" + "\n".join(failed) + "\n"
    return text


def targets(rows, name: str = "ours") -> str:
    """Issue #6's targets for kernel ``name`` ("ours": Triton), each with its verdict."""
    out = []
    sp = {(r["shape"], r["M"]): r["fp16_us"] / r[f"{name}_us"] for r in rows}
    vs = {(r["shape"], r["M"]): r["int4pack_us"] / r[f"{name}_us"] for r in rows}
    for shape in ("8192x8192", "8192x28672"):
        if (shape, 1) in sp:
            out.append(f"batch 1 {shape}: {sp[shape, 1]:.2f}x fp16 (target >= 3.0x)")
    for m, goal in ((16, 2.5), (64, 1.5)):
        got = [v for (s, mm), v in sp.items() if mm == m]
        if got:
            out.append(f"batch {m}: min {min(got):.2f}x / max {max(got):.2f}x fp16 over shapes "
                       f"(target >= {goal}x)")
    slow = [f"{s} M={m} ({v:.2f}x)" for (s, m), v in sp.items() if v < 1.0]
    out.append("slower than fp16: " + (", ".join(slow) if slow else "none"))
    lose = [f"{s} M={m} ({v:.2f}x)" for (s, m), v in vs.items() if v < 1.0]
    out.append("slower than int4pack: " + (", ".join(lose) if lose else "none"))
    return "\n".join("- " + line for line in out) + "\n"


def cuda_targets(rows, peak: float) -> str:
    """Issue #7's targets for the CUDA decode kernel, each with its verdict."""
    by = {(r["shape"], r["M"]): r for r in rows}
    out = []
    for shape in ("8192x8192", "8192x28672"):
        if (shape, 1) in by:
            r = by[shape, 1]
            out.append(f"batch 1 {shape}: {r['fp16_us'] / r['cuda_us']:.2f}x fp16 (target >= 3.0x)")
    for shape in ("8192x8192", "8192x28672", "28672x8192"):
        if (shape, 1) in by:
            r = by[shape, 1]
            pct = 100 * r["cuda_bytes"] / r["cuda_us"] / 1e3 / peak
            out.append(f"batch 1 {shape}: {pct:.0f}% of peak bandwidth (target >= 70%)")
    vs = [(s, r["int4pack_us"] / r["cuda_us"]) for (s, m), r in by.items() if m == 1]
    if vs:
        out.append(f"batch 1 vs int4pack: min {min(v for _, v in vs):.2f}x "
                   f"({min(vs, key=lambda t: t[1])[0]}) (target >= 1.3x)")
    grow = [(s, by[s, 16]["cuda_us"] / by[s, 1]["cuda_us"]) for (s, m) in by
            if m == 1 and (s, 16) in by]
    if grow:
        worst = max(grow, key=lambda t: t[1])
        out.append(f"batch 16 / batch 1 time: worst {worst[1]:.2f} ({worst[0]}) (target <= 1.15)")
    return "\n".join("- " + line for line in out) + "\n"


def compile_report(rows, dump_dir: str | None) -> str:
    """Registers, spills, shared memory and MMA instructions of each chosen kernel."""
    import os
    import re
    import subprocess
    import tempfile

    from gptq_lab.kernels.triton_gemm import KernelConfig, _plan
    from gptq_lab.kernels.triton_pack import prepare
    lines, seen = [], set()
    for r in rows:
        cfg_text = r["config"]
        if cfg_text in seen or "dequant" in cfg_text or cfg_text == "None":
            continue
        seen.add(cfg_text)
        cfg = eval(cfg_text, {"KernelConfig": KernelConfig})                 # our own repr
        p = prepare(*gptq_layer(r["K"], 1024), 4)
        x = torch.randn(r["M"], r["K"], device="cuda", dtype=torch.float16)
        kernel, grid, args, meta, _ = _plan(x, p, cfg)
        ck = kernel[grid](*args, **meta)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            sass = subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        ops = ("HGMMA", "HMMA", "LDL", "STL", "LDS", "STS")
        counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ops}
        lines.append(f"{cfg_text}: regs {ck.n_regs} spills {ck.n_spills} "
                     f"smem {ck.metadata.shared} {counts}")
        if dump_dir:
            name = re.sub(r"[^A-Za-z0-9]+", "_", cfg_text)[:120]
            os.makedirs(dump_dir, exist_ok=True)
            with open(os.path.join(dump_dir, name + ".ttgir"), "w") as f:
                f.write(ck.asm["ttgir"])
            with open(os.path.join(dump_dir, name + ".sass"), "w") as f:
                f.write(sass)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="KxN list, comma separated")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--act-order", action="store_true", help="also time an act-order layer")
    ap.add_argument("--out", help="write the table here (and the raw rows to OUT.json)")
    ap.add_argument("--no-cuda", action="store_true", help="leave out the CUDA decode kernel")
    ap.add_argument("--gluon", action="store_true",
                    help="add the trial Gluon kernel (kernels/gluon_mma.py) up to 64 rows, its K "
                         "split chosen by timing")
    ap.add_argument("--cuda-slab-max", type=int, default=None,
                    help="cuda column: rows up to which the decode kernel runs (default "
                         "cuda_ops.MAX_SLAB_M; dequantize + cuBLAS above), to find the crossover")
    ap.add_argument("--timing", choices=("rotate", "flush"), default="rotate",
                    help="keep weights out of L2 by rotating copies (default) or flushing it")
    ap.add_argument("--report", action="store_true", help="print each chosen kernel's resources")
    ap.add_argument("--dump", help="with --report: write each chosen kernel's TTGIR and SASS here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_speed.py needs a CUDA GPU")
    TIMING["mode"] = args.timing
    if args.cuda_slab_max is not None:
        from gptq_lab.kernels import cuda_ops
        cuda_ops.MAX_SLAB_M = args.cuda_slab_max
    card = torch.cuda.get_device_name()
    peak, copy_gbs = peak_bandwidth(card), copy_bandwidth()
    if args.gluon:
        from gptq_lab.kernels import gluon_mma
        if gluon_mma.unavailable():
            raise SystemExit(f"--gluon: {gluon_mma.unavailable()}")
    rows = run(args.shapes.split(","), [int(b) for b in args.batches.split(",")], args.act_order,
               not args.no_cuda, args.gluon)
    text = table(rows, card, peak, copy_gbs)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump({"card": card, "peak_gbs": peak, "copy_gbs": copy_gbs, "rows": rows}, f,
                      indent=1)
    if args.report:
        print(compile_report(rows, args.dump))


if __name__ == "__main__":
    main()
