#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: installs what it needs, then runs every test tier.
# Real-host tiers (tests/comfyui, tests/a1111) run only when COMFYUI_PATH / A1111_PATH are set.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU build; the host owns torch, so it is not in pyproject
python3 -m pip install -q -e ".[dev]"
python3 -m ruff check .                          # lint (config in pyproject.toml)
python3 -m pytest -q "$@"
if [ -d web/tests ] && command -v node >/dev/null 2>&1; then
  node --test web/tests/
fi
