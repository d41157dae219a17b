"""Quantizing a Llama-2-7B-shaped model with GPTQ 4-bit g128: seconds per phase, peak GPU memory.

    python benchmarks/quantize_speed.py                         # 32 blocks, 128 x 2048 calibration, cuda
    python benchmarks/quantize_speed.py --layers 8              # time 8 blocks, extrapolate to 32
    python benchmarks/quantize_speed.py --memory-fraction 0.1 --batch-size 8 --offload-activations
    torchrun --nproc-per-node 2 benchmarks/quantize_speed.py --distributed --layers 8
    python benchmarks/quantize_speed.py --tiny --device cpu     # smoke test (seconds, no GPU)

The model (hidden 4096, intermediate 11008, 32 heads, vocab 32000, random fp16 weights) is
built on the meta device and materialised in CPU memory (no default init); its random values
are drawn on the GPU in chunks and copied into the CPU parameters (CPU normal_ took about 70 s
for 8 blocks), or on the CPU with --device cpu. It stays in CPU memory, and the pipeline
moves one block at a time to the device. Under --distributed every rank builds its own copy
(identical on identical cards; checked before timing, which also sets up NCCL). Calibration:
128 windows of 2048 random token ids. Phases (exclusive wall time, torch.cuda.synchronize at
every boundary): capture inputs, move weights (block copy to the device, fake-quantized
weights and results back), forward, hessian, solve (under torchrun: including the broadcast
of each layer's result from the rank that solved it), save state (with --resume-dir), packing
(codes and zeros packed on the device after each solve, by the layer's owner; then convert:
QuantLinears around the packed tensors, on rank 0). With --layers N < 32 the per-block phases
are also extrapolated to 32 blocks (printed as such). The table goes to stdout and, if $OUT is
set, to $OUT/quantize_speed_<tag>.txt.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch
import transformers as tf

from gptq_lab import QuantConfig, convert, quantize_model
from gptq_lab.timing import PhaseTimer

SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
SHAPE_TINY = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 256}
PHASES = ("checks", "capture inputs", "move weights", "forward", "hessian", "solve", "save state", "packing")
PER_RUN = ("checks", "capture inputs")          # not multiplied when extrapolating to more blocks


FILL_CHUNK = 1 << 26        # random values drawn per step on the GPU (128 MiB of fp16)


def build_model(shape: dict, layers: int, seed: int = 0, fill_on: torch.device | None = None) -> torch.nn.Module:
    """Random fp16 Llama on CPU: parameters allocated uninitialised, then filled in place with
    N(0, 0.02) (norm weights 1). fill_on: a CUDA device draws the values there, FILL_CHUNK at a
    time, each copied into the CPU parameter; the values then depend on the card (the generator's
    launch grid follows its SM count). None or CPU: drawn on the CPU (minutes for 32 blocks)."""
    cfg = tf.LlamaConfig(**{**shape, "num_hidden_layers": layers}, attn_implementation="sdpa")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("meta"):
            model = tf.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    model.to_empty(device="cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)       # its buffers, computed
    stray = [n for n, _ in model.named_buffers() if not n.startswith("model.rotary_emb.")]
    if stray:
        raise RuntimeError(f"buffers {stray[:3]} would be left uninitialised; extend build_model")
    on_gpu = fill_on is not None and fill_on.type == "cuda"
    gen = torch.Generator(fill_on if on_gpu else "cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)                                   # RMSNorm weights
            elif not on_gpu:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                flat = p.view(-1)
                for start in range(0, flat.numel(), FILL_CHUNK):
                    part = flat[start:start + FILL_CHUNK]
                    part.copy_(torch.empty_like(part, device=fill_on).normal_(0.0, 0.02, generator=gen))
    return model.eval()


def check_same_on_every_rank(model: torch.nn.Module, device: torch.device) -> None:
    """Every rank must quantize the same model: compare a strided sample of each parameter with
    rank 0's (this is also the process group's first collective, so NCCL is set up here)."""
    import torch.distributed as dist
    probe = torch.stack([p.detach().view(-1)[::max(1, p.numel() // 4096)].double().sum()
                         for p in model.parameters()]).to(device)
    reference = probe.clone()
    dist.broadcast(reference, src=0)
    if not torch.equal(probe, reference):
        raise SystemExit(f"rank {dist.get_rank()} built another model than rank 0 (cards of different "
                         f"kinds draw different random values); use identical cards")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="blocks to build and time (default 32; tiny 3)")
    ap.add_argument("--samples", type=int, default=None, help="calibration windows (default 128; tiny 8)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; tiny 64)")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per forward (default all at once)")
    ap.add_argument("--offload-activations", action="store_true")
    ap.add_argument("--memory-fraction", type=float, default=None,
                    help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    ap.add_argument("--device", default=None, help="default cuda (cuda:LOCAL_RANK with --distributed)")
    ap.add_argument("--distributed", action="store_true", help="run under torchrun: NCCL (gloo on CPU)")
    ap.add_argument("--resume-dir", default=None, help="also write the resume state after each block")
    ap.add_argument("--no-pack", action="store_true",
                    help="skip convert (the pipeline still packs each layer after its solve)")
    ap.add_argument("--tiny", action="store_true", help="a small shape that runs on CPU in seconds")
    args = ap.parse_args()
    shape = SHAPE_TINY if args.tiny else SHAPE_7B
    layers = args.layers or shape["num_hidden_layers"]
    samples, seqlen = args.samples or (8 if args.tiny else 128), args.seqlen or (64 if args.tiny else 2048)

    rank, world = 0, 1
    device = torch.device(args.device or "cuda")
    if args.distributed:
        import torch.distributed as dist
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        # torchrun sets OMP_NUM_THREADS=1; the CPU-side phases (checks, packing) want the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --tiny for a quick run)")
    if args.memory_fraction is not None:
        if not cuda:
            raise SystemExit("--memory-fraction needs a CUDA device")
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, torch.device(device).index or 0)

    t0 = time.perf_counter()
    model = build_model(shape, layers, fill_on=device)
    build_s = time.perf_counter() - t0
    if args.distributed:
        check_same_on_every_rank(model, device)
        build_s = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, shape["vocab_size"], (samples, seqlen), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(bits=4, group_size=128)
    timer = PhaseTimer(sync=(lambda: torch.cuda.synchronize(device)) if cuda else None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    results = quantize_model(model, ids, config, device=device, batch_size=args.batch_size, progress=False,
                             offload_activations=args.offload_activations, resume_dir=args.resume_dir,
                             timer=timer)
    if not args.no_pack and rank == 0:          # one process writes the checkpoint
        with timer("packing"):
            convert(model, results, config)
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    if args.distributed:
        import torch.distributed as dist
        dist.barrier()
    if rank == 0:
        report(args, shape, layers, samples, seqlen, device, world, build_s, timer.totals, total, peak,
               model_bytes)
    if args.distributed:
        import torch.distributed as dist
        dist.destroy_process_group()


def report(args, shape, layers, samples, seqlen, device, world, build_s, totals, total, peak, model_bytes) -> None:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    full = shape["num_hidden_layers"]
    lines = [
        (f"GPTQ 4-bit g128, {'Llama-2-7B' if not args.tiny else 'tiny Llama'} shape (hidden {shape['hidden_size']}, "
         f"intermediate {shape['intermediate_size']}), {layers} of {full} blocks, random fp16 weights on CPU"),
        (f"calibration {samples} x {seqlen} random tokens; batch size {args.batch_size or samples}; activations "
         f"{'offloaded to CPU' if args.offload_activations else 'on the device'}; device {card} x {world} "
         f"process(es); torch {torch.__version__}; model built{' and checked on every rank' if world > 1 else ''} "
         f"in {build_s:.1f} s (not counted)"),
    ]
    if args.memory_fraction is not None:
        cap = args.memory_fraction * torch.cuda.get_device_properties(device).total_memory
        lines.append(f"GPU memory capped at {args.memory_fraction:g} x card = {cap / 2**30:.2f} GiB")
    lines.append(f"{'phase':<18}{'seconds':>10}{'% of total':>12}{'s per block':>13}")
    measured = 0.0
    for phase in PHASES:
        s = totals.get(phase, 0.0)
        measured += s
        per_block = "" if phase in PER_RUN else f"{s / layers:>13.3f}"
        lines.append(f"{phase:<18}{s:>10.2f}{100 * s / total:>11.1f}%{per_block}")
    other = total - measured
    lines.append(f"{'other (untimed)':<18}{other:>10.2f}{100 * other / total:>11.1f}%")
    lines.append(f"{'total':<18}{total:>10.2f}{100.0:>11.1f}%{(total - totals.get('capture inputs', 0)) / layers:>13.3f}")
    if layers < full:
        per_run = sum(totals.get(p, 0.0) for p in PER_RUN)
        extrapolated = per_run + (total - per_run) * full / layers
        lines.append(f"EXTRAPOLATED to {full} blocks (per-block phases x {full}/{layers}): {extrapolated:.1f} s "
                     f"= {extrapolated / 60:.2f} min")
    if peak is not None:
        lines.append(f"peak GPU memory allocated {peak / 2**30:.2f} GiB; the fp16 model ({layers} blocks) is "
                     f"{model_bytes / 2**30:.2f} GiB, in CPU memory")
    text = "\n".join(lines)
    print(text, flush=True)
    if os.environ.get("OUT"):
        tag = "tiny" if args.tiny else f"{layers}l"
        tag += f"_x{world}" if world > 1 else ""
        tag += f"_cap{args.memory_fraction:g}" if args.memory_fraction is not None else ""
        with contextlib.suppress(OSError):
            Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], f"quantize_speed_{tag}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
