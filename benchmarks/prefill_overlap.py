"""Can the prefill dequantization hide behind the cuBLAS products? (issue #8; one CUDA GPU)

    python benchmarks/prefill_overlap.py                 # 4 distinct 7B blocks, M = 2048
    python benchmarks/prefill_overlap.py --carveouts 0,8,16,24

A prepared ``cuda_decode`` layer runs a prefill call as dequantize W into a buffer, then cuBLAS
(``cuda_ops.dequant_mm``). The products are compute-bound at M = 2048 and the dequantization is
memory-bound, yet they run one after the other. This times the four linear layers of several
7B blocks (fused q/k/v and gate/up, as the fused model runs them), per block, as:

- ``fp16``: the fp16 products alone (cuBLAS, then cuBLASLt);
- ``serial``: dequantize then multiply, per layer, on one stream (what the layer does today);
- ``prefetch cN``: layer i + 1 is dequantized on a side stream into the second of two buffers
  while layer i's product runs, with that product told to leave N SMs free
  (``torch._C._set_sm_carveout_experimental``, cuBLASLt only); c0 sets no carveout.
- ``fp16 cN``: the fp16 products alone under the same carveout (what the carveout costs).

Each result is checked equal to the serial one. Each variant is timed over the whole sequence
by ``prefill_matmul.ms`` (do_bench median, L2 flushed), printed per block. (The tenth session's
figures, ``results/prefill_overlap_tenth_h100.txt``, came from 9e0fe96, which timed the median
of 15 sequences with CUDA events instead.)
"""
from __future__ import annotations

import argparse
import contextlib
import os

import torch
from kernel_speed import gptq_layer
from prefill_matmul import SHAPES, ms


@contextlib.contextmanager
def blas(carveout: int | None):
    """cuBLASLt with ``carveout`` SMs left free (None: torch's defaults)."""
    if carveout is None:
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(carveout or None)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--carveouts", default="0,8,16,24")
    args = ap.parse_args()
    from gptq_lab.kernels import cuda_ops, cuda_pack
    ext = cuda_ops._build()
    dev = torch.cuda.get_device_name()
    torch.manual_seed(0)
    layers, w16 = [], []
    for _ in range(args.blocks):
        for k, n in SHAPES.values():
            layers.append(cuda_pack.prepare(*gptq_layer(k, n), 4, torch.float16))
            w16.append(torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02)
    xs = {k: torch.randn(args.m, k, device="cuda", dtype=torch.float16) for k, _ in SHAPES.values()}
    biggest = max(p.out_features * p.in_features for p in layers)
    bufs = [torch.empty(biggest, device="cuda", dtype=torch.float16) for _ in range(2)]

    def weight(p, j):
        return bufs[j][:p.out_features * p.in_features].view(p.out_features, p.in_features)

    def dequant(p, j):
        ext.int4_dequant(p.qweight, p.meta, p.group_size, weight(p, j))

    def fp16():
        return [xs[w.shape[1]] @ w.t() for w in w16]

    def serial():
        out = []
        for p in layers:
            dequant(p, 0)
            out.append(xs[p.in_features] @ weight(p, 0).t())
        return out

    side = torch.cuda.Stream()
    ready = [torch.cuda.Event() for _ in range(2)]
    done = [torch.cuda.Event() for _ in range(2)]

    def prefetch():
        main_stream = torch.cuda.current_stream()
        side.wait_stream(main_stream)
        with torch.cuda.stream(side):
            dequant(layers[0], 0)
            ready[0].record(side)
        out = []
        for i, p in enumerate(layers):
            j = i % 2
            if i + 1 < len(layers):
                with torch.cuda.stream(side):
                    if i >= 1:
                        side.wait_event(done[1 - j])            # layer i - 1's product has read it
                    dequant(layers[i + 1], 1 - j)
                    ready[1 - j].record(side)
            main_stream.wait_event(ready[j])
            out.append(xs[p.in_features] @ weight(p, j).t())
            done[j].record(main_stream)
        main_stream.wait_stream(side)
        return out

    reference = [y.clone() for y in serial()]
    per_block = 1.0 / args.blocks
    rows = [("fp16 (cuBLAS)", ms(fp16) * per_block),
            ("serial (cuBLAS)", ms(serial) * per_block)]
    for c in (int(v) for v in args.carveouts.split(",")):
        with blas(c):
            got = prefetch()
            if not all(torch.equal(a, b) for a, b in zip(got, serial(), strict=True)):
                raise SystemExit(f"prefetch c{c} differs from serial under the same settings")
            rows.append((f"fp16 c{c} (cuBLASLt)", ms(fp16) * per_block))
            rows.append((f"serial c{c} (cuBLASLt)", ms(serial) * per_block))
            rows.append((f"prefetch c{c} (cuBLASLt)", ms(prefetch) * per_block))
    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
              for a, b in zip(prefetch(), reference, strict=True))
    base = rows[0][1]
    lines = [(f"{dev}, M = {args.m}, {args.blocks} distinct 7B blocks (qkv, o, gate_up, down), "
              "do_bench median; ms per block"),
             *(f"{name:>26}: {ms:.3f} ms  ({base / ms:.2f}x fp16 cuBLAS)" for name, ms in rows),
             f"largest difference of prefetch (torch defaults) from serial: {err:.1e} of max |y|"]
    print("\n".join(lines), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "prefill_overlap.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
