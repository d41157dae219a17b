"""gptq.solve on the demo model's largest layer (mlp.down_proj, 576 x 1536), CPU seconds per solve.

    python benchmarks/solve_speed.py [--samples 32] [--repeats 3] [--solver-file old_gptq.py]

The Hessian comes from the demo model and the protocol's calibration (``--samples`` windows of
512 tokens). ``--solver-file`` times another version of gptq.py on the same layer and Hessian
(e.g. ``git show <commit>:gptq_lab/gptq.py > old.py``): it is loaded as a module of gptq_lab,
so its relative imports resolve. Prints a table: config, median seconds, min seconds.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from gptq_lab import QuantConfig
from gptq_lab.data import calibration_windows, load_model
from gptq_lab.hessians import collect_hessians

LAYER = "model.layers.3.mlp.down_proj"
CONFIGS = {"4-bit g128": QuantConfig(), "4-bit g128 act-order": QuantConfig(act_order=True),
           "3-bit g64": QuantConfig(bits=3, group_size=64), "4-bit per-channel": QuantConfig(group_size=-1)}


def load_solver(path: str | None):
    if path is None:
        from gptq_lab.gptq import solve
        return solve, "gptq_lab.gptq (this checkout)"
    spec = importlib.util.spec_from_file_location("gptq_lab._solver_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.solve, path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--solver-file", default=None)
    args = ap.parse_args()
    solve, label = load_solver(args.solver_file)
    model, tok = load_model("demo")
    ids = calibration_windows(tok, n_samples=args.samples, seqlen=512)
    hessian = collect_hessians(model, ids, names=[LAYER], device="cpu")[LAYER]
    weight = model.get_submodule(LAYER).weight.detach().float()
    lines = [(f"solver: {label}; layer {LAYER} {tuple(weight.shape)}; torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs"), f"{'config':<24}{'median s':>10}{'min s':>10}{'loss':>12}"]
    for name, cfg in CONFIGS.items():
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = solve(weight, hessian, cfg)
            times.append(time.perf_counter() - t0)
        lines.append(f"{name:<24}{statistics.median(times):>10.3f}{min(times):>10.3f}{res.loss:>12.5g}")
    print("\n".join(lines))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "solve_speed.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
