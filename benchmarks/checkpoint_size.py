"""Checkpoint size, resident memory and load time: fp32, fp16 and GPTQ 4-bit g128 of the demo model.

    python benchmarks/checkpoint_size.py [--out DIR] [--windows 2]

The 4-bit checkpoint is made with GPTQ on the protocol's calibration (``--method rtn`` is
quicker; sizes do not depend on the solver) at QuantConfig(bits=4, group_size=128); its other weights (embeddings, norms) are fp16, as in
standard GPTQ checkpoints. Each checkpoint is loaded in a fresh subprocess, which reports
its RSS growth (after loading, and after one forward that touches every weight: loaded
safetensors are memory-mapped, so pages arrive on first use) and the bytes of its tensors.
Finally the round trip is checked: logits and perplexity on eval windows of Pride and
Prejudice from the converted model and from the reloaded checkpoint (both run in fp32).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MEASURE_TOKENS = 64


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def measure(kind: str, path: str) -> dict:
    """Run in a subprocess: load one checkpoint, report memory and time as JSON."""
    from gptq_lab import io
    warm_up(path)
    base = rss_bytes()
    t0 = time.perf_counter()
    if kind == "gptq":
        model = io.load(path, dtype=torch.float16)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, kind)).eval()
    load_s = time.perf_counter() - t0
    after_load = rss_bytes()
    with torch.no_grad():
        model(torch.arange(MEASURE_TOKENS)[None] % 1000, use_cache=False)
    return {"load_s": load_s, "rss_load": after_load - base, "rss_forward": rss_bytes() - base,
            "tensor_bytes": tensor_bytes(model)}


def warm_up(path: str) -> None:
    """Import and run the architecture's code once on a 1-layer, small-vocab copy, so lazy
    imports and one-time allocations are not counted as the checkpoint's load time or memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptq_lab.qlinear import QuantLinear
    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers, config.vocab_size = 1, 256
    with torch.no_grad():
        AutoModelForCausalLM.from_config(config).eval()(torch.arange(8)[None], use_cache=False)
        QuantLinear(64, 64, 4, 32)(torch.zeros(1, 64))
    gc.collect()


def run_measure(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", kind, str(path)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cast_float_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter/buffer outside QuantLinear layers (scales stay fp16)."""
    from gptq_lab.qlinear import QuantLinear
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for name, p in module.named_parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = b.to(dtype)


def write_checkpoints(out: Path, method: str = "gptq", n_samples: int = 128) -> tuple[dict, object, object]:
    """Save fp32, fp16 and GPTQ 4-bit g128 checkpoints; return paths, the converted model, tokenizer."""
    from gptq_lab import QuantConfig, data, io, quantize_model
    from gptq_lab.qlinear import convert
    model, tokenizer = data.load_model("demo", dtype=torch.float32)
    paths = {k: out / k for k in ("float32", "float16", "gptq")}
    model.save_pretrained(paths["float32"])
    copy.deepcopy(model).half().save_pretrained(paths["float16"])
    config = QuantConfig(bits=4, group_size=128)
    calib = (data.calibration_windows(tokenizer, ("emma", "mansfield_park"), n_samples, 512, 0)
             if method == "gptq" else None)
    t0 = time.perf_counter()
    results = quantize_model(model, calib, config, method=method, progress=False)
    print(f"{method} 4-bit g128 quantization: {time.perf_counter() - t0:.1f} s")
    before = tensor_bytes(model)
    convert(model, results, config)
    print(f"convert: tensor bytes {before / 1e6:.1f} MB -> {tensor_bytes(model) / 1e6:.1f} MB (fp32 model)")
    cast_float_weights(model, torch.float16)
    io.save(model, paths["gptq"], tokenizer=tokenizer)
    cast_float_weights(model, torch.float32)       # reference for the round trip: fp16-rounded, run in fp32
    return paths, model, tokenizer


def round_trip(model, tokenizer, path: Path, n_windows: int) -> list[str]:
    from gptq_lab import data, io
    from gptq_lab.eval import perplexity
    windows = data.eval_windows(tokenizer, "pride_and_prejudice", n_windows=n_windows, seqlen=512)
    loaded = io.load(path, dtype=torch.float32)
    with torch.no_grad():
        a = model(windows[:1], use_cache=False).logits
        b = loaded(windows[:1], use_cache=False).logits
    ppl_a, ppl_b = perplexity(model, windows), perplexity(loaded, windows)
    same_logits = "identical" if torch.equal(a, b) else "DIFFERENT"
    same_ppl = "unchanged" if ppl_a == ppl_b else "CHANGED"
    return [f"round trip on {len(windows)} x 512-token windows of pride_and_prejudice (fp32 compute):",
            f"  logits: max |converted - reloaded| = {float((a - b).abs().max()):.3g} ({same_logits})",
            f"  perplexity: converted {ppl_a:.4f}, reloaded {ppl_b:.4f} ({same_ppl})"]


def table(paths: dict, measured: dict) -> str:
    head = (f"{'checkpoint':<22}{'on disk':>10}{'tensors':>10}{'RSS load':>10}{'RSS fwd':>10}"
            f"{'load s':>8}")
    rows = [head, "-" * len(head)]
    names = {"float32": "fp32", "float16": "fp16", "gptq": "GPTQ 4-bit g128"}
    for kind, path in paths.items():
        m = measured[kind]
        rows.append(f"{names[kind]:<22}{dir_bytes(path) / 1e6:>8.1f}MB{m['tensor_bytes'] / 1e6:>8.1f}MB"
                    f"{m['rss_load'] / 1e6:>8.1f}MB{m['rss_forward'] / 1e6:>8.1f}MB{m['load_s']:>8.2f}")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the checkpoints (default: temp)")
    parser.add_argument("--windows", type=int, default=2, help="eval windows for the round-trip check")
    parser.add_argument("--method", choices=["gptq", "rtn"], default="gptq",
                        help="how the 4-bit checkpoint is made (sizes do not depend on it)")
    parser.add_argument("--n-samples", type=int, default=128, help="GPTQ calibration windows of 512 tokens")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        paths, model, tokenizer = write_checkpoints(out, args.method, args.n_samples)
        measured = {kind: run_measure(kind, path) for kind, path in paths.items()}
        print(f"demo model (SmolLM2-135M), torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(table(paths, measured))
        print("RSS load/fwd: process RSS growth after loading / after one forward of "
              f"{MEASURE_TOKENS} tokens (the GPTQ checkpoint is memory-mapped and loaded as fp16)")
        print("\n".join(round_trip(model, tokenizer, paths["gptq"], args.windows)))


if __name__ == "__main__":
    main()
