#!/usr/bin/env bash
# The GPU check in one command (issue 17): install the carried wheels into a throwaway target, then run
# every phase of benchmarks/gpu/check.py and write gpu_report.md, gpu_results.json and gpu_logs.txt
# to OUT_DIR. Nothing is downloaded: the wheels come from benchmarks/gpu/prepare_wheels.py, run where
# the package index is reachable, and travel with the working tree (device tool: carry
# ["benchmarks/gpu/wheels"]).
#
#   bash benchmarks/gpu/run.sh "$OUT"              # the GPU machine (Python 3.12, torch 2.11, triton 3.6): the tests and
#                                                   # issue 37's 1.5x cell on the GPU server (limits 480 s: one session)
#   bash benchmarks/gpu/run.sh OUT_DIR --dry-run    # any machine: the same steps on CPU, tiny sizes
#   bash benchmarks/gpu/run.sh "$OUT" --only kernel,sampler,graphs,drift   # measured on 2026-11-30 (~150 s together)
#   bash benchmarks/gpu/run.sh "$OUT" --only server       # a device call, and a session, of its own (~9 minutes)
#
# DDPM_GPU_WHEELS overrides the wheels folder; PYTHON the interpreter.
set -uo pipefail
OUT=${1:?usage: run.sh OUT_DIR [--dry-run]}
shift
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WHEELS=${DDPM_GPU_WHEELS:-$ROOT/benchmarks/gpu/wheels}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
TARGET=$(mktemp -d "${TMPDIR:-/tmp}/ddpm-gpu-site.XXXXXX")
trap 'rm -rf "$TARGET"' EXIT

start=$(date +%s)
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "no wheels in $WHEELS: run python benchmarks/gpu/prepare_wheels.py first" >&2
  exit 2
fi
# exactly the carried wheels, no resolution (the machine's own torch, numpy, ... stay); plain unzip
# where that machine's Python has no pip
if ! "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$TARGET" "$WHEELS"/*.whl 2>"$OUT/install.err"; then
  echo "pip install failed ($(tail -1 "$OUT/install.err")); unpacking the wheels instead" >&2
  for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$TARGET" || exit 2; done
fi
rm -f "$OUT/install.err"
echo "[gpu-check] installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $TARGET in $(( $(date +%s) - start )) s"

export PYTHONPATH="$ROOT:$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export DDPM_COMPILE=${DDPM_COMPILE:-auto} PYTHONDONTWRITEBYTECODE=1
cd "$ROOT"
"$PY" benchmarks/gpu/check.py --out "$OUT" --wheels "$WHEELS" "$@"
rc=$?
echo "[gpu-check] done in $(( $(date +%s) - start )) s (exit $rc); report: $OUT/gpu_report.md"
exit $rc
