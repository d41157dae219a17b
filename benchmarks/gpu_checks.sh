#!/usr/bin/env bash
# The GPU measurements the open kernel issues wait for, on a bare GPU machine that has torch,
# triton, transformers and nvcc but no network (the lent H100/H200 machines).
#
#   benchmarks/gpu_checks.sh                       # every step below, in order
#   benchmarks/gpu_checks.sh w4-input prefill-ab   # some of them
#
# Before: `python3 -m pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl` where there is a
# network (CUTLASS's headers for the W4 GEMM; .whl/ is git-ignored, carry it to the machine).
# Each step writes $OUT/<step>.txt (OUT defaults to ./out) headed by the card, the versions and
# the commit, and has its own time limit, so one slow step cannot take the others' time. The
# first W4 step builds the GEMM (about 2 minutes on 16 cores); later steps reuse the build
# (under build/, which a warm machine keeps between calls). Every step's limit fits one 10-minute
# device call: run them in groups, e.g. `tests`, then `gluon w4-input w4-block`, then
# `w4-batches prefill-ab`, then `decode-8b` and `kernels` one call each.
#
# Steps:
#   tests        the GPU tests (pytest -m gpu): every kernel against the torch reference
#   gluon        the trial Gluon kernel (kernels/gluon_mma.py) against fp16, Triton and the CUDA
#                kernel at 1-64 rows on three shapes (a few minutes; the full table is `kernels`)
#   w4-input     x's permuted copy for the W4 GEMM alone, Triton against torch (no GEMM build)
#   w4-block     one 7B block at M = 2048: fp16, dequantize + cuBLAS, the W4 GEMM's whole call
#   w4-batches   the W4 GEMM's whole call at 16-256 rows on three shapes (where it overtakes the
#                decode kernel and Triton; issue #6's batch 64 and 256 targets)
#   prefill-ab   7B prefill of 2048 tokens: fp16, int4 with the W4 GEMM off and on, alternated
#   decode-8b    the GQA Llama-3-8B shape end to end, each model in its own process
#   kernels      the kernels table of issues #6 and #7 (every backend and the Gluon kernel,
#                batches 1-256)
set -uo pipefail
cd "$(dirname "$0")/.."
ALL=(tests gluon w4-input w4-block w4-batches prefill-ab decode-8b kernels)
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=("${ALL[@]}")
for s in "${STEPS[@]}"; do
  [[ " ${ALL[*]} " == *" $s "* ]] || { echo "unknown step $s; the steps are: ${ALL[*]}" >&2; exit 2; }
done
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
case $PY in /*) ;; */*) PY=$PWD/$PY ;; esac          # the steps run from benchmarks/

if ! "$PY" -c "import gptq_lab" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/gptq_lab_site .whl/*.whl
    export PYTHONPATH=/tmp/gptq_lab_site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/ext}

header() {
  "$PY" - <<'EOF'
import subprocess, torch, triton
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"# {card} | torch {torch.__version__} | triton {triton.__version__} | commit {commit or '?'}")
EOF
}

# step NAME LIMIT_SECONDS COMMAND...: run it from benchmarks/ into $OUT/NAME.txt
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" >&2
  { header; echo "# $*"; } >"$OUT/$name.txt"
  local t0=$SECONDS
  (cd benchmarks && timeout "$limit" "$@") >>"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "# exit $rc after $((SECONDS - t0)) s" >>"$OUT/$name.txt"
  tail -n 15 "$OUT/$name.txt" >&2
}

run() {
  case $1 in
    tests) step tests 560 "$PY" -m pytest -q -o addopts="" -m gpu ../tests ;;
    gluon) step gluon 400 "$PY" kernel_speed.py --gluon --shapes 4096x4096,8192x8192,8192x28672 --batches 1,8,16,32,64 ;;
    w4-input) step w4-input 200 "$PY" w4_gemm.py --input 2048 ;;
    w4-block) step w4-block 400 "$PY" w4_gemm.py --shapes "" --prefill-m 2048 ;;
    w4-batches) step w4-batches 400 "$PY" w4_gemm.py --shapes 8192x8192,8192x28672,4096x11008 --batches 16,32,64,128,256 --prefill-m 0 ;;
    prefill-ab) step prefill-ab 560 "$PY" decode.py --prefill-ab 9 --shapes 7b --kernels cuda+fuse --w4-ab ;;
    decode-8b) step decode-8b 560 "$PY" decode.py --isolate --shapes 8b --paths fast --kernels cuda+fuse --batches none ;;
    kernels) step kernels 560 "$PY" kernel_speed.py --gluon ;;
  esac
}

for s in "${STEPS[@]}"; do run "$s"; done
echo "results in $OUT" >&2
