#!/usr/bin/env bash
# Install graceful and its test dependencies into ./.venv (idempotent).
# torch is pinned to the CPU wheel first: an unpinned torch would pull a CUDA build of GBs.
# pip's chatter goes to .venv/install.log; its tail is shown when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
LOG=.venv/install.log
: > "$LOG"
step() {
  echo "install: ${*: -1}"
  if ! .venv/bin/python -m pip install --disable-pip-version-check "$@" >>"$LOG" 2>&1; then
    tail -30 "$LOG" >&2
    echo "install failed (full log: $LOG)" >&2
    exit 1
  fi
}
step -q --upgrade pip
step -q "torch==${GRACEFUL_TORCH_VERSION:-2.13.0}"
step -q -e ".[test]"
.venv/bin/python -c "import torch, ray, faiss, orchestrator; print('graceful installed: torch', torch.__version__, 'ray', ray.__version__)"
