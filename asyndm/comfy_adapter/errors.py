"""Errors the ComfyUI adapter raises for models and options it cannot run asynchronously."""

from __future__ import annotations

__all__ = ["SUPPORTED_FAMILIES", "UnsupportedModelError"]

SUPPORTED_FAMILIES = ("SD1.x, SD2.x and SDXL (ComfyUI's openaimodel.UNetModel, image models without temporal layers), "
                      "Flux (dev, schnell and Kontext, comfy.ldm.flux.model.Flux), Flux.2 (the same class with global "
                      "modulation), Chroma and Chroma Radiance (comfy.ldm.chroma, comfy.ldm.chroma_radiance), "
                      "HunyuanImage 2.1 (comfy.ldm.hunyuan_video.model.HunyuanVideo on images; not the distilled "
                      "meanflow model), SD3 / SD3.5 (large, medium and turbo, "
                      "comfy.ldm.modules.diffusionmodules.mmdit.MMDiT), AuraFlow (comfy.ldm.aura.mmdit.MMDiT), "
                      "HiDream (I1 full, dev and fast, E1; comfy.ldm.hidream.model.HiDreamImageTransformer2DModel), "
                      "Qwen-Image and Qwen-Image-Edit (comfy.ldm.qwen_image.model.QwenImageTransformer2DModel) and "
                      "Lumina 2 / Z-Image (comfy.ldm.lumina.model.NextDiT)")


class UnsupportedModelError(ValueError):
    """The model's architecture has no per-pixel timestep adapter (message names what is supported)."""
