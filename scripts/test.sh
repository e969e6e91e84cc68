#!/usr/bin/env bash
# The whole test suite (unit, in-process ComfyUI, real server), after an idempotent set-up.
# Extra arguments go to pytest (e.g. tests/unit -k schedules).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
bash "$ROOT/scripts/setup_browser.sh"
cd "$ROOT"
# Kernels (and so low-precision rounding) depend on the CPU generation: say which one this is.
if [ -r /proc/cpuinfo ]; then
  cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
  cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(amx|avx512)' | sort | tr '\n' ' ' || true)"
  printf '[test] CPU: %s; AMX/AVX-512 flags: %s; ONEDNN_MAX_CPU_ISA=%s\n' "${cpu_model:-unknown}" \
    "${cpu_flags:-none}" "${ONEDNN_MAX_CPU_ISA:-unset (the CPU default)}"
fi
"$ROOT/.dev/venv/bin/ruff" check .
"$ROOT/.dev/venv/bin/mypy"
export ASYNDM_MODELS_DIR="$ROOT/.dev/models"
exec "$ROOT/.dev/venv/bin/python" -m pytest "$@"
