#!/usr/bin/env bash
# Idempotent install of what the frontend test (tests/server/test_frontend.py) needs:
#   - Debian's chromium at /usr/bin/chromium (apt, as root; apt-get update only when needed)
#   - node and npm (Debian's nodejs 18 when none is installed)
#   - playwright-core (pinned) in .dev/node, driven by tests/server/browser/*.mjs
# Needs nothing but the package registries (Debian's apt mirror and npm).
#
#   CHROMIUM=/path/to/chromium    use that browser instead (nothing is installed for it)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_DIR="$ROOT/.dev/node"
PLAYWRIGHT_VERSION="1.61.1"   # the newest line that still supports node 18 (Debian bookworm's)
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
log() { printf '[setup_browser] %s\n' "$*" >&2; }
t0=$(date +%s)

SUDO=""
need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      log "$1 is missing and this is not root (no sudo): install it as root ($2)"
      exit 2
    fi
  fi
}
apt_updated=""
apt_install() {  # apt_install PACKAGE...: update the lists only when apt has no candidate
  export DEBIAN_FRONTEND=noninteractive
  for pkg in "$@"; do
    if [ -z "$apt_updated" ] && ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      log "apt-get update"
      $SUDO apt-get update -q
      apt_updated=1
    fi
  done
  log "apt-get install $*"
  if ! $SUDO apt-get install -y -q "$@"; then
    [ -n "$apt_updated" ] && exit 2
    log "install failed; retrying after apt-get update"
    $SUDO apt-get update -q
    apt_updated=1
    $SUDO apt-get install -y -q "$@"
  fi
}

# 1. Chromium -----------------------------------------------------------------------------------
if [ -x "$CHROMIUM" ]; then
  log "chromium present: $CHROMIUM"
else
  need_root chromium "apt-get install -y chromium"
  apt_install chromium
  [ -x "$CHROMIUM" ] || { log "chromium was installed but $CHROMIUM does not exist"; exit 2; }
fi

# node and npm ----------------------------------------------------------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if command -v node >/dev/null 2>&1; then
    log "node is here but npm is not: install npm for this node ($(command -v node))"
    exit 2
  fi
  need_root nodejs "apt-get install -y nodejs npm"
  apt_install nodejs npm
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 18 ] || { log "node $(node --version) is too old: playwright-core needs node 18 or newer"; exit 2; }

# 2. playwright-core ------------------------------------------------------------------------------
mkdir -p "$NODE_DIR"
installed="$(node -e "try{process.stdout.write(require('$NODE_DIR/node_modules/playwright-core/package.json').version)}catch(e){}" 2>/dev/null || true)"
if [ "$installed" = "$PLAYWRIGHT_VERSION" ]; then
  log "playwright-core $installed present in $NODE_DIR"
else
  log "installing playwright-core@$PLAYWRIGHT_VERSION into $NODE_DIR"
  cat > "$NODE_DIR/package.json" <<JSON
{
  "name": "asyndm-comfyui-browser-test",
  "private": true,
  "description": "Browser driver for tests/server/test_frontend.py (written by scripts/setup_browser.sh)",
  "dependencies": {
    "playwright-core": "$PLAYWRIGHT_VERSION"
  }
}
JSON
  (cd "$NODE_DIR" && npm install --no-audit --no-fund --no-progress --loglevel=error --save-exact)
  # playwright-core downloads no browser by itself; we use the system chromium.
fi

log "done in $(( $(date +%s) - t0 )) s"
