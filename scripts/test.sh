#!/usr/bin/env bash
# The whole test suite (unit, in-process ComfyUI, real server), after an idempotent set-up.
# Extra arguments go to pytest (e.g. tests/unit -k schedules).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
bash "$ROOT/scripts/setup_browser.sh"
cd "$ROOT"
"$ROOT/.dev/venv/bin/ruff" check .
"$ROOT/.dev/venv/bin/mypy"
export ASYNDM_MODELS_DIR="$ROOT/.dev/models"
exec "$ROOT/.dev/venv/bin/python" -m pytest "$@"
