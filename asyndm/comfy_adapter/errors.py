"""Errors the ComfyUI adapter raises for models and options it cannot run asynchronously."""

from __future__ import annotations

__all__ = ["SUPPORTED_FAMILIES", "UnsupportedModelError"]

SUPPORTED_FAMILIES = ("SD1.x, SD2.x and SDXL (ComfyUI's openaimodel.UNetModel, image models without temporal layers), "
                      "Flux (dev and schnell, comfy.ldm.flux.model.Flux) and SD3 / SD3.5 (large, medium and "
                      "turbo, comfy.ldm.modules.diffusionmodules.mmdit.MMDiT)")


class UnsupportedModelError(ValueError):
    """The model's architecture has no per-pixel timestep adapter (message names what is supported)."""
