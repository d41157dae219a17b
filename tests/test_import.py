"""`import gptq_lab` stays light: no CUDA initialisation, no notebook libraries."""
import subprocess
import sys


def test_import_touches_no_cuda_and_no_notebook_libraries():
    code = (
        "import sys, torch, gptq_lab, gptq_lab.kernels\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "bad = [m for m in ('plotly', 'ipywidgets', 'pandas', 'IPython') if m in sys.modules]\n"
        "assert not bad, f'imported {bad}'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_data_is_reachable_from_the_package():
    """The README's `gptq_lab.data.load_model("demo")` after a plain `import gptq_lab`."""
    import gptq_lab
    assert callable(gptq_lab.data.load_model)
