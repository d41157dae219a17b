"""Tune the CUDA decode kernel: ring depths (compile-time) x warps x tiles per block, in one GPU call.

    python benchmarks/cuda_variants.py --build 4,8,16          # compile the variants (parallel)
    python benchmarks/cuda_variants.py --stages 4,8,16 --batches 1,16
    python benchmarks/cuda_variants.py --stages 4 --warps 0 --nt 0,1,2,4 --batches 1,8,16,64
    python benchmarks/cuda_variants.py --stages 4,4/1,4/3,4+GPTQ_LAB_B1_MINBLOCKS=3 --warps 0 --batches 1
    ncu --clock-control none --set full --import-source yes -k regex:int4_decode_kernel -o rep \
        python benchmarks/cuda_variants.py --once --warps 0 --batches 1   # one call per shape
    ncu -i rep.ncu-rep --page source --csv --print-source sass   # stall samples per instruction

A variant is a ring depth, then "/A" for ablation A and "+NAME=VALUE" for any other define of
kernels/cuda/int4_decode_kernel.cuh and int4_dequant.cu.

Each variant is checked against the float64 product of the dequantized weight before it is
timed; times are GPU time of CUDA-graph replays, ``--timing`` as in benchmarks/kernel_speed.py
(rotate: back to back over weight copies > 3 x L2; flush: one call after an L2 flush), fp16
``torch.matmul`` on the same call as the baseline. The table goes to stdout and, with
$OUT set, JSON to $OUT/cuda_variants.json. Production uses the default depth in
kernels/cuda/int4_decode_kernel.cuh and the launcher's choice of warps and tiles per block (0).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from kernel_speed import TIMING, bench, copies_for, gptq_layer, rel_err

ARCH_90 = ("-gencode=arch=compute_90,code=sm_90",)
SHAPES = ["4096x4096", "4096x11008", "11008x4096", "8192x8192", "8192x28672", "28672x8192"]


def defines(variant: str) -> tuple[str, ...]:
    """variant "S" (ring depth S) or "S/A" (depth S, ablation A: see int4_decode_kernel.cuh), then any
    "+NAME=VALUE" defines, e.g. "4/3+GPTQ_LAB_B1_MINBLOCKS=3" -> the compiler's -D list."""
    base, *extra = variant.split("+")
    stages, _, ablate = base.partition("/")
    if not stages.isdigit() or (ablate and not ablate.isdigit()) or not all("=" in e for e in extra):
        raise ValueError(f"variant {variant!r}: expected S, S/A, then +NAME=VALUE defines")
    return ((f"GPTQ_LAB_STAGES={stages}",) + ((f"GPTQ_LAB_ABLATE={ablate}",) if ablate else ())
            + tuple(extra))


def build(variant: str):
    from gptq_lab.kernels import cuda_ops
    return cuda_ops._build(ARCH_90, defines(variant))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=None, help="only compile these depths, in parallel processes")
    ap.add_argument("--stages", default="4")
    ap.add_argument("--warps", default="0,2,4,8", help="0 = the launcher's choice")
    ap.add_argument("--nt", default="0", help="tiles of 16 outputs per block (1, 2, 4); 0 = the launcher's")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--timing", choices=("rotate", "flush"), default="rotate")
    ap.add_argument("--once", action="store_true",
                    help="one checked call per variant and shape, no timing (for a profiler such as ncu)")
    args = ap.parse_args()
    TIMING["mode"] = args.timing
    if args.build:
        procs = [subprocess.Popen([sys.executable, __file__, "--build-one", s]) for s in args.build.split(",")]
        sys.exit(max(p.wait() for p in procs))
    from gptq_lab.kernels import cuda_pack
    from gptq_lab.kernels.reference import dequantize_gptq
    stages = args.stages.split(",")
    warps = [int(w) for w in args.warps.split(",")]
    nts = [int(v) for v in args.nt.split(",")]
    rows = []
    print(f"{torch.cuda.get_device_name()}", flush=True)
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        layer = gptq_layer(k, n)
        w16 = torch.randn(k, n, device="cuda", dtype=torch.float16)
        p = cuda_pack.prepare(*layer, 4, torch.float16)
        w_ref = dequantize_gptq(*layer, 4).double()
        rotations = 1 if args.once else copies_for(k * n // 2)
        copies = [p] + [p._replace(qweight=p.qweight.clone(), meta=p.meta.clone())
                        for _ in range(rotations - 1)]
        w16_copies = [w16] + [torch.randn_like(w16) for _ in range(copies_for(2 * k * n) - 1)
                              if not args.once]
        torch.cuda.synchronize()                   # the copies' layouts have landed (see settle)
        for m in (int(b) for b in args.batches.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.double() @ w_ref
            row = {"shape": shape, "M": m, "fp16_us": float("nan") if args.once else bench(
                lambda: torch.matmul(x, w16),                                          # noqa: B023
                [lambda w=w: torch.matmul(x, w) for w in w16_copies])}                 # noqa: B023
            for s in stages:
                ext = build(s)
                for w, nt in ((w, nt) for w in warps for nt in nts):
                    label = f"stages {s} warps {w} nt {nt} {shape} M={m}"

                    def call(c=p):
                        return ext.int4_decode(x, c.qweight, c.meta, c.group_size,      # noqa: B023
                                               c.out_features, w, nt)                   # noqa: B023
                    try:
                        y = call()
                    except RuntimeError as e:
                        print(f"{label}: {e}", flush=True)
                        continue
                    err = rel_err(y, ref)
                    if not err < 2e-3 and "/" not in s.split("+")[0]:
                        raise SystemExit(f"{label}: rel. error {err:.2e}")
                    if args.once:
                        continue
                    row[f"v:s{s}w{w}n{nt}"] = bench(call, [lambda c=c: call(c) for c in copies])
            rows.append(row)
            if args.once:
                continue
            bytes_ = k * n // 2
            best = min((v, c) for c, v in row.items() if c.startswith("v:"))
            print(f"{shape:>11} M={m:<3} fp16 {row['fp16_us']:7.1f}  "
                  + "  ".join(f"{c} {v:6.1f}" for c, v in row.items() if c.startswith("v:"))
                  + f"  | best {best[1]} {best[0]:.1f} us = {bytes_ / best[0] / 1e3:.0f} GB/s"
                  f" x{row['fp16_us'] / best[0]:.2f}", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cuda_variants.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--build-one":
        build(sys.argv[2])
    else:
        main()
