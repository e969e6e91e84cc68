"""TEST ONLY: a small random-weight transformer of ComfyUI's own classes, built in the server process.

Why this node exists: some transformer families cannot be written as files that ComfyUI's model
detection accepts at a size these machines can run. Detection fixes HiDream at 16 double and 32
single blocks of width 2560 (17B parameters, whatever the file holds) and Flux.2 at 48 heads of
128 channels (width 6144: 2.3B parameters for a single block of each kind); Chroma Radiance's
width is fixed at 3072. For these the test server builds the same ComfyUI classes
(``comfy.supported_models.<Family>(...).get_model``) at a small width, with the test factories'
deterministic random weights (tests/factory_*.py, the models the in-process tests use), and hands
them to the graph as a MODEL, with CONDITIONING of the shapes that model reads and an empty LATENT
of its latent layout (and a seeded reference latent for edit workflows). Everything downstream (ReferenceLatent, the samplers, the pack's nodes,
SaveLatent) runs as in a user's workflow; the model's output is never touched. The test servers
load this file from tests/server/comfy_nodes (tests/server/conftest.py); it is never part of the pack.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]

# family: (factory module, model builder, conditioning builder, latent shape before the grid, default grid side)
FAMILIES: dict[str, tuple[str, str, str, tuple[int, ...], int]] = {
    "flux2": ("tests.factory_flux_family", "build_flux2", "make_flux2_conditioning", (128,), 8),
    "hidream": ("tests.factory_hidream", "build_hidream", "make_hidream_conditioning", (16,), 16),
    "chroma_radiance": ("tests.factory_flux_family", "build_chroma_radiance", "make_chroma_conditioning", (3,), 64),
    "chroma": ("tests.factory_flux_family", "build_chroma", "make_chroma_conditioning", (16,), 16),
    "hunyuan_image": ("tests.factory_flux_family", "build_hunyuan_image", "make_hunyuan_image_conditioning", (64,), 8),
    "qwen_image": ("tests.factory_qwen_image", "build_qwen_image", "make_qwen_conditioning", (16, 1), 16),
    "lumina2": ("tests.factory_lumina", "build_lumina2", "make_lumina_conditioning", (16,), 16),
    "z_image": ("tests.factory_lumina", "build_z_image", "make_lumina_conditioning", (16,), 16),
    "auraflow": ("tests.factory_auraflow", "build_auraflow", "make_auraflow_conditioning", (4,), 16),
}


def _factory(module: str, name: str) -> Callable[..., Any]:
    if str(REPO_ROOT) not in sys.path:  # the factories live in the repository's tests package
        sys.path.insert(0, str(REPO_ROOT))
    return getattr(importlib.import_module(module), name)


class TestOnlyRandomTransformer:
    DESCRIPTION = ("TEST ONLY (AsynDM test servers): a small random-weight model of one of ComfyUI's transformer "
                   "classes (the families whose files ComfyUI detects only at full size), with seeded conditioning "
                   "of the shapes it reads and an empty latent of its layout. Its pictures are noise.")
    CATEGORY = "testing/asyndm"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT", "LATENT")
    RETURN_NAMES = ("model", "positive", "negative", "latent", "reference")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "family": (list(FAMILIES), {"tooltip": "Which ComfyUI transformer class to build (small, random weights)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of weights and conditioning."}),
            "side": ("INT", {"default": 0, "min": 0, "max": 256,
                             "tooltip": "Latent grid side in cells; 0 takes the family's default."}),
        }}

    def make(self, family: str, seed: int,
             side: int) -> tuple[Any, list[list[Any]], list[list[Any]], dict[str, Any], dict[str, Any]]:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
        module, build, condition, channels, default_side = FAMILIES[family]
        model = _factory(module, build)(seed=int(seed))
        conditioning = _factory(module, condition)
        positive, negative = conditioning(seed=int(seed) + 1), conditioning(seed=int(seed) + 2)
        grid = int(side) or default_side
        # a reference image's latent for edit workflows (ReferenceLatent): seeded values, another aspect ratio
        reference = torch.randn(1, *channels, grid, max(1, grid // 2), generator=torch.Generator().manual_seed(int(seed)))
        return model, positive, negative, {"samples": torch.zeros(1, *channels, grid, grid)}, {"samples": reference}


NODE_CLASS_MAPPINGS = {"TestOnlyRandomTransformer": TestOnlyRandomTransformer}
NODE_DISPLAY_NAME_MAPPINGS = {"TestOnlyRandomTransformer": "Test-only Random Transformer (AsynDM tests)"}
