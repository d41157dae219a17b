"""Prefill-sized int4 matmuls of the CUDA layout against fp16, on one CUDA GPU (issue #8).

    python benchmarks/prefill_matmul.py                       # 7B layer shapes, M = 2048
    python benchmarks/prefill_matmul.py --blocks 0,8,16,32 --units 1,2,4,8

A prepared ``cuda_decode`` layer runs calls of more than ``cuda_ops.MAX_SLAB_M`` rows as
dequantize + cuBLAS (``cuda_ops.dequant_mm``). This times, per shape (K x N, fused q/k/v and
gate/up as the fused 7B model runs them):

- fp16 ``torch.matmul`` (x @ W^T, as nn.Linear);
- the dequantization kernel alone, writing all of W, in GB/s counting bytes read and written
  (``--units``: compile-time variants of the units each warp handles; each is a separate build);
- dequant + matmul with W dequantized ``--blocks`` MB of rows at a time (0 = all of W at once),
  checked against the whole-W product first.

Eager calls timed by ``triton.testing.do_bench`` (median; prefill runs eagerly), L2 flushed
by do_bench between calls. The last rows sum the four shapes of one Llama-2-7B block, the unit
that decides the prefill figure of ``benchmarks/decode.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from kernels import gptq_layer

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
ARCH_90 = ("-gencode=arch=compute_90,code=sm_90",)


def build(units: int):
    from gptq_lab.kernels import cuda_ops
    return cuda_ops._build(ARCH_90, (f"GPTQ_LAB_DEQUANT_UNITS={units}",))


def ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=100, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--blocks", default="0,8,16,24,32", help="MB of dequantized W per block; 0 = all")
    ap.add_argument("--units", default="4", help="dequantization variants (units per warp)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--build", default=None, help="only compile these unit variants, in parallel")
    args = ap.parse_args()
    if args.build:
        procs = [subprocess.Popen([sys.executable, __file__, "--build-one", u]) for u in args.build.split(",")]
        sys.exit(max(p.wait() for p in procs))
    from gptq_lab.kernels import cuda_ops, cuda_pack
    dev = torch.cuda.get_device_name()
    print(dev, flush=True)
    blocks = [int(b) for b in args.blocks.split(",")]
    units = [int(u) for u in args.units.split(",")]
    rows, total = [], {}
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        layer = gptq_layer(k, n)
        p = cuda_pack.prepare(*layer, 4, torch.float16)
        x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        row = {"shape": name, "K": k, "N": n, "fp16_ms": ms(lambda: x @ w16.t())}   # noqa: B023
        w = torch.empty(n, k, device="cuda", dtype=torch.float16)
        moved = n * k * 2 + p.qweight.numel() * 4 + p.meta.numel() * 4
        for u in units:
            ext = build(u)
            t = ms(lambda: ext.int4_dequant(p.qweight, p.meta, p.group_size, w))    # noqa: B023
            row[f"dequant_u{u}_gbs"] = moved / t / 1e6
        whole = cuda_ops.dequant_mm(x, p, block_bytes=1 << 40)
        for b in blocks:
            size = (b << 20) if b else 1 << 40
            y = cuda_ops.dequant_mm(x, p, block_bytes=size)
            err = float((y.float() - whole.float()).norm() / whole.float().norm())
            if not err < 1e-3:
                raise SystemExit(f"{name}: blocks of {b} MB differ from whole W: rel. error {err:.2e}")
            row[f"mm_{b}MB_ms"] = ms(lambda: cuda_ops.dequant_mm(x, p, block_bytes=size))   # noqa: B023
        rows.append(row)
        for key, v in row.items():
            if key.endswith("_ms"):
                total[key] = total.get(key, 0.0) + v
        print(f"{name:>8} {k}x{n}: fp16 {row['fp16_ms']:.3f} ms  "
              + "  ".join(f"{c[:-3]} {v:.3f} ({row['fp16_ms'] / v:.2f}x)" for c, v in row.items()
                          if c.startswith("mm_"))
              + "  | dequant " + " ".join(f"{c[8:-4]} {v:.0f} GB/s" for c, v in row.items()
                                          if c.startswith("dequant_")), flush=True)
    if len(rows) == len(SHAPES):
        print(f"one 7B block: fp16 {total['fp16_ms']:.3f} ms  "
              + "  ".join(f"{c[:-3]} {v:.3f} ({total['fp16_ms'] / v:.2f}x)" for c, v in total.items()
                          if c.startswith("mm_")), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "prefill_matmul.json"), "w") as f:
            json.dump({"device": dev, "m": args.m, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--build-one":
        build(int(sys.argv[2]))
    else:
        main()
