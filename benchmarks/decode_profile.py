"""Where a decode step's time goes: device time per kind of kernel, fp16 against int4.

    python benchmarks/decode_profile.py                          # 7B shape, int4: CUDA kernel, fused
    python benchmarks/decode_profile.py --kernels default        # int4 on the Triton kernels only
    python benchmarks/decode_profile.py --eager                  # the uncompiled step (one kernel per op)
    python benchmarks/decode_profile.py --eager --batch 32       # 32 sequences a step
    python benchmarks/decode_profile.py --tiny --device cpu      # smoke run (CPU op times)

The models are built as in benchmarks/decode.py (random fp16 Llama, RTN 4-bit g128 checkpoint
loaded back with ``gptq_lab.load`` and ``prepare_model``). Each runs ``StaticGreedy``'s decode
step as the fast path does (static KV cache, ``torch.compile``, CUDA graphs on a GPU; ``--eager``
runs it uncompiled): after a ``--prompt``-token prefill and one warm-up pass (compilation, graph
capture, kernel tuning), ``--steps`` greedy steps are profiled with ``torch.profiler`` (kernels
replayed from a CUDA graph are reported one by one) and, separately, timed without the profiler.
Kernels are grouped by name into int4 matmul (our Triton and CUDA kernels), float matmul (cuBLAS
/ aten mm), attention, and everything else. Per group: device milliseconds per decode step (one
token per sequence; ``--batch`` sequences) and share of the kernels' time; then the kernels'
total against the step's wall time (the difference is time the GPU sat between kernels: launch
gaps, host work). The busiest kernels and the ops with the most host time follow each table.
Output goes to stdout and to $OUT/decode_profile.txt when OUT is set.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
import time
from pathlib import Path

import torch
from decode import KERNELS, emit, free, load_int4, make_checkpoint

from gptq_lab.generate import LLAMA_SHAPES, StaticGreedy, random_llama

GROUPS = (                                     # first match wins; names are lower-cased
    ("int4 matmul", re.compile(r"gptq|int4|_gemv|_gemm_kernel|dequant")),
    ("float matmul", re.compile(r"gemm|gemv|cutlass|cublas|nvjet|sm\d+_xmma|aten::mm|aten::addmm|aten::linear|matmul")),
    ("attention", re.compile(r"attention|flash|fmha|sdpa|softmax")),
)
TOP = 12                                       # kernels listed per model


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pattern in GROUPS if pattern.search(low)), "other")


def profile_steps(model: torch.nn.Module, prompt: int, steps: int, device: torch.device,
                  compiled: bool, batch: int = 1) -> tuple[dict, float, list, list]:
    """({group: device ms per step}, wall ms per step, [(ms per step, calls per step, name)]
    of the busiest kernels, the same for the ops with the most host (CPU) self time) over
    ``steps`` decode steps of ``batch`` sequences after a ``prompt`` prefill (a step makes one
    token per sequence)."""
    from torch.profiler import ProfilerActivity, profile
    greedy = StaticGreedy(model, compile=compiled)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def decode(record=None) -> float:
        cache = greedy.cache(batch, prompt + steps + 1)
        token = greedy.prefill(ids, cache)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
        sync(device)
        with record or contextlib.nullcontext():
            t0 = time.perf_counter()
            for _ in greedy.steps(token, cache, prompt, steps):
                pass
            sync(device)
            return time.perf_counter() - t0

    with torch.no_grad():
        for _ in range(2):
            decode()                                  # compile, capture graphs, tune kernels
        wall = decode()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = profile(activities=activities)
        decode(prof)
    per_group: dict[str, float] = {}
    kernels: list[tuple[float, float, str]] = []
    host: list[tuple[float, float, str]] = []
    for event in prof.key_averages():
        if event.device_type.name == "CPU" and event.self_cpu_time_total:
            host.append((event.self_cpu_time_total / 1e3 / steps, event.count / steps, event.key))
        if device.type == "cuda":
            us = event.self_device_time_total if event.device_type.name == "CUDA" else 0.0
        else:                                                     # leaf aten ops only (no double count)
            us = event.self_cpu_time_total if event.key.startswith("aten::") else 0.0
        if us:
            group = group_of(event.key)
            per_group[group] = per_group.get(group, 0.0) + us / 1e3 / steps
            kernels.append((us / 1e3 / steps, event.count / steps, event.key))
    return (per_group, wall * 1e3 / steps, sorted(kernels, reverse=True)[:TOP],
            sorted(host, reverse=True)[:TOP])


def table(rows: dict[str, tuple[dict, float, list]], header: str, path: str) -> str:
    names = [g for g, _ in GROUPS] + ["other"]
    lines = [header, "", "| model | " + " | ".join(f"{g} ms/step" for g in names)
             + f" | kernels ms/step | wall ms/step ({path}) |", "|---" * (len(names) + 3) + "|"]
    for label, (groups, wall, *_) in rows.items():
        total = sum(groups.values())
        cells = [f"{groups.get(g, 0.0):.3f} ({100 * groups.get(g, 0.0) / total:.0f}%)" if total else "-"
                 for g in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {total:.3f} | {wall:.3f} |")
    for label, (_, _, top, host) in rows.items():
        lines += ["", f"Busiest kernels, {label}: ms/step, calls/step, name"]
        lines += [f"  {ms:7.3f}  {calls:5.1f}  {name[:110]}" for ms, calls, name in top]
        lines += ["", f"Most host (CPU) self time, {label}: ms/step, calls/step, op"]
        lines += [f"  {ms:7.3f}  {calls:5.1f}  {name[:110]}" for ms, calls, name in host]
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7b", choices=sorted(LLAMA_SHAPES))
    ap.add_argument("--tiny", action="store_true", help="the tiny shape and few steps (CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernels", default="cuda+fuse", choices=KERNELS,
                    help="int4 layers: Triton (default) or the CUDA layout (cuda), +fuse: q/k/v and gate/up fused")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32; tiny 4)")
    ap.add_argument("--steps", type=int, default=None, help="profiled decode steps (default 16; tiny 2)")
    ap.add_argument("--eager", action="store_true", help="profile the uncompiled step (default on CPU)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded per step")
    ap.add_argument("--int4-first", action="store_true",
                    help="profile int4 before fp16 (in one process the later model may differ)")
    args = ap.parse_args(argv)
    shape = "tiny" if args.tiny else args.shape
    prompt = args.prompt or (4 if args.tiny else 32)
    steps = args.steps or (2 if args.tiny else 16)
    device = torch.device(args.device)
    compiled = not args.eager and device.type == "cuda"
    path = "compiled, CUDA graphs" if compiled else "uncompiled"
    rows = {}
    model = random_llama(shape, device)
    if not args.int4_first:
        rows["fp16"] = profile_steps(model, prompt, steps, device, compiled, args.batch)
    with tempfile.TemporaryDirectory(prefix="gptq_lab_profile_") as tmp:
        make_checkpoint(model, Path(tmp) / "ckpt")      # (fake-quantized in place: same speed)
        fp16 = model if args.int4_first else None
        del model
        free()
        model = load_int4(Path(tmp) / "ckpt", device, args.kernels)
    rows[f"int4 ({args.kernels})"] = profile_steps(model, prompt, steps, device, compiled, args.batch)
    if fp16 is not None:
        del model
        free()
        rows["fp16"] = profile_steps(fp16, prompt, steps, device, compiled, args.batch)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (aten op times)"
    text = table(rows, f"Decode step profile, {shape} shape, batch {args.batch}, {prompt}-token prompt, {steps} steps "
                       f"averaged, {path}, on {card}; torch {torch.__version__}", path)
    emit(text, "decode_profile.txt")
    return text


if __name__ == "__main__":
    main()
