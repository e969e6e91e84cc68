#!/usr/bin/env bash
# The main job: set up (idempotent), then run the example workflow on a real ComfyUI server.
# Arguments go to scripts/run_example.py (--help lists them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.dev/venv/bin/python" "$ROOT/scripts/run_example.py" "$@"
