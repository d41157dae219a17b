"""Which calibration data, and how much: the cross-domain matrix (+ mixture) and the sample-count curve.

    python benchmarks/calibration_study.py                  # full: 128 x 512 per source, sweep 8..256
    python benchmarks/calibration_study.py --quick          # CPU smoke test (few, short windows)

Calibration sources: Austen (Emma + Mansfield Park, the protocol's), Moby Dick, the Python docs,
and a 1:1:1 mixture of the three; Moby Dick and Python-docs windows are drawn outside their
evaluation region (gptq_lab.study.heldout_windows). Evaluation: the standard protocol's sets.
The sweep uses the first n Austen windows (nested) and prints the rule for "enough samples".

On a GPU machine without the cached assets, as for benchmarks/protocol.py:

    python benchmarks/calibration_study.py --save-windows study.safetensors        # here
    python benchmarks/calibration_study.py --windows study.safetensors --gguf X.gguf --device cuda

Prints the tables and writes them to $OUT/calibration_study.txt when OUT is set.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import gguf_loader

from gptq_lab import QuantConfig, data
from gptq_lab.study import (
    Runner,
    calibration_sets,
    cross_domain,
    eval_sets,
    load_windows,
    sample_sweep,
    save_windows,
    study_windows,
)

FULL = {"n_samples": 128, "seqlen": 512, "eval_windows": 64, "sweep": (8, 16, 32, 64, 128, 256)}
QUICK = {"n_samples": 8, "seqlen": 128, "eval_windows": 4, "sweep": (2, 4, 8)}


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options shared with benchmarks/protocol.py and benchmarks/mixed_precision.py."""
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--save-windows", help="only tokenize: write every window the studies need here")
    p.add_argument("--windows", help="read the windows from this file instead of tokenizing")
    p.add_argument("--gguf", help="load the model from this GGUF file instead of the cache")


def parse(p: argparse.ArgumentParser):
    """Parse the options -> (args, sizes, windows, load); load is None after --save-windows."""
    args = p.parse_args()
    sizes = QUICK if args.quick else FULL
    windows, load = windows_and_loader(args, sizes)
    return args, sizes, windows, load


def windows_and_loader(args, sizes: dict):
    """(windows dict, load()) from the options; None for load after --save-windows."""
    if args.windows:
        windows = load_windows(args.windows)
    else:
        windows = study_windows(data.load_model("demo")[1], n_samples=sizes["n_samples"],
                                max_samples=max(sizes["sweep"]), seqlen=sizes["seqlen"],
                                eval_windows=sizes["eval_windows"])
    if args.save_windows:
        save_windows(args.save_windows, windows)
        print(f"wrote {len(windows)} window sets to {args.save_windows}: "
              + ", ".join(f"{k} {list(v.shape)}" for k, v in windows.items()))
        return windows, None
    load = (gguf_loader(Path(args.gguf), args.device) if args.gguf
            else lambda: data.load_model("demo", device=args.device)[0])
    return windows, load


def device_line(device: str) -> str:
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {dev}"


def emit(lines: list[str], new: int, name: str) -> None:
    """Print the last ``new`` of ``lines``; write all of them to $OUT/<name>.txt when OUT is set
    (rewritten after each section, so a run cut short keeps what it finished)."""
    if new:
        print("\n".join(lines[len(lines) - new:]), flush=True)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--bits", type=int, default=4, help="GPTQ bits (g128 sym), default 4")
    p.add_argument("--part", choices=("all", "matrix", "sweep"), default="all",
                   help="the cross-domain matrix, the sample-count sweep, or both (default)")
    args, sizes, windows, load = parse(p)
    if load is None:
        return
    t0 = time.perf_counter()
    config = QuantConfig(bits=args.bits, group_size=128, sym=True)
    evals = eval_sets(windows, sizes["eval_windows"])
    calib = calibration_sets(windows, sizes["n_samples"])
    log = lambda r: print(f"done {r.label} at {time.perf_counter() - t0:.0f} s: {r.perplexity} loss {r.gptq_loss}",
                          file=sys.stderr, flush=True)
    runner = Runner(load, evals, args.device, on_row=log)
    lines = [device_line(args.device),
             (f"{'quick' if args.quick else 'full'}: {sizes['n_samples']} x {sizes['seqlen']}-token calibration "
             f"windows per source, {sizes['eval_windows']} evaluation windows per set")]
    if args.part in ("all", "matrix"):
        matrix = cross_domain(load, calib, evals, config, args.device, runner=runner)
        lines += ["", matrix.table(), f"({time.perf_counter() - t0:.0f} s so far)"]
        emit(lines, len(lines), "calibration_study")
    if args.part in ("all", "sweep"):
        sweep = sample_sweep(load, windows["calib.austen"], sizes["sweep"], evals, config, args.device,
                             runner=runner)
        new = ["", sweep.table(), f"total {time.perf_counter() - t0:.0f} s"]
        lines += new
        emit(lines, len(new) if args.part == "all" else len(lines), "calibration_study")


if __name__ == "__main__":
    main()
