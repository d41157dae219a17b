"""Why GPTQ calibrated on novels is worse than RTN on the Python docs (demo model, 4-bit g128).

    python benchmarks/domain_shift.py               # quick protocol on the CPU, ~4 minutes

Quantizes the demo model with RTN and with GPTQ (the quick protocol's novel calibration), then:
1. per linear layer, the output error E||dW x||^2 = 1/2 tr(dW H dW^T) on the float model's inputs
   from the calibration text and from held-out Python-docs windows (``study.heldout_windows``),
   GPTQ against RTN; the layers where GPTQ loses most on Python are listed;
2. for the worst layer, the part of that error that is a constant shift, ||dW mean(x)||^2: GPTQ
   compensates rounding errors through columns whose inputs are large and nearly constant, which
   cancels at the calibration text's mean input and not at another domain's;
3. perplexity of FP, RTN, GPTQ, and GPTQ with that one layer rounded to nearest instead.
"""
from __future__ import annotations

import argparse
import time

import torch

from gptq_lab import QuantConfig, data, quantize_model, study
from gptq_lab.arch import set_weight_matrix, weight_matrix
from gptq_lab.checks import linear_names
from gptq_lab.eval import perplexity
from gptq_lab.hessians import collect_hessians, constant_shift, output_error
from gptq_lab.protocol import PROTOCOLS, protocol_windows


def linears(model) -> dict:
    return {n: model.get_submodule(n) for n in linear_names(model)}


def weights(model) -> dict[str, torch.Tensor]:
    return {n: weight_matrix(m).detach().float().clone() for n, m in linears(model).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16, help="windows per domain for the layer errors")
    ap.add_argument("--top", type=int, default=5, help="layers listed")
    args = ap.parse_args()
    t0 = time.time()
    protocol = PROTOCOLS["quick"]
    model, tok = data.load_model("demo")
    calib, evals = protocol_windows(protocol, tok)
    python = study.heldout_windows(tok, ("python_docs",), args.windows, protocol.seqlen, 0)
    domains = {"novels": calib[:args.windows], "python": python}
    print(f"demo model, 4-bit g128; calibration: quick protocol ({calib.shape[0]} x {calib.shape[1]} "
          f"novel tokens); layer errors on {args.windows} windows per domain", flush=True)

    fp = weights(model)
    means = {d: {} for d in domains}
    hessians = {d: collect_hessians(model, ids, compute_dtype=torch.float32, means=means[d])
                for d, ids in domains.items()}
    ppl = {"FP": {s: perplexity(model, w) for s, w in evals.items()}}
    config = QuantConfig(bits=4, group_size=128)
    quantize_model(model, method="rtn", config=config, progress=False)
    rtn = weights(model)
    ppl["RTN"] = {s: perplexity(model, w) for s, w in evals.items()}
    for n, m in linears(model).items():
        set_weight_matrix(m, fp[n])
    quantize_model(model, calib, config, progress=False)
    gptq = weights(model)
    ppl["GPTQ"] = {s: perplexity(model, w) for s, w in evals.items()}

    def err(q, n, d):
        return float(output_error(fp[n], q[n], hessians[d][n]).sum())

    ratio = {n: err(gptq, n, "python") / err(rtn, n, "python") for n in fp}
    worst = sorted(fp, key=lambda n: -ratio[n])[:args.top]
    print("\nlayer output error E||dW x||^2, GPTQ / RTN (float inputs)")
    print(f"{'layer':<36}{'novels':>10}{'python':>10}{'GPTQ python':>14}{'RTN python':>12}")
    for n in worst:
        print(f"{n:<36}{err(gptq, n, 'novels') / err(rtn, n, 'novels'):>9.2f}x{ratio[n]:>9.2f}x"
              f"{err(gptq, n, 'python'):>14.4g}{err(rtn, n, 'python'):>12.4g}")

    name = worst[0]
    print(f"\n{name}: constant-shift part ||dW mean(x)||^2 of E||dW x||^2 (hessians.constant_shift)")
    for d in domains:
        line = f"  {d:<8}"
        for label, q in (("RTN", rtn), ("GPTQ", gptq)):
            line += f"  {label} {constant_shift(fp[name], q[name], means[d][name]):10.4g} of {err(q, name, d):10.4g}"
        print(line)

    set_weight_matrix(linears(model)[name], rtn[name])
    ppl[f"GPTQ, RTN for {name}"] = {s: perplexity(model, w) for s, w in evals.items()}
    print("\nperplexity (quick protocol)")
    print(f"{'variant':<52}" + "".join(f"{s:>22}" for s in evals))
    for label, row in ppl.items():
        print(f"{label:<52}" + "".join(f"{row[s]:>22.3f}" for s in evals))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
