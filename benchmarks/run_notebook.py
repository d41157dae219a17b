"""Execute a tutorial notebook in a real Jupyter kernel and keep the executed copy.

    python benchmarks/run_notebook.py notebooks/06_decode_speed.ipynb       # -> $OUT or results/
    python benchmarks/run_notebook.py notebooks/06_decode_speed.ipynb --suffix h100 --timeout 1800
    python benchmarks/run_notebook.py notebooks/02_how_gptq_works.ipynb --inplace  # new stored outputs

For figures that only a GPU gives (notebook 06's decode speed): the notebooks in the repository
keep their CPU outputs, which nbval compares in CI; the GPU run's copy goes to
``$OUT/<name>_<suffix>.ipynb`` (``benchmarks/results/`` when OUT is unset), written even when a
cell fails, with the error in it. ``--inplace`` records a notebook's stored outputs instead: it
runs the kernel with the CPU settings that nbval's runs use (``notebooks/conftest.py``'s
``missing_pins``) and writes the notebook back only when every cell ran. The code cells' text
outputs are printed too. Needs nbclient and ipykernel (the ``lab`` extra).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path


def text_outputs(nb) -> list[str]:
    """Each code cell's stream, result and error text, in order."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            out.append(o.get("text") or o.get("data", {}).get("text/plain", "")
                       or f"{o.get('ename', '')}: {o.get('evalue', '')}")
    return out


def missing_pins() -> dict[str, str]:
    """What nbval's kernels get added to this environment (notebooks/conftest.py), for
    recording outputs the way they are compared."""
    path = Path(__file__).parent.parent / "notebooks" / "conftest.py"
    spec = importlib.util.spec_from_file_location("notebooks_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.missing_pins()


def main(argv=None) -> int:
    import nbclient
    import nbformat
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--suffix", default="gpu", help="appended to the executed copy's name")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    ap.add_argument("--inplace", action="store_true",
                    help="record the notebook's stored outputs (CI's pinned CPU settings)")
    args = ap.parse_args(argv)
    nb = nbformat.read(args.notebook, as_version=4)
    if args.inplace:
        os.environ.update(missing_pins())   # the kernel inherits it
        dest = args.notebook
    else:
        dest = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
        dest = dest / f"{args.notebook.stem}_{args.suffix}.ipynb"
    t0, failed, done = time.perf_counter(), None, False
    try:
        nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(args.notebook.parent)}}).execute()
        done = True
    except Exception as e:  # noqa: BLE001 -- keep the partial notebook, report, exit non-zero
        last = (str(e).strip().splitlines() or [""])[-1]
        failed = f"{type(e).__name__}: {last[:300]}"
    finally:
        from gptq_lab.atomic import atomic_write_text
        if args.inplace:
            nb.metadata.pop("widgets", None)   # widget state: large, and re-made when run
        if done or not args.inplace:    # an unfinished run never replaces the stored notebook
            atomic_write_text(dest, nbformat.writes(nb))
    print("\n".join(text_outputs(nb)))
    print(f"{args.notebook} executed in {time.perf_counter() - t0:.0f} s -> {dest}"
          + (f"; FAILED: {failed}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
