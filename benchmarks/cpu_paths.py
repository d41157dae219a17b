"""Do GPTQ's losses depend on the CPU's code path? The demo model's per-layer sensitivity (GPTQ
loss of every linear at 2/3/4/8 bits from its calibration Hessian, 8 x 256 tokens as in the
notebooks) computed twice, each in a child process: with this CPU's own code paths, and with the
pinned ones nbval's kernels get (``notebooks/conftest.py``: AVX2, two threads). The table
compares them: summed loss per bit width, the largest per-layer difference, and the smallest
eigenvalue over the layers' Hessians (negative: H is not positive semi-definite).

    python benchmarks/cpu_paths.py          # ~6 min on 2 cores
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from run_notebook import missing_pins


def child(out: Path) -> None:
    """Sensitivity of the demo model here; saves {loss, eigmin} to ``out``."""
    import transformers

    from gptq_lab import data
    from gptq_lab.lab import Calibrator
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    model, tokenizer = data.load_model("demo")
    calib = Calibrator(tokenizer, ["emma", "mansfield_park"], n_samples=8, seqlen=256, seed=0)
    calib.collect(model, progress=False)
    sens = calib.sensitivity(model, progress=False)
    eigmin = {n: float(torch.linalg.eigvalsh(layer.hessian.double()).min())
              for n, layer in sens.layers.items()}
    torch.save({"loss": sens.loss, "eigmin": eigmin, "cpu": torch.backends.cpu.get_cpu_capability()}, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, env in (("own", dict(os.environ)), ("pinned", {**os.environ, **missing_pins()})):
            out = Path(tmp) / f"{label}.pt"
            subprocess.run([sys.executable, __file__, "--child", str(out)], env=env, check=True)
            runs[label] = torch.load(out)
    own, pinned = runs["own"], runs["pinned"]
    print(f"code paths: own {own['cpu']}, pinned {pinned['cpu']}; {len(own['loss'])} layers")
    print(f"{'bits':>4} {'loss own':>12} {'loss pinned':>12} {'total diff':>10} {'worst layer diff':>16}")
    for bits in (2, 3, 4, 8):
        a = {n: v[bits] for n, v in own["loss"].items()}
        b = {n: pinned["loss"][n][bits] for n in a}
        total_a, total_b = sum(a.values()), sum(b.values())
        worst = max(abs(a[n] - b[n]) / max(a[n], b[n]) for n in a)
        print(f"{bits:>4} {total_a:12.5g} {total_b:12.5g} {abs(total_a - total_b) / total_b:10.2%} "
              f"{worst:16.2%}")
    for label, run in runs.items():
        name = min(run["eigmin"], key=run["eigmin"].get)
        print(f"smallest eigenvalue of H ({label}): {run['eigmin'][name]:.3g} ({name})")


if __name__ == "__main__":
    main()
