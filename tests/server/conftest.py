"""One real ComfyUI server per test session, with this pack whitelisted and the default models."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from comfy_server import ComfyServer  # noqa: E402

MODELS_CONFIG = REPO_ROOT / ".dev" / "extra_model_paths.yaml"
DEFAULT_CKPT = "asyndm-random-sd15.safetensors"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    if not MODELS_CONFIG.exists():
        pytest.fail("no .dev/extra_model_paths.yaml: run scripts/setup.sh first (scripts/test.sh does)")
    run_dir = Path(tmp_path_factory.mktemp("comfy_run"))
    srv = ComfyServer(run_dir, models_config=MODELS_CONFIG, python=os.environ.get("ASYNDM_PYTHON", sys.executable))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
