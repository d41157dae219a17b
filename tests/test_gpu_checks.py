"""benchmarks/gpu_checks.sh, the script a GPU session runs first: its step handling on the CPU."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks.sh"


def run(*steps: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *steps], env=env, capture_output=True, text=True, check=False,
                          timeout=600)


def test_unknown_step_is_refused_before_anything_runs(tmp_path):
    done = run("tests", "bogus", out=tmp_path / "out")
    assert done.returncode == 2
    assert "unknown step bogus" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_step_writes_its_result_with_a_header_and_exit_code(tmp_path):
    done = run("tests", out=tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "tests.txt").read_text()
    header, command, *_, last = text.splitlines()
    assert header.startswith("# ") and f"torch {__import__('torch').__version__}" in header
    assert command.endswith("-m pytest -q -o addopts= -m gpu ../tests")
    assert last.startswith("# exit ") and last.split()[2] in ("0", "5")   # no GPU: all skipped
