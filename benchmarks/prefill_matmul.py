"""Prefill-sized int4 matmuls of the CUDA layout against fp16, on one CUDA GPU (issue #8).

    python benchmarks/prefill_matmul.py                       # 7B layer shapes, M = 2048
    python benchmarks/prefill_matmul.py --variants GPTQ_LAB_DEQUANT_STORE=0

A prepared ``cuda_decode`` layer runs calls of more than ``cuda_ops.MAX_SLAB_M`` rows as
dequantize + cuBLAS (``cuda_ops.dequant_mm``). This times, per shape (K x N, fused q/k/v and
gate/up as the fused 7B model runs them):

- fp16 ``torch.matmul`` (x @ W^T, as nn.Linear);
- the dequantization kernel alone, in GB/s counting bytes read and written (``--variants``:
  also compile-time variants of it, see int4_dequant.cu, each checked equal to the default);
- dequant + matmul as the layer runs it (``cuda_ops.dequant_mm``), checked against the float64
  product first.

Eager calls timed by ``triton.testing.do_bench`` (median; prefill runs eagerly), L2 flushed
by do_bench between calls. The last rows sum the four shapes of one Llama-2-7B block, the unit
that decides the prefill figure of ``benchmarks/decode.py``.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from cuda_variants import ARCH_90
from kernel_speed import bench_eager, gptq_layer, rel_err

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}


def ms(fn) -> float:
    return bench_eager(fn) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--variants", default="", help="comma list of NAME=VALUE defines, one build each")
    args = ap.parse_args()
    from gptq_lab.kernels import cuda_ops, cuda_pack
    from gptq_lab.kernels.reference import dequantize_gptq
    dev = torch.cuda.get_device_name()
    print(dev, flush=True)
    rows = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        layer = gptq_layer(k, n)
        p = cuda_pack.prepare(*layer, 4, torch.float16)
        x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
        ref = x.double() @ dequantize_gptq(*layer, 4).double()
        y = cuda_ops.dequant_mm(x, p)
        err = rel_err(y, ref)
        if not err < 2e-3:
            raise SystemExit(f"{name}: relative error {err:.2e}")
        del ref
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        w = torch.empty(n, k, device="cuda", dtype=torch.float16)
        moved = n * k * 2 + p.qweight.numel() * 4 + p.meta.numel() * 4
        ext = cuda_ops._build()
        row = {"shape": name, "K": k, "N": n,
               "fp16_ms": ms(lambda: x @ w16.t()),                                       # noqa: B023
               "dequant_ms": ms(lambda: ext.int4_dequant(p.qweight, p.meta, p.group_size, w)),  # noqa: B023
               "int4_ms": ms(lambda: cuda_ops.dequant_mm(x, p))}                          # noqa: B023
        row["dequant_gbs"] = moved / row["dequant_ms"] / 1e6      # (w now holds the default's W)
        for define in filter(None, args.variants.split(",")):
            variant = cuda_ops._build(ARCH_90, (define,))
            wv = torch.empty_like(w)
            variant.int4_dequant(p.qweight, p.meta, p.group_size, wv)
            if not torch.equal(wv, w):
                raise SystemExit(f"{name}: {define} dequantizes differently")
            t = ms(lambda v=variant, o=wv: v.int4_dequant(p.qweight, p.meta, p.group_size, o))  # noqa: B023
            row[f"{define} GB/s"] = moved / t / 1e6
        rows.append(row)
        print(f"{name:>8} {k}x{n}: fp16 {row['fp16_ms']:.3f} ms  int4 {row['int4_ms']:.3f} ms "
              f"({row['fp16_ms'] / row['int4_ms']:.2f}x fp16)  dequant alone {row['dequant_ms']:.3f} ms "
              f"= {row['dequant_gbs']:.0f} GB/s"
              + "".join(f"  {k[:-5]}: {v:.0f} GB/s" for k, v in row.items() if k.endswith(" GB/s")),
              flush=True)
    if len(rows) == len(SHAPES):
        fp16, int4 = sum(r["fp16_ms"] for r in rows), sum(r["int4_ms"] for r in rows)
        print(f"one 7B block: fp16 {fp16:.3f} ms  int4 {int4:.3f} ms ({fp16 / int4:.2f}x fp16)", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "prefill_matmul.json"), "w") as f:
            json.dump({"device": dev, "m": args.m, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
