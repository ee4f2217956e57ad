#!/usr/bin/env bash
# The GPU checks, as one script for a machine with one CUDA device (run from the repo root).
# Peers' wheels (captum, zennit, grad-cam, ttach) may wait in .whl/; everything else must be
# installed. Logs go to $OUT (default ./gpu-check). Each step has its own time limit, so one
# slow step cannot eat the next ones.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "--- $name: exit $rc in $((SECONDS - start)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}
nvidia-smi -L
$PY -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))'
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-deps --no-build-isolation --no-index . >"$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail "$OUT/install.log"; }
step tests 170 $PY -m pytest -q -p no:cacheprovider -n 8 tests
TAIL=12 step audit_small 60 $PY benchmarks/audit.py --device cuda --no-quantus --phases
TAIL=12 step audit_large 90 $PY benchmarks/audit.py --device cuda --no-quantus --phases --batch 32 --size 224
TAIL=8 step memory 60 $PY benchmarks/memory.py --device cuda --batch 32 --size 112
TAIL=16 step methods 90 $PY benchmarks/methods.py --device cuda --repeats 5
TAIL=6 step similarity 40 $PY benchmarks/similarity.py --device cuda --metrics ssim spearman hog
TAIL=6 step examples 150 $PY -m pytest -q -p no:cacheprovider examples
