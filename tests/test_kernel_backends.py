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


def _hf_kernels_installed() -> bool:
    """Whether Hugging Face's ``kernels`` package is installed (transformers 5.2x needs it)."""
    from importlib.machinery import PathFinder
    root = str(Path(__file__).resolve().parent.parent)
    return PathFinder.find_spec("kernels", [p for p in sys.path if str(Path(p or ".").resolve()) != root]) is not None


@pytest.mark.parametrize("first", ["gptq_lab.kernels", "kernels"])
def test_the_folder_imported_as_kernels_never_runs_twice(first):
    """With the repository root on sys.path, kernels/ is also reachable as a top-level package.
    Where Hugging Face's ``kernels`` is installed, that name must give its package (transformers
    imports names from it); elsewhere gptq_lab.kernels' own modules. Never a second copy of
    ours: it re-registered the custom ops, and compiled code then used that copy's tuned kernel
    choices instead of the ones eager calls use (a GPU test saw 1-ulp differences)."""
    code = (f"{_ROOT_ON_PATH}; import {first}\n"
            "import gptq_lab.kernels as real, kernels\n"
            "print(kernels is real, kernels.__file__ == real.__file__,"
            " sum(m.__file__ == real.ops.__file__ for m in list(sys.modules.values())"
            " if getattr(m, '__file__', None)) <= 1)")
    hf = _hf_kernels_installed()
    assert _run(code) == [str(not hf), str(not hf), "True"]


def test_transformers_kernels_check_and_hub_kernels_import():
    """transformers checks for Hugging Face's ``kernels`` (``is_kernels_available``) and, where
    it is installed, imports names from it: with the repository root on sys.path first, this
    folder must not stand in for it (the demo model's tokenizer failed to load so)."""
    code = (f"{_ROOT_ON_PATH}; import gptq_lab.kernels as real\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "ok = is_kernels_available()\n"
            "import transformers.integrations.hub_kernels\n"
            "print(ok, sys.modules.get('kernels') is real)")
    hf = _hf_kernels_installed()
    assert _run(code) == [str(hf), str(not hf)]


_ROOT_ON_PATH = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})"


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()
