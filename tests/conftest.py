"""Test set-up shared by the three tiers.

unit/      imports only asyndm (no ComfyUI);
inprocess/ imports ComfyUI from COMFYUI_PATH (default .dev/ComfyUI) and builds random models;
server/    starts ComfyUI's main.py with the pack whitelisted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = REPO_ROOT / ".dev" / "ComfyUI"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def comfyui_path() -> Path:
    """Where the ComfyUI tree under test lives (COMFYUI_PATH wins)."""
    return Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).resolve()
