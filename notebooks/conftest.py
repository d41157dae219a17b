"""nbval runs each notebook in a fresh Jupyter kernel, which inherits pytest's environment when
it starts (in the notebook's first cell's setup).

The notebooks print GPTQ losses, perplexities and code agreement, and those depend on the order in
which float32 sums are taken: MKL, oneDNN and PyTorch's own CPU kernels pick code paths by the
instruction set of the CPU (AVX2 vs AVX-512) and split work by thread count, and GPTQ's rounding
can turn a last-bit difference into a different code. So the stored outputs are recorded, and
compared, with the same code paths on every x86 machine: AVX2 everywhere and two threads (CI's
cores). Only the kernels get these settings, never the pytest process itself (MKL and oneDNN read
them lazily, so setting them here would change its numerics half-way through the run, and its
subprocesses'). A variable already set is left alone. Caution: with torch 2.13,
ONEDNN_MAX_CPU_ISA=AVX2 corrupts the heap in inductor-compiled CPU code (tests/test_fuse.py's
compiled test aborts in _int_malloc under it); the notebooks compile nothing on a CPU.
``benchmarks/run_notebook.py --inplace`` records outputs with the same settings.
"""
from __future__ import annotations

import os

import pytest

PINNED_ENV = {
    "MKL_CBWR": "AVX2",                # MKL's conditional numerical reproducibility
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",     # PyTorch's vectorized CPU kernels
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}


def missing_pins(environ=os.environ) -> dict[str, str]:
    """The pinned settings ``environ`` does not set yet (a variable already set is left alone)."""
    return {name: value for name, value in PINNED_ENV.items() if name not in environ}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """The pinned settings while a notebook's kernel may start; pytest's own afterwards."""
    added = missing_pins()
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
