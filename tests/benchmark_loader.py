"""Load a script of benchmarks/ as a module in tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def load_benchmark(name: str, monkeypatch, out_dir: Path):
    """benchmarks/<name>.py as a module (benchmarks/ on sys.path: they import each other), with
    $OUT set to ``out_dir``."""
    bench_dir = Path(__file__).parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", bench_dir / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(out_dir))
    return bench
