#!/usr/bin/env bash
# Install graceful and its test dependencies into ./.venv (idempotent).
# torch is pinned to the CPU wheel first: an unpinned torch would pull a CUDA build of GBs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "torch==${GRACEFUL_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, ray, faiss, orchestrator; print('graceful installed: torch', torch.__version__, 'ray', ray.__version__)"
