"""available_backends(): only the kernels that can run on this machine; forcing one still works."""
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
