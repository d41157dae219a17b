"""nbval runs each notebook in a fresh Jupyter kernel, which inherits this process's environment.

The notebooks print GPTQ losses, perplexities and code agreement, and those depend on the order in
which float32 sums are taken: MKL, oneDNN and PyTorch's own CPU kernels pick code paths by the
instruction set of the CPU (AVX2 vs AVX-512) and split work by thread count, and GPTQ's rounding
turns last-bit differences into visibly different codes a few layers later. So the stored outputs
are recorded, and compared, with the same code paths on every x86 machine: AVX2 everywhere and two
threads (CI's cores). A variable already set is left alone. ``benchmarks/run_notebook.py
--inplace`` records outputs with the same settings.
"""
from __future__ import annotations

import os

PINNED_ENV = {
    "MKL_CBWR": "AVX2",                # MKL's conditional numerical reproducibility
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",     # PyTorch's vectorized CPU kernels
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}

for _name, _value in PINNED_ENV.items():
    os.environ.setdefault(_name, _value)
