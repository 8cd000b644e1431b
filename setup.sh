#!/usr/bin/env bash
# Creates ./.venv (once) and installs the project into it.
#   ./setup.sh       runtime dependencies
#   ./setup.sh dev   runtime + test dependencies
# torch==2.13.0 goes in first: on this kind of machine it is the CPU build on local disk, and
# installing it before the project keeps pip from pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
if [ "${1:-}" = "dev" ]; then
    $PIP install -e ".[dev]"
else
    $PIP install -e .
fi
