"""The CUTLASS W4A16 GEMM (``kernels/w4_ops.py``) against fp16 and our other int4 paths, on one
Hopper GPU: the large-batch rows of issue #6 and the prefill products of issue #8.

    python benchmarks/w4_gemm.py                                   # table, every built config
    python benchmarks/w4_gemm.py --shapes 8192x8192 --batches 64,256 --out w4.txt
    python benchmarks/w4_gemm.py --profile 11008x4096x2048          # the kernels of one call
    python benchmarks/w4_gemm.py --input 2048         # x's permuted copy alone (no GEMM build)

Per (shape, M): fp16 ``torch.matmul``; Triton's fused kernel (what ``QuantLinear`` runs up to
``dequant_above`` rows); from the CUDA layout, the decode kernel (up to ``cuda_ops.MAX_SLAB_M``
rows), dequantize + cuBLAS (from 64 rows; what a ``cuda_decode`` layer ran above
``MAX_SLAB_M`` before the W4 GEMM), and each W4 configuration built
for fp16 (``auto`` is ``w4_ops.choose``'s pick), reading the same CUDA layout (its time
includes the per-call column permutation of x, ``w4_input``'s Triton kernel, and the
scales/zeros made from the layout; ``torch input`` is the same call with ``w4_pack``'s torch
permute instead; ``core`` is the auto configuration's GEMM alone, on inputs made beforehand). Every output is first checked against the
float64 product (relative error < 2e-3). Timing as ``benchmarks/kernel_speed.py``'s ``rotate`` mode:
GPU time of CUDA-graph replays over weight copies that together exceed 3 x L2, median.
The 7B rows are the four products of one Llama-2-7B block at the prefill's M (fused q/k/v and
gate/up), summed at the end: the unit behind ``decode.py``'s prefill figure.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from kernel_speed import copies_for, gptq_layer, rel_err, rotating_time

SHAPES = ["4096x4096", "4096x11008", "11008x4096", "8192x8192", "8192x28672", "28672x8192"]
BLOCK_7B = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}


def layers(k: int, n: int, count: int):
    """``count`` random symmetric g128 layers in every layout timed here."""
    from gptq_lab.kernels import cuda_pack, triton_pack, w4_pack
    out = []
    for _ in range(count):
        layer = gptq_layer(k, n)
        cuda = cuda_pack.prepare(*layer, 4, torch.float16)
        out.append({"layer": layer, "triton": triton_pack.prepare(*layer, 4), "cuda": cuda,
                    "scales": w4_pack.gemm_scales(cuda)})
    return out


def paths(x: torch.Tensor, first: dict):
    """name -> fn(copy) -> y, for every path timed at this x (``first``: one of the copies)."""
    from gptq_lab.kernels import cuda_ops, triton_gemm, w4_ops, w4_pack
    fns = {"triton": lambda c: triton_gemm.matmul(x, c["triton"])}
    if x.shape[0] <= cuda_ops.MAX_SLAB_M:
        fns["cuda"] = lambda c: cuda_ops.cuda_mm(x, c["cuda"])
    if x.shape[0] >= 64:
        fns["dequant"] = lambda c: cuda_ops.dequant_mm(x, c["cuda"])
    fns["w4 auto"] = lambda c: w4_ops.w4_mm(x, c["cuda"])
    pick = w4_ops.choose(x.shape[0], x.dtype)
    fns["w4 torch input"] = lambda c: w4_ops._w4_mm(           # the call before w4_input
        w4_pack.gemm_input(x, c["cuda"]), c["cuda"].qweight, c["cuda"].meta, c["cuda"].group_size,
        pick)[:, :c["cuda"].out_features]
    xg = w4_pack.gemm_input(x, first["cuda"])          # the copies share one column order
    fns["w4 core"] = lambda c: w4_ops._build().w4_gemm(xg, c["cuda"].qweight, *c["scales"],
                                                       c["cuda"].group_size, pick)[:, :c["cuda"].out_features]
    for name, (dtype, *_) in w4_ops.CONFIGS.items():
        if dtype == 0:
            fns[f"w4 {name}"] = lambda c, name=name: w4_ops.w4_mm(x, c["cuda"], name)
    return fns


def bench_shape(label: str, k: int, n: int, batches) -> list[dict]:
    from gptq_lab.kernels.reference import dequantize_gptq
    copies = layers(k, n, copies_for(k * n // 2))
    w16s = [torch.randn(k, n, device="cuda", dtype=torch.float16) for _ in range(copies_for(2 * k * n))]
    ref_w = dequantize_gptq(*copies[0]["layer"], 4).double()
    rows = []
    for m in batches:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.double() @ ref_w
        row = {"shape": label, "K": k, "N": n, "M": m,
               "fp16_us": rotating_time([lambda w=w: x @ w for w in w16s]) * 1e3}   # noqa: B023
        for name, fn in paths(x, copies[0]).items():
            try:
                err = rel_err(fn(copies[0]), ref)
            except (RuntimeError, ValueError) as e:
                row[name] = f"failed: {str(e).splitlines()[0][:120]}"
                continue
            if not err < 2e-3:
                row[name] = f"wrong: relative error {err:.2e}"
                continue
            row[name] = rotating_time([lambda c=c, fn=fn: fn(c) for c in copies]) * 1e3
        rows.append(row)
        print(line(row), flush=True)
        del ref
    return rows


def profile(k: int, n: int, m: int) -> None:
    """The GPU kernels of one eager ``w4_mm`` call (K x N layer, M rows), by torch.profiler: what
    the whole call spends beside the GEMM (the permuting copy of x, the scales kernel)."""
    from gptq_lab.kernels import w4_ops
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    c = layers(k, n, 1)[0]["cuda"]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    for _ in range(3):                      # builds, tunes and warms up outside the trace
        w4_ops.w4_mm(x, c)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            w4_ops.w4_mm(x, c)
        torch.cuda.synchronize()
    print(f"w4_mm, K={k} N={n} M={m}, config {w4_ops.choose(m, x.dtype)}; 10 calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def input_rows(m: int) -> None:
    """The per-call permuted copy of x alone at M rows, for the 7B block's two K (4096, 11008),
    without and with act-order: ``w4_input``'s Triton kernel and ``w4_pack``'s torch version,
    each first checked equal, against a plain copy of x (the memory-bandwidth reference). Needs
    a GPU and Triton, not the GEMM's build."""
    from gptq_lab.kernels import cuda_pack, w4_input, w4_pack
    print(torch.cuda.get_device_name(), f"| x [M={m}, K] fp16 -> the W4 GEMM's column order; "
          "us per call, rotate timing over copies of x > 3 x L2", flush=True)
    for k in (4096, 11008):
        for act in (False, True):
            qweight, scales, qzeros, g_idx = gptq_layer(k, 256)
            if act:
                g_idx = g_idx[torch.randperm(k, device="cuda")]
            p = cuda_pack.prepare(qweight, scales, qzeros, g_idx, 4, torch.float16)
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16)
                  for _ in range(copies_for(2 * m * k))]
            if not torch.equal(w4_input.gemm_input(xs[0], p), w4_pack.gemm_input(xs[0], p)):
                raise SystemExit(f"w4_input differs from w4_pack at K={k}, act-order {act}")
            times = {name: rotating_time([lambda x=x: fn(x) for x in xs]) * 1e3  # noqa: B023
                     for name, fn in (("copy", torch.clone),
                                      ("w4_input", lambda x: w4_input.gemm_input(x, p)),    # noqa: B023
                                      ("torch", lambda x: w4_pack.gemm_input(x, p)))}     # noqa: B023
            gbs = 2 * 2 * m * k / times["w4_input"] / 1e3
            print(f"K={k:<6} act-order {act!s:<5} copy {times['copy']:6.1f} us | w4_input "
                  f"{times['w4_input']:6.1f} us ({gbs:.0f} GB/s) | torch {times['torch']:6.1f} us",
                  flush=True)


def line(r: dict) -> str:
    cells = [f"{r['shape']:>10} M={r['M']:<5} fp16 {r['fp16_us']:8.1f} us"]
    for name, v in r.items():
        if name in ("shape", "K", "N", "M", "fp16_us"):
            continue
        cells.append(f"{name} {v:8.1f} us ({r['fp16_us'] / v:.2f}x)" if isinstance(v, float) else f"{name}: {v}")
    return " | ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="16,64,128,256,512")
    ap.add_argument("--prefill-m", type=int, default=2048, help="M of the 7B block rows (0: none)")
    ap.add_argument("--out", help="also write the rows here as JSON")
    ap.add_argument("--profile", metavar="KxNxM", help="only list the kernels of one eager call")
    ap.add_argument("--input", type=int, metavar="M", help="only time x's permuted copy at M rows")
    args = ap.parse_args()
    if args.input:
        input_rows(args.input)
        return
    from gptq_lab.kernels import w4_ops
    if w4_ops.unavailable():
        raise SystemExit(f"the W4 GEMM cannot run here: {w4_ops.unavailable()}")
    if args.profile:
        profile(*map(int, args.profile.split("x")))
        return
    print(torch.cuda.get_device_name(), "| configs:", ", ".join(w4_ops.CONFIGS), flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for shape in filter(None, args.shapes.split(",")):
        k, n = map(int, shape.split("x"))
        rows += bench_shape(shape, k, n, batches)
        torch.cuda.empty_cache()
    if args.prefill_m:
        block = [r for name, (k, n) in BLOCK_7B.items() for r in bench_shape(name, k, n, [args.prefill_m])]
        rows += block
        for path in ("triton", "dequant", "w4 auto", "w4 torch input", "w4 core"):
            if all(isinstance(r.get(path), float) for r in block):
                fp16, t = sum(r["fp16_us"] for r in block), sum(r[path] for r in block)
                print(f"one 7B block at M={args.prefill_m}: fp16 {fp16 / 1e3:.3f} ms, {path} "
                      f"{t / 1e3:.3f} ms ({fp16 / t:.2f}x fp16)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
