"""Real ComfyUI servers for the session, with this pack whitelisted and the default models: `server` serves
the frontend that ComfyUI pins (1.32.9 for the bundled 0.3.75), `newest_frontend_server` (started for the modules
that ask for it) the newest frontend build that scripts/setup.sh fetches, through --front-end-root."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from comfy_server import ComfyServer  # noqa: E402

MODELS_CONFIG = REPO_ROOT / ".dev" / "extra_model_paths.yaml"
DEFAULT_CKPT = "asyndm-random-sd15.safetensors"
# The test-only custom nodes in tests/server/comfy_nodes, loaded by every test server and nothing else:
# asyndm_test_conditioning.py (seeded conditioning in place of text encoders that cannot be built here) and
# asyndm_test_models.py (small random transformers of the families ComfyUI detects only at full size).
TEST_NODES_CONFIG = Path(__file__).resolve().parent / "comfy_nodes.yaml"
TEST_NODES = ["asyndm_test_conditioning.py", "asyndm_test_models.py"]
TEST_CONDITIONING = "TestOnlyDiTConditioning"
TEST_TRANSFORMER = "TestOnlyRandomTransformer"


# Headless Chromium + playwright-core, installed by scripts/setup_browser.sh (the browser tests).
CHROMIUM = Path(os.environ.get("ASYNDM_CHROMIUM", "/usr/bin/chromium"))
NODE_DIR = REPO_ROOT / ".dev" / "node"
SETUP_HINT = "run `bash scripts/setup_browser.sh` first (installs chromium and playwright-core)"

# The newest frontend (comfyui-frontend-package), fetched by scripts/setup.sh (NEWEST_FRONTEND_VERSION there).
NEWEST_FRONTEND_VERSION = "1.58.1"
NEWEST_FRONTEND = Path(os.environ.get("ASYNDM_NEWEST_FRONTEND") or REPO_ROOT / ".dev" / f"frontend-{NEWEST_FRONTEND_VERSION}")


def require_browser_tools() -> None:
    """Fail (not skip) with the set-up command when the browser tests cannot run."""
    if not (CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no chromium at {CHROMIUM}: {SETUP_HINT}")
    if shutil.which("node") is None:
        pytest.fail(f"node is not on PATH: install nodejs, then {SETUP_HINT}")
    if not (NODE_DIR / "node_modules" / "playwright-core" / "package.json").exists():
        pytest.fail(f"playwright-core is not installed in {NODE_DIR}: {SETUP_HINT}")


@contextlib.contextmanager
def running_server(run_dir: Path, extra_args: list[str] | None = None) -> Iterator[ComfyServer]:
    """A ComfyUI server with this pack, the test-only conditioning node and the default models, in run_dir;
    always stopped."""
    if not MODELS_CONFIG.exists():
        pytest.fail("no .dev/extra_model_paths.yaml: run scripts/setup.sh first (scripts/test.sh does)")
    srv = ComfyServer(run_dir, models_config=MODELS_CONFIG, python=os.environ.get("ASYNDM_PYTHON", sys.executable),
                      extra_args=extra_args, extra_paths_configs=[TEST_NODES_CONFIG], extra_custom_nodes=TEST_NODES)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    with running_server(Path(tmp_path_factory.mktemp("comfy_run"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def newest_frontend_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """The same ComfyUI serving the newest frontend build (ComfyUI's --front-end-root)."""
    if not (NEWEST_FRONTEND / "index.html").is_file():
        pytest.fail(f"no frontend build at {NEWEST_FRONTEND}: run `bash scripts/setup.sh` (it fetches "
                    f"comfyui-frontend-package=={NEWEST_FRONTEND_VERSION})")
    run_dir = Path(tmp_path_factory.mktemp("comfy_run_newest_frontend"))
    with running_server(run_dir, ["--front-end-root", str(NEWEST_FRONTEND.resolve())]) as srv:
        yield srv
