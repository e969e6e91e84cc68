"""Small random-weight Qwen-Image models of ComfyUI's own classes, built in-process for tests.

ComfyUI's ``supported_models.QwenImage`` config, ``model_base.QwenImage`` and the
``qwen_image.model.QwenImageTransformer2DModel`` class, narrowed to 2 heads of 32 channels and 2
blocks (the real model: 24 heads of 128, 60 blocks, text width 3584). Qwen-Image-Edit is the same
class given reference latents (the ``reference_latents`` conditioning key). Latents are in the
Wan 2.1 format: 16 channels, 5-D (B, 16, 1, H, W) once ComfyUI has fixed an empty latent.

Import this only after ComfyUI is importable (tests/inprocess/conftest.py arranges that).
"""

from __future__ import annotations

from typing import Any

import torch

from tests.model_factory import _patcher

__all__ = ["QWEN_TEXT_DIM", "build_qwen_image", "make_qwen_conditioning"]

QWEN_TEXT_DIM = 48  # Qwen2.5-VL-7B's hidden width (3584), shrunk


def build_qwen_image(*, depth: int = 2, seed: int = 0, **layout: Any) -> Any:
    """A Qwen-Image shaped ModelPatcher on the CPU (ComfyUI's config, model_base and transformer class); layout
    overrides keys of the transformer's shape (a wider model for the benchmark)."""
    import comfy.supported_models

    unet = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "patch_size": 2,
            "num_layers": depth, "attention_head_dim": 32, "num_attention_heads": 2,
            "joint_attention_dim": QWEN_TEXT_DIM, "axes_dims_rope": (8, 12, 12), **layout}
    config = comfy.supported_models.QwenImage(unet)
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config.get_model({}, ""), seed)


def make_qwen_conditioning(batch: int = 1, tokens: int = 12, *, seed: int = 0,
                           reference: torch.Tensor | None = None) -> list[list[Any]]:
    """[[Qwen2.5-VL-like context, {...}]]; ``reference`` (B, 16, 1, h, w) adds it as an Edit reference latent."""
    gen = torch.Generator().manual_seed(seed)
    extra: dict[str, Any] = {}
    if reference is not None:
        extra["reference_latents"] = [reference]
    return [[torch.randn(batch, tokens, QWEN_TEXT_DIM, generator=gen), extra]]
