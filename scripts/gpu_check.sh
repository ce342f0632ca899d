#!/usr/bin/env bash
# The GPU checks of issue 30 in one run (scripts/gpu_check.py: bf16 ZeRO-2/3 training, packed vs padded
# forward, GradCache, one GPU vs one CPU evaluation actor, peak memory), ending with one RESULT line.
# On a machine whose torch sees no CUDA device it says "no GPU" and exits 0 without a RESULT line.
#   bash scripts/gpu_check.sh [--out results/gpu_check.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "no GPU: torch sees no CUDA device here; nothing checked"
  exit 0
fi
exec "$PY" scripts/gpu_check.py "$@"
