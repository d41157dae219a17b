"""LayerInspector: seconds per control change on the demo model's largest layer (CPU).

Target (DESIGN.md): re-solving one cached layer of the demo model takes <= 1 s, so every
control of the inspector (bits, group size, sym, act-order, damp) must update all six
figures in under a second for mlp.down_proj (576 x 1536).

    python benchmarks/inspector_speed.py [--layer model.layers.3.mlp.down_proj] [--samples 32]
                                         [--repeats 3]

Each change is made the way a user makes it: by setting the widget's ``.value``. Before
each timed change the layer's results and inverse-Hessian factors are forgotten, so every
change really re-solves (a new factor, the column loop, RTN and both output errors) and
redraws the figures that depend on the change (the eigendecomposition stays cached). The
engine's ``gptq.solve`` on the same layer is timed for reference. Without the demo assets the layer is random (same shape) and the table says so.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptq_lab import QuantConfig, solve
from gptq_lab.errors import AssetMissingError
from gptq_lab.hessians import collect_hessians

CHANGES = [  # (control, values cycled through)
    ("bits", [3, 2, 4]),
    ("group_size", [64, 32, 128]),
    ("sym", [False, True]),
    ("act_order", [True, False]),
    ("damp", [10 ** -1.5, 10 ** -1.25, 10 ** -1.75, 0.01]),
]


def demo_layer(layer: str, samples: int):
    """(model, {layer: H}, description) from the demo assets, or a random stand-in."""
    try:
        from gptq_lab.data import calibration_windows, load_model
        model, tok = load_model("demo")
        ids = calibration_windows(tok, n_samples=samples, seqlen=512)
        t0 = time.perf_counter()
        hessians = collect_hessians(model, ids, names=[layer], device="cpu")
        return model, hessians, (f"demo model, {samples} x 512 protocol windows "
                                 f"(Hessian collected in {time.perf_counter() - t0:.1f}s)")
    except AssetMissingError as e:
        import transformers as tf
        print(f"demo assets missing ({e}); using a random layer of the same shape")
        cfg = tf.LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                             num_attention_heads=9, num_key_value_heads=3)
        model = tf.LlamaForCausalLM(cfg).eval()
        x = torch.randn(4096, 1536) * torch.linspace(0.05, 3, 1536)
        return model, {layer: 2 * x.T @ x / 4096}, "RANDOM stand-in layer (no demo assets)"


def cold(insp) -> None:
    """Forget the layer's solved results and inverse-Hessian factors (not its eigenvalues)."""
    insp.cached._results.clear()
    insp.cached._factors.clear()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layer", default="model.layers.3.mlp.down_proj")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from gptq_lab.lab import LayerInspector
    model, hessians, what = demo_layer(args.layer, args.samples)
    config = QuantConfig(bits=4, group_size=128, sym=True, damp=0.01)
    t0 = time.perf_counter()
    insp = LayerInspector(model, hessians, args.layer, config)
    t1 = time.perf_counter()
    _ = insp.widget                                  # built on first access
    t2 = time.perf_counter()
    w = insp.cached.weight
    engine = []
    for _ in range(2):
        s = time.perf_counter()
        solve(w, hessians[args.layer], config)
        engine.append(time.perf_counter() - s)

    print(f"\nLayerInspector speed: {args.layer} [{w.shape[0]} x {w.shape[1]}], {what}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"open layer (weight, Hessian, first solve, RTN): {t1 - t0:.2f}s; build widgets incl. "
          f"eigendecomposition: {t2 - t1:.2f}s")
    print(f"engine gptq.solve, same layer, 4-bit g128: median {statistics.median(engine):.3f}s\n")
    head = f"{'control':<11} {'change':<17} {'solve s':>8} {'error s':>8} {'figures s':>9} " \
           f"{'total s':>8} {'max s':>7}  < 1 s"
    print(head)
    print("-" * len(head))
    worst = 0.0
    for name, values in CHANGES:
        ctl = insp.controls[name]
        for value in values:
            rows = []
            for _ in range(args.repeats):
                before = ctl.value
                cold(insp)                                         # force a real re-solve
                s = time.perf_counter()
                ctl.value = value
                total = time.perf_counter() - s
                rows.append({**insp.timings, "wall": total})
                if _ != args.repeats - 1:                        # go back to repeat the change
                    cold(insp)
                    ctl.value = before
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            mx = max(r["wall"] for r in rows)
            worst = max(worst, med["wall"])
            label = f"{before!s:.6} -> {value!s:.6}" if not isinstance(value, float) else f"-> {value:.4f}"
            ok = "yes" if med["wall"] < 1 else "NO"
            print(f"{name:<11} {label:<17} {med['solve_s']:8.3f} {med['error_s']:8.3f} "
                  f"{med['figures_s']:9.3f} {med['wall']:8.3f} {mx:7.3f}  {ok}")
    print(f"\nworst median per change: {worst:.3f}s ({'meets' if worst < 1 else 'misses'} the 1 s target)")


if __name__ == "__main__":
    main()
