"""End to end decode speed and memory: fp16 against GPTQ int4 g128 on the same generation path.

    python benchmarks/decode.py                                  # 7B shape, eager and fast paths
    python benchmarks/decode.py --shapes 7b,8b --paths fast
    python benchmarks/decode.py --kernels default,default+fuse,cuda,cuda+fuse    # int4 variants
    python benchmarks/decode.py --tiny --device cpu              # smoke run, seconds
    python benchmarks/decode.py --isolate --paths fast           # one Python process per model
    python benchmarks/decode.py --prefill-only --paths fast      # the prefill figure alone, in seconds
    python benchmarks/decode.py --prefill-ab 9 --kernels cuda+fuse   # fp16 and int4 prefill, alternated
    python benchmarks/decode.py --prefill-ab 9 --kernels cuda+fuse --w4-ab   # and int4 with W4 off/on

For each shape (Llama-2-7B: hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000; GQA
Llama-3-8B: MLP 14336, 8 KV heads, vocab 128256) a model with random weights is built on the
device in fp16 and timed; then quantize_model(method="rtn") at 4 bits, group size 128,
symmetric, makes the GPTQ checkpoint (``save``), the float model is freed, and
``gptq_lab.load`` + ``generate.prepare_model(release_checkpoint=True)`` bring it back to be
timed the same way, once per ``--kernels`` variant: "default" (Triton), "cuda"
(``cuda_decode=True``), each optionally "+fuse" (``fuse=True``: q/k/v and gate/up as one matmul
each), labelled in the dtype column ("int4", "int4 cuda", "int4 default+fuse"...). Paths
(``gptq_lab.generate``): "eager" is transformers' generate with its default dynamic cache;
"fast" is ``StaticGreedy`` (static KV cache, decode step under
torch.compile(fullgraph=True), recorded in a CUDA graph per cache on a GPU). Figures: greedy
decode tokens/s at batch 1 after a short and a long prompt and at larger batches (decode only:
t(128 new) - t(1 new)), prefill tokens/s of the long prompt (prompt / time to first token),
the weights' bytes and the peak allocation. The table goes to stdout and to $OUT/decode.txt
when OUT is set; progress and phase times go to stderr. ``--isolate`` runs fp16 and each int4
variant in a child process of its own: on an H100 an int4 model timed after a compiled fp16
model in the same process decoded ~13% slower with inductor's dependent launch than alone
(benchmarks/results/decode_7b_fast_pdl_eighth_h100.txt; not understood yet). ``--prefill-ab N``
keeps the fp16 model (fake-quantized by RTN: the same shapes and dtype) and one int4 variant in
memory together and times their fast-path prefill in alternation, N rounds of ``--repeats``
runs each: the ratio then compares the two under the same clocks (fp16's prefill moved 2.4%
between two processes on an H100, as much as the int4 routes differed); ``--w4-ab`` adds the
int4 model a second time per round, the W4 GEMM off then on (``GPTQ_LAB_W4``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from gptq_lab.kernels import ops as kernel_ops

from gptq_lab import QuantConfig, load, quantize_model, save
from gptq_lab.generate import (
    LLAMA_SHAPES,
    PATHS,
    DecodeSettings,
    figure_names,
    measure_decode,
    prepare_model,
    random_llama,
)

KERNELS = ("default", "cuda", "default+fuse", "cuda+fuse")
QUANT = QuantConfig(bits=4, group_size=128, sym=True)
TINY = DecodeSettings(prompt=4, long_prompt=16, new_tokens=4, batches=(2,), repeats=1, warmup=0)


def log(msg: str, t0: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def make_checkpoint(model: torch.nn.Module, directory: Path) -> None:
    """RTN 4-bit g128 of ``model`` (modified in place: fake-quantized) written as a GPTQ checkpoint."""
    results = quantize_model(model, config=QUANT, method="rtn", progress=False)
    save(model, directory, results)


def load_int4(directory: Path, device: torch.device, kernel: str = "default") -> torch.nn.Module:
    """The checkpoint in ``directory`` loaded in fp16 and prepared for inference, checkpoint
    layout released; ``kernel`` (one of KERNELS) "cuda..." also keeps the CUDA decode kernel's
    layout, "...+fuse" fuses q/k/v and gate/up first."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; use one of {KERNELS}")
    base, _, fuse = kernel.partition("+")
    return prepare_model(load(directory, device=device, dtype=torch.float16), release_checkpoint=True,
                         cuda_decode=base == "cuda", fuse=fuse == "fuse")


def emit(text: str, filename: str) -> None:
    """Print ``text``; also write it to $OUT/``filename`` (atomically) when OUT is set."""
    print(text)
    if os.environ.get("OUT"):
        from gptq_lab.atomic import atomic_write_text
        atomic_write_text(Path(os.environ["OUT"]) / filename, text + "\n")


def free(*_refs) -> None:
    """Drop compiled graphs, CUDA-graph pools, dequant buffers and cached blocks."""
    torch._dynamo.reset()
    kernel_ops.clear_workspaces()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(model, shape: str, dtype: str, paths: list[str], settings: DecodeSettings) -> list[dict]:
    rows = []
    for path in paths:
        t0 = time.perf_counter()
        try:
            figures = measure_decode(model, path, settings, progress=lambda m: log(f"{shape} {dtype} {m}"))
        except Exception as e:  # noqa: BLE001 -- a failed path (e.g. a compile error) must not lose the other rows
            traceback.print_exc()
            figures = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        log(f"{shape} {dtype} {path}: {time.perf_counter() - t0:.0f}s {figures}")   # kept if a later row dies
        rows.append({"shape": shape, "path": path, "dtype": dtype, **figures})
    return rows


def run_shape(shape: str, paths: list[str], device: torch.device, settings: DecodeSettings,
              workdir: Path, kernels: tuple[str, ...] = ("default",), fp16: bool = True) -> list[dict]:
    log(f"{shape}: building the fp16 model")
    model = random_llama(shape, device)
    rows = measure(model, shape, "fp16", paths, settings) if fp16 else []
    if not kernels:                                        # --no-int4
        return rows
    log(f"{shape}: RTN 4-bit g128 and save")
    ckpt = workdir / f"{shape}-gptq-4bit-g128"
    try:
        make_checkpoint(model, ckpt)
        del model
        free()
        for kernel in kernels:     # "default": Triton; "cuda": + CUDA decode kernel; "+fuse": fused
            log(f"{shape}: load the checkpoint ({kernel} kernels)")
            model = load_int4(ckpt, device, kernel)
            rows += measure(model, shape, int4_label(kernel), paths, settings)
            del model
            free()
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return rows


@contextlib.contextmanager
def w4_setting(value: str | None):
    """``GPTQ_LAB_W4=value`` inside the block (None: left as it is), restored after it."""
    saved = os.environ.get("GPTQ_LAB_W4")
    if value is not None:
        os.environ["GPTQ_LAB_W4"] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("GPTQ_LAB_W4", None)
        else:
            os.environ["GPTQ_LAB_W4"] = saved


def prefill_ab(shape: str, device: torch.device, kernel: str, settings: DecodeSettings,
               rounds: int, workdir: Path, header: str, w4_ab: bool = False) -> str:
    """fp16 and the int4 ``kernel`` variant in memory together, their fast-path prefill timed in
    alternation for ``rounds`` rounds; a table of the rounds and the medians. ``w4_ab`` times
    the int4 model twice per round, with ``GPTQ_LAB_W4`` 0 then 1 (the W4 GEMM off and on; the
    prefill runs uncompiled, so each call reads the setting)."""
    s = DecodeSettings(**{**settings.__dict__, "decode": False})
    key = f"prefill p{s.long_prompt}"
    log(f"{shape}: building the fp16 model, RTN 4-bit g128, load ({kernel} kernels)")
    fp16 = random_llama(shape, device)
    ckpt = workdir / f"{shape}-gptq-4bit-g128"
    try:
        make_checkpoint(fp16, ckpt)
        int4 = load_int4(ckpt, device, kernel)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    label = int4_label(kernel)
    variants = ([(f"{label} W4=0", int4, "0"), (f"{label} W4=1", int4, "1")] if w4_ab
                else [(label, int4, None)])
    names = [name for name, _, _ in variants]
    lines = [header, "", "| round | fp16 " + " | ".join([key, *(f"{n} {key}" for n in names),
                                                        *(f"{n}/fp16" for n in names)]) + " |",
             "|---" * (2 + 2 * len(variants)) + "|"]
    rows = []
    for r in range(rounds):
        row = [measure_decode(fp16, "fast", s)[key]]
        for _, model, w4 in variants:
            with w4_setting(w4):
                row.append(measure_decode(model, "fast", s)[key])
        rows.append(row)
        log(f"{shape} round {r + 1}/{rounds}: fp16 {row[0]:.0f}, " + ", ".join(
            f"{n} {b:.0f} ({b / row[0]:.3f}x)" for n, b in zip(names, row[1:])) + " tokens/s")
        lines.append(f"| {r + 1} | " + " | ".join([*(f"{v:.0f}" for v in row),
                                                  *(f"{b / row[0]:.3f}x" for b in row[1:])]) + " |")
    median = statistics.median
    cells = [f"{median(col):.0f}" for col in zip(*rows)]
    for i in range(1, len(variants) + 1):
        ratios = [row[i] / row[0] for row in rows]
        cells.append(f"{median(ratios):.3f}x (min {min(ratios):.3f}x, max {max(ratios):.3f}x)")
    lines.append("| median | " + " | ".join(cells) + " |")
    lines += ["", (f"tokens/s of a {s.long_prompt}-token prompt at batch 1 (prompt / time to the first "
                   f"token, median of {s.repeats} runs per round), shape {shape}, fast path uncompiled; "
                   "fp16 and int4 alternate within each round.")]
    return "\n".join(lines)


def int4_label(kernel: str) -> str:
    """The dtype column of a --kernels variant: "int4", "int4 cuda+fuse"..."""
    return "int4" if kernel == "default" else f"int4 {kernel}"


def isolated_rows(argv: list[str], shapes: list[str], kernels: list[str], fp16: bool,
                  int4: bool) -> list[dict]:
    """Rows of this same command run once per model in a child process: for each shape, fp16
    alone, then each int4 variant alone (one model per process, as a user runs it)."""
    base = [a for a in argv if a != "--isolate"]           # later flags below override base's
    models = ([("fp16", ["--no-int4"])] if fp16 else []) + \
        ([(int4_label(k), ["--no-fp16", "--kernels", k]) for k in kernels] if int4 else [])
    env = {k: v for k, v in os.environ.items() if k != "OUT"}       # the parent writes the table
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptq_lab_decode_rows_") as tmp:
        out = Path(tmp) / "rows.json"
        for shape in shapes:
            for name, flags in models:
                out.unlink(missing_ok=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--shapes", shape,
                       *flags, "--rows-json", str(out)]
                log("child process: " + " ".join(cmd[2:]))
                code = subprocess.run(cmd, env=env, check=False).returncode
                if code == 0 and out.exists():
                    rows += json.loads(out.read_text())
                else:                          # (e.g. killed for memory): the other rows stay
                    rows.append({"shape": shape, "path": "all", "dtype": name,
                                 "error": f"its process exited with code {code}"})
    return rows


def table(rows: list[dict], settings: DecodeSettings, header: str) -> str:
    names = figure_names(settings)
    lines = [header, "", "| shape | path | dtype | " + " | ".join(names) + " |",
             "|---" * (3 + len(names)) + "|"]

    def cell(v) -> str:
        return "-" if v is None or math.isnan(v) else f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['path']} | {r['dtype']} | failed: {r['error']} |")
            continue
        lines.append(f"| {r['shape']} | {r['path']} | {r['dtype']} | "
                     + " | ".join(cell(r[n]) for n in names) + " |")
        base = next((b for b in rows if b["dtype"] == "fp16" and b["shape"] == r["shape"]
                     and b["path"] == r["path"] and "error" not in b), None)
        if r["dtype"].startswith("int4") and base is not None:
            ratios = [f"{r[n] / base[n]:.2f}x" if base[n] and not math.isnan(base[n] + r[n]) else "-"
                      for n in names]
            lines.append(f"| {r['shape']} | {r['path']} | {r['dtype']}/fp16 | " + " | ".join(ratios) + " |")
    lines += ["", ("tokens/s: decode bB pT = B sequences after a T-token prompt, new tokens only "
                   f"({settings.new_tokens} per sequence); prefill = prompt tokens / time to first token. "
                   "GB: weights (parameters + buffers), peak allocation during the path's runs. "
                   "int4/fp16 rows: ratios (speedups for tokens/s, fractions for GB). "
                   "int4: Triton kernels; int4 cuda: prepare_model(cuda_decode=True), the CUDA layout only "
                   "(decode kernel up to 128 rows, its dequantization + cuBLAS above); +fuse: "
                   "prepare_model(fuse=True), q/k/v and gate/up each one int4 matmul.")]
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="7b", help="comma list of " + ", ".join(LLAMA_SHAPES))
    ap.add_argument("--paths", default="eager,fast", help="comma list of " + ", ".join(PATHS))
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama and short runs (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default=None, help="batch sizes besides 1 (default 8,32; none: only batch 1)")
    ap.add_argument("--no-fp16", action="store_true",
                    help="skip the fp16 rows (e.g. to compare int4 settings; no ratios then)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median)")
    ap.add_argument("--kernels", default="default",
                    help="int4 variants, comma list of default (Triton), cuda (prepare_model(cuda_decode="
                         "True)), default+fuse and cuda+fuse (also prepare_model(fuse=True))")
    ap.add_argument("--no-compile", action="store_true",
                    help="fast path without torch.compile (default with --tiny on CPU)")
    ap.add_argument("--isolate", action="store_true",
                    help="time fp16 and each int4 variant in its own Python process (no compiled "
                         "state carried from one model to the next)")
    ap.add_argument("--no-int4", action="store_true", help="only the fp16 rows")
    ap.add_argument("--prefill-only", action="store_true",
                    help="only the prefill figure and memory (no decode step, nothing compiled)")
    ap.add_argument("--prefill-ab", type=int, metavar="ROUNDS",
                    help="only the prefill, fp16 and one int4 variant (--kernels) in memory together, "
                         "timed in alternation for ROUNDS rounds")
    ap.add_argument("--w4-ab", action="store_true",
                    help="with --prefill-ab: time the int4 model with the W4 GEMM off and on "
                         "(GPTQ_LAB_W4=0, then 1) in each round")
    ap.add_argument("--rows-json", help=argparse.SUPPRESS)     # --isolate's children write rows here
    args = ap.parse_args(argv)
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    paths = args.paths.split(",")
    kernels = args.kernels.split(",")
    for name, allowed in ((shapes, LLAMA_SHAPES), (paths, PATHS), (kernels, KERNELS)):
        bad = [v for v in name if v not in allowed]
        if bad:
            ap.error(f"unknown {bad}; choose from {list(allowed)}")
    settings = TINY if args.tiny else DecodeSettings()
    if args.no_compile or (args.tiny and args.device == "cpu"):      # inductor on CPU: minutes
        settings = DecodeSettings(**{**settings.__dict__, "compile": False})
    if args.prefill_only:
        settings = DecodeSettings(**{**settings.__dict__, "decode": False})
    if args.batches or args.repeats:
        settings = DecodeSettings(**{**settings.__dict__,
                                     **({"batches": () if args.batches == "none" else
                                         tuple(int(b) for b in args.batches.split(","))}
                                        if args.batches else {}),
                                     **({"repeats": args.repeats} if args.repeats else {})})
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.prefill_ab:
        if len(shapes) != 1 or len(kernels) != 1 or args.isolate:
            ap.error("--prefill-ab takes one shape and one --kernels variant, without --isolate")
        if args.w4_ab and not kernels[0].startswith("cuda"):
            ap.error("--w4-ab needs a cuda --kernels variant (the W4 GEMM serves cuda_decode layers)")
        import transformers
        header = (f"Prefill, fp16 and int4 alternated, on {card}: torch {torch.__version__}, "
                  f"transformers {transformers.__version__}, GPTQ_LAB_W4={os.environ.get('GPTQ_LAB_W4', '')!r}")
        with tempfile.TemporaryDirectory(prefix="gptq_lab_decode_") as tmp:
            text = prefill_ab(shapes[0], device, kernels[0], settings, args.prefill_ab, Path(tmp), header,
                              w4_ab=args.w4_ab)
        emit(text, "prefill_ab.txt")
        return text
    rows = []
    if args.isolate:
        rows = isolated_rows(argv if argv is not None else sys.argv[1:], shapes, kernels,
                             fp16=not args.no_fp16, int4=not args.no_int4)
    else:
        with tempfile.TemporaryDirectory(prefix="gptq_lab_decode_") as tmp:
            for shape in shapes:
                rows += run_shape(shape, paths, device, settings, Path(tmp),
                                  () if args.no_int4 else tuple(kernels), fp16=not args.no_fp16)
    if args.rows_json:
        Path(args.rows_json).write_text(json.dumps(rows))
        return ""
    import transformers
    header = (f"Decode benchmark on {card}: torch {torch.__version__}, transformers "
              f"{transformers.__version__}; int4 = GPTQ checkpoint (RTN, 4-bit g128 sym) via gptq_lab.load; "
              f"fast path {'compiled (CUDA graphs on GPU)' if settings.compile and settings.decode else 'NOT compiled'}"
              + ("; each model timed in its own process" if args.isolate else ""))
    text = table(rows, settings, header)
    emit(text, "decode.txt")
    return text


if __name__ == "__main__":
    main()
