"""The standard protocol on the demo model: perplexity of FP, RTN and GPTQ variants.

    python benchmarks/protocol.py                 # full protocol on this machine's CPU
    python benchmarks/protocol.py --protocol quick
    python benchmarks/protocol.py --only "GPTQ 4b g128"   # one variant, e.g. to time it alone

On a GPU machine without the cached assets (e.g. a bare lent box): tokenize here,
carry the windows and the demo GGUF there, and run from them:

    python benchmarks/protocol.py --save-windows w.safetensors            # here
    python benchmarks/protocol.py --windows w.safetensors --gguf X.gguf --device cuda   # there

Prints the table (perplexity on each eval set, wall time of each quantization).
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gptq_lab import data
from gptq_lab.protocol import PROTOCOLS, format_table, protocol_windows, run_variants


def gguf_loader(path: Path, device: str):
    """Dequantize the GGUF once (float32, on CPU); each call returns a fresh copy on ``device``."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def load():
        model.load_state_dict(state)
        return model.to(device).eval()
    return load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="full")
    p.add_argument("--only", nargs="+", help="variant labels to run (default all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--save-windows", help="only tokenize: write calibration + eval windows here")
    p.add_argument("--windows", help="read the windows from this file instead of tokenizing")
    p.add_argument("--gguf", help="load the model from this GGUF file instead of the cache")
    args = p.parse_args()
    protocol = PROTOCOLS[args.protocol]
    if args.only:
        protocol = replace(protocol, variants=tuple(v for v in protocol.variants if v.label in args.only))
    if args.windows:
        tensors = load_file(args.windows)
        calib = tensors.pop("calibration")
        evals = {name: tensors[name] for name in protocol.eval_sets}
    else:
        calib, evals = protocol_windows(protocol, data.load_model("demo")[1])
    if args.save_windows:
        save_file({"calibration": calib, **evals}, args.save_windows)
        return
    load = (gguf_loader(Path(args.gguf), args.device) if args.gguf
            else lambda: data.load_model("demo", device=args.device)[0])
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {dev}", flush=True)
    t0 = time.perf_counter()
    rows = run_variants(load, calib, evals, protocol.variants, args.device,
                        on_row=lambda r: print(f"done {r.label}: {r.perplexity} quantize {r.quantize_seconds}",
                                               file=sys.stderr, flush=True))
    print(format_table(rows, protocol))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
