"""Where a decode step's time goes: device time per kind of kernel, fp16 against int4.

    python benchmarks/decode_profile.py                          # 7B shape, int4 with the CUDA kernel
    python benchmarks/decode_profile.py --kernels default        # int4 on the Triton kernels only
    python benchmarks/decode_profile.py --tiny --device cpu      # smoke run (CPU op times)

The models are built as in benchmarks/decode.py (random fp16 Llama, RTN 4-bit g128 checkpoint
loaded back with ``gptq_lab.load`` and ``prepare_model``). Each is run once through
``StaticGreedy``'s decode step uncompiled (static KV cache), so every kernel of a step is
launched on its own and shows in the profile: after a ``--prompt``-token prefill (not profiled)
and one warm-up pass, ``--steps`` greedy steps are profiled with ``torch.profiler``. Kernels are grouped by name into: int4 matmul
(our Triton and CUDA kernels), float matmul (cuBLAS / aten mm), attention, and everything else.
Per group: device milliseconds per token and share of the step's kernel time; the last line
compares the kernels' total with the step's wall time (the rest is launch overhead, which the
compiled path with CUDA graphs removes). The table goes to stdout and to
$OUT/decode_profile.txt when OUT is set.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
import time
from pathlib import Path

import torch
from decode import SHAPES, build_float, emit, free, load_int4, make_checkpoint

from gptq_lab.generate import StaticGreedy

GROUPS = (                                     # first match wins; names are lower-cased
    ("int4 matmul", re.compile(r"gptq|int4|_gemv|_gemm_kernel|dequant")),
    ("float matmul", re.compile(r"gemm|gemv|cutlass|cublas|sm\d+_xmma|aten::mm|aten::addmm|aten::linear|matmul")),
    ("attention", re.compile(r"attention|flash|fmha|sdpa|softmax")),
)


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pattern in GROUPS if pattern.search(low)), "other")


def profile_steps(model: torch.nn.Module, prompt: int, steps: int, device: torch.device) -> tuple[dict, float]:
    """({group: device ms per token}, wall ms per token) over ``steps`` decode steps at batch 1
    (the prompt's prefill runs before the profiler starts)."""
    from torch.profiler import ProfilerActivity, profile
    greedy = StaticGreedy(model, compile=False)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(prompt, prompt + steps, device=device)

    def decode(record=None):
        cache = greedy.cache(1, prompt + steps + 1)
        token = greedy.prefill(ids, cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with record or contextlib.nullcontext():
            for i in range(steps):
                token = greedy.uncompiled(token, cache, positions[i:i + 1])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    with torch.no_grad():
        decode()                                                 # warm-up: tunes kernels, allocates
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = profile(activities=activities)
        wall = decode(prof)
    per_group: dict[str, float] = {}
    for event in prof.key_averages():
        if device.type == "cuda":
            us = event.self_device_time_total if event.device_type.name == "CUDA" else 0.0
        else:                                                     # leaf aten ops only (no double count)
            us = event.self_cpu_time_total if event.key.startswith("aten::") else 0.0
        if us:
            group = group_of(event.key)
            per_group[group] = per_group.get(group, 0.0) + us / 1e3 / steps
    return per_group, wall * 1e3 / steps


def table(rows: dict[str, tuple[dict, float]], header: str) -> str:
    names = [g for g, _ in GROUPS] + ["other"]
    lines = [header, "", "| model | " + " | ".join(f"{g} ms/token" for g in names)
             + " | kernels ms/token | wall ms/token (uncompiled) |", "|---" * (len(names) + 3) + "|"]
    for label, (groups, wall) in rows.items():
        total = sum(groups.values())
        cells = [f"{groups.get(g, 0.0):.3f} ({100 * groups.get(g, 0.0) / total:.0f}%)" if total else "-"
                 for g in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {total:.3f} | {wall:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="the tiny shape and few steps (CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernels", default="cuda", choices=("default", "cuda"),
                    help="int4 layers on Triton alone (default) or with the CUDA decode kernel (cuda)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32; tiny 4)")
    ap.add_argument("--steps", type=int, default=None, help="profiled decode steps (default 16; tiny 2)")
    args = ap.parse_args(argv)
    shape = "tiny" if args.tiny else args.shape
    prompt = args.prompt or (4 if args.tiny else 32)
    steps = args.steps or (2 if args.tiny else 16)
    device = torch.device(args.device)
    rows = {}
    model = build_float(shape, device)
    rows["fp16"] = profile_steps(model, prompt, steps, device)
    with tempfile.TemporaryDirectory(prefix="gptq_lab_profile_") as tmp:
        make_checkpoint(model, Path(tmp) / "ckpt")
        del model
        free()
        model = load_int4(Path(tmp) / "ckpt", device, args.kernels)
    rows[f"int4 ({args.kernels})"] = profile_steps(model, prompt, steps, device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (aten op times)"
    text = table(rows, f"Decode step profile, {shape} shape, batch 1, {prompt}-token prompt, {steps} steps "
                       f"averaged, on {card}; torch {torch.__version__}")
    emit(text, "decode_profile.txt")
    return text


if __name__ == "__main__":
    main()
