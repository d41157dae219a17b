"""CPU <-> GPU copies of one Llama-2-7B block's linear weights, several ways: the evidence for
the quantize_speed "move weights" phase (should the pipeline stage copies through pinned memory?).

    python benchmarks/transfer_speed.py            # needs CUDA; the table also goes to $OUT if set

The 7 weights (q, k, v, o, gate, up: 4096 wide; down: 11008 wide; 202M values) are fp16 in
ordinary (pageable) CPU memory, as a loaded model's are. Each row is the median of 5 runs:
  to(cuda, float32)       blocking: converts on the CPU, then sends 800 MB (the masters before #11)
  to(cuda) + cast         sends the 400 MB fp16 copy and casts on the GPU (the pipeline now)
  pinned staging, H2D     copy into a reused pinned buffer on the CPU, then a DMA from it
  to(cpu)                 the 400 MB of fake-quantized fp16 weights back (the pipeline now)
  pinned staging, D2H     DMA into the pinned buffer, then a CPU copy into pageable memory
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def timed(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    dev = torch.device("cuda")
    host = [torch.empty(s, dtype=torch.float16).normal_() for s in SHAPES]
    gpu = [h.to(dev) for h in host]
    biggest = max(h.numel() for h in host)
    pinned = torch.empty(biggest, dtype=torch.float16, pin_memory=True)

    def staged_h2d():
        for h in host:
            buf = pinned[:h.numel()].view(h.shape)
            buf.copy_(h)
            buf.to(dev, non_blocking=True)
            torch.cuda.synchronize()            # the buffer is reused by the next weight

    def staged_d2h():
        for g, h in zip(gpu, host):
            buf = pinned[:g.numel()].view(g.shape)
            buf.copy_(g, non_blocking=True)
            torch.cuda.synchronize()
            h.copy_(buf)

    rows = {
        "to(cuda, float32)": lambda: [h.to(dev, torch.float32) for h in host],
        "to(cuda) + cast": lambda: [h.to(dev).float() for h in host],
        "pinned staging, H2D": staged_h2d,
        "to(cpu)": lambda: [h.copy_(g) for g, h in zip(gpu, host)],
        "pinned staging, D2H": staged_d2h,
    }
    gb = sum(h.numel() * 2 for h in host) / 1e9
    lines = [(f"one 7B block's linears, {gb:.2f} GB of fp16; {torch.cuda.get_device_name(dev)}; torch "
              f"{torch.__version__}; {torch.get_num_threads()} CPU threads"),
             f"{'copy':<24}{'seconds':>9}{'GB/s (fp16 bytes)':>20}"]
    for name, fn in rows.items():
        s = timed(fn)
        lines.append(f"{name:<24}{s:>9.3f}{gb / s:>20.1f}")
    text = "\n".join(lines)
    print(text, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "transfer_speed.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
