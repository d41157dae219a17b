"""The standard protocol on the demo model: perplexity of FP, RTN and GPTQ variants.

    python benchmarks/protocol.py                 # full protocol (about 40 min on a 2-core CPU)
    python benchmarks/protocol.py --protocol quick
    python benchmarks/protocol.py --only "GPTQ 4b g128"   # one variant, e.g. to time it alone

Prints the table (perplexity on each eval set, wall time of each quantization).
"""
import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from gptq_lab.protocol import PROTOCOLS, format_table, run_protocol


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="full")
    p.add_argument("--only", nargs="+", help="variant labels to run (default all)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    protocol = PROTOCOLS[args.protocol]
    if args.only:
        protocol = replace(protocol, variants=tuple(v for v in protocol.variants if v.label in args.only))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    t0 = time.perf_counter()
    rows = run_protocol(protocol, on_row=lambda r: print(f"done {r.label}: {r.perplexity} "
                                                         f"quantize {r.quantize_seconds}", file=sys.stderr,
                                                         flush=True))
    print(format_table(rows, protocol))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
