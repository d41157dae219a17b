"""Mixed precision at a storage budget: the planner's mix against uniform and random allocations.

    python benchmarks/mixed_precision.py                    # full: 3.5 bits, protocol calibration
    python benchmarks/mixed_precision.py --quick            # CPU smoke test
    python benchmarks/mixed_precision.py --kl               # also plan from measured KL per layer

Steps: float-model Hessians of the protocol calibration (Austen, 128 x 512) -> GPTQ loss of every
linear at 2/3/4/8 bits (g128 sym) -> plans at --target average *storage* bits per weight (codes +
zeros + fp16 scales + g_idx, as the checkpoint stores them) -> GPTQ with each plan's per-module
overrides -> perplexity on the protocol's three evaluation sets. Rows: planner (GPTQ loss),
planner (KL, with --kl), random allocations filling the same budget (seeds 0..--random-seeds-1,
and their mean), uniform 3-bit and uniform 4-bit. The table file is rewritten after each row.
Windows/GGUF/device options as in benchmarks/protocol.py (one windows file serves both scripts):

    python benchmarks/calibration_study.py --save-windows study.safetensors                   # here
    python benchmarks/mixed_precision.py --windows study.safetensors --gguf X.gguf --device cuda --kl

Prints the table and writes it to $OUT/mixed_precision.txt when OUT is set.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_study import add_common_args, device_line, emit, parse

from gptq_lab import QuantConfig
from gptq_lab.hessians import collect_hessians
from gptq_lab.planner import plan, random_plan, uniform_plan
from gptq_lab.sensitivity import layer_sensitivity, output_sensitivity
from gptq_lab.study import Runner, calibration_sets, eval_sets

BASE = QuantConfig(bits=4, group_size=128, sym=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--target", type=float, default=3.5, help="average storage bits per weight")
    p.add_argument("--random-seeds", type=int, help="random allocations (default 3; 1 with --quick)")
    p.add_argument("--kl", action="store_true", help="also measure KL per (layer, bits) and plan from it")
    p.add_argument("--skip-uniform", action="store_true",
                   help="no uniform 3/4-bit rows (they equal protocol.py's GPTQ 3b/4b g128 rows)")
    args, sizes, windows, load = parse(p)
    if load is None:
        return
    t0 = time.perf_counter()
    calib = calibration_sets(windows, sizes["n_samples"])["austen"]
    evals = eval_sets(windows, sizes["eval_windows"])
    model = load()
    hessians = collect_hessians(model, calib, device=args.device)
    t_sens = time.perf_counter()
    sens = layer_sensitivity(model, hessians, config=BASE)
    lines = [device_line(args.device),
             (f"{'quick' if args.quick else 'full'}: calibration {calib.shape[0]} x {calib.shape[1]} tokens "
             f"(Austen), {sizes['eval_windows']} evaluation windows per set; GPTQ g128 sym"),
             (f"sensitivity: GPTQ loss of {len(sens.names)} layers x bits {sens.bits} in "
             f"{time.perf_counter() - t_sens:.0f} s")]
    plans = [plan(sens, target_bits=args.target, label=f"planner {args.target:g} (GPTQ loss)")]
    if args.kl:
        kl_ids = windows["kl"][:1, :32] if args.quick else windows["kl"]    # quick: 840 forwards of 32 tokens
        t_kl = time.perf_counter()
        output_sensitivity(model, sens, kl_ids)
        lines.append(f"sensitivity: KL on {kl_ids.shape[0]} x {kl_ids.shape[1]} held-out tokens in "
                     f"{time.perf_counter() - t_kl:.0f} s")
        plans.append(plan(sens, target_bits=args.target, measure="kl", label=f"planner {args.target:g} (KL)"))
    del model, hessians
    seeds = args.random_seeds if args.random_seeds is not None else (1 if args.quick else 3)
    plans += [random_plan(sens, args.target, seed=s) for s in range(seeds)]
    if not args.skip_uniform:                         # last: the protocol table has them too
        plans += [uniform_plan(sens, 3), uniform_plan(sens, 4)]
    runner = Runner(load, evals, args.device,
                    on_row=lambda r: print(f"done {r.label}: {r.perplexity}", file=sys.stderr, flush=True))
    lines += ["", *(f"  {pl.summary()}" for pl in plans)]
    fp, rows = runner.run("FP", None, None), []
    for pl in plans:                                  # the file is rewritten after each row
        rows.append((pl, runner.run(pl.label, calib, pl.config())))
        done = [*lines, "", format_rows(rows, fp, list(evals)), f"({time.perf_counter() - t0:.0f} s so far)"]
        emit(done, 0, "mixed_precision")
    emit([*lines, "", format_rows(rows, fp, list(evals)), f"total {time.perf_counter() - t0:.0f} s"],
         len(lines) + 3, "mixed_precision")


def format_rows(rows, fp, names) -> str:
    head = (f"{'allocation':<30}{'storage b/w':>12}{'code b/w':>10}{'pred. loss':>12}"
            + "".join(f"{n:>21}" for n in names))
    out = ["perplexity (lower is better); b/w = bits per weight over the quantized linears", head, "-" * len(head)]
    out.append(f"{'FP':<30}{'':>12}{'':>10}{'':>12}" + "".join(f"{fp.perplexity[n]:>21.3f}" for n in names))
    for pl, r in rows:
        out.append(f"{pl.label:<30}{pl.average_bits:>12.3f}{pl.average_code_bits:>10.3f}"
                   f"{pl.predicted_damage:>12.4g}" + "".join(f"{r.perplexity[n]:>21.3f}" for n in names))
    randoms = [r for pl, r in rows if pl.label.startswith("random")]
    if len(randoms) > 1:
        mean = {n: statistics.mean(r.perplexity[n] for r in randoms) for n in names}
        out.append(f"{f'random, mean of {len(randoms)} seeds':<30}{'':>12}{'':>10}{'':>12}"
                   + "".join(f"{mean[n]:>21.3f}" for n in names))
    return "\n".join(out)


if __name__ == "__main__":
    main()
