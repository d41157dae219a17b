"""available_backends(): only the kernels that can run on this machine; forcing one still works."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptq_lab import kernels


def test_without_cuda_only_the_reference_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.available_backends() == ["reference"]


def test_triton_runs_under_its_interpreter_and_everything_with_cuda(monkeypatch):
    if "triton" not in kernels.BACKENDS:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.available_backends() == ["reference", "triton"]
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels.available_backends() == list(kernels.BACKENDS)


def test_unknown_backend_names_what_runs_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match=r"backend='nope' is not available; available: \['reference'\]"):
        kernels.gptq_matmul(x, None, None, None, None, 4, backend="nope")


@pytest.mark.parametrize("first", ["gptq_lab.kernels", "kernels.ops"])
def test_the_folder_imported_as_kernels_is_gptq_lab_kernels(first):
    """With the repository root on sys.path, kernels/ is also reachable as a top-level package
    (transformers imports it so, see the next test). It must hand out gptq_lab.kernels' own
    modules: a second copy re-registered the custom ops, and compiled code then used that copy's
    tuned kernel choices instead of the ones eager calls use (a GPU test saw 1-ulp differences)."""
    code = (f"{_ROOT_ON_PATH}; import {first}\n"
            "import gptq_lab.kernels as real, kernels.ops, kernels.triton_pack\n"
            "print(sys.modules['kernels'] is real, kernels.ops is real.ops,"
            " kernels.triton_pack is real.triton_pack, sys.modules['kernels.reference'] is real.reference)")
    assert _run(code) == ["True"] * 4


def test_transformers_kernels_check_gets_gptq_lab_kernels():
    """transformers' check for Hugging Face's ``kernels`` package imports a ``kernels`` found on
    sys.path without distribution metadata: with the repository root on sys.path, this folder.
    That is how the second copy came about (while a Llama model was built)."""
    code = (f"{_ROOT_ON_PATH}; import gptq_lab.kernels as real\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "is_kernels_available()\n"
            "print('kernels' in sys.modules, sys.modules.get('kernels') is real)")
    assert _run(code) == ["True", "True"]


_ROOT_ON_PATH = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})"


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()
