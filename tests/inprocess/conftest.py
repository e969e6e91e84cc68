"""Make ComfyUI importable in-process (CPU, no argument parsing)."""

from __future__ import annotations

import sys

from tests.conftest import comfyui_path

_path = comfyui_path()
if not (_path / "comfy").is_dir():
    raise RuntimeError(
        f"No ComfyUI tree at {_path}: run scripts/setup.sh or set COMFYUI_PATH to a ComfyUI checkout."
    )
if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

# ComfyUI picks its device when comfy.model_management is first imported: force the CPU
# (these machines have none; a CUDA build of torch would otherwise look for a driver).
from comfy.cli_args import args as _comfy_args  # noqa: E402

_comfy_args.cpu = True

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import pytest  # noqa: E402

from tests.conftest import REPO_ROOT  # noqa: E402

PACK_MODULE = "asyndm_pack"


def load_pack() -> ModuleType:
    """Import the repository as ComfyUI does (a package named after its folder), once."""
    import sys as _sys

    if PACK_MODULE in _sys.modules:
        return _sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    _sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack_nodes() -> ModuleType:
    """The pack's nodes.sampling module, imported through the pack package."""
    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.nodes.sampling")


@pytest.fixture(scope="session")
def sd15_checkpoint() -> tuple:
    """(model, clip, vae) of the default random-weight SD1.5 checkpoint written by scripts/setup.sh."""
    import comfy.sd

    models = Path(os.environ.get("ASYNDM_MODELS_DIR") or REPO_ROOT / ".dev" / "models")
    path = models / "checkpoints" / "asyndm-random-sd15.safetensors"
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/setup.sh (scripts/test.sh does)")
    out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


@pytest.fixture(scope="session")
def conds(sd15_checkpoint: tuple, pack_nodes: ModuleType) -> tuple:
    """(positive, negative) for the default checkpoint; the positive carries the prompt's tokens."""
    clip = sd15_checkpoint[1]
    positive = pack_nodes.AsynDMTextEncode.execute(clip, "a rabbit playing basketball").args[0]
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    return positive, negative
