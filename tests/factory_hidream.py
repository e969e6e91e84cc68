"""Small random-weight HiDream models of ComfyUI's own classes, built in-process for tests.

ComfyUI's HiDream config (supported_models.HiDream: flow matching, shift 1, multiplier 1000, Flux
latents) builds model_base.HiDream around comfy.ldm.hidream.model.HiDreamImageTransformer2DModel.
Detection from a file fixes HiDream I1's full size (20 heads of 128, 16 + 32 blocks), so these
models are made in-process: 2 heads of 32 channels, MoE feed-forward (4 experts, 2 active) as in
the real model, and narrow T5 / Llama / pooled widths. Import after ComfyUI is importable.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.model_factory import _patcher

__all__ = ["HD_LLAMA_DIM", "HD_POOLED_DIM", "HD_T5_DIM", "build_hidream", "make_hidream_conditioning"]

HD_T5_DIM, HD_LLAMA_DIM, HD_POOLED_DIM = 32, 24, 20  # T5-XXL 4096, Llama-3.1 4096, CLIP-L+G 2048, shrunk


def build_hidream(*, n_double: int = 2, n_single: int = 2, experts: int = 4, seed: int = 0, **layout: Any) -> Any:
    """A HiDream-shaped ModelPatcher; block i reads Llama layer i of make_hidream_conditioning's stack. layout
    overrides keys of the transformer's shape (a wider model for the benchmark)."""
    import comfy.supported_models

    blocks = n_double + n_single
    unet = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
            "num_layers": n_double, "num_single_layers": n_single, "attention_head_dim": 32,
            "num_attention_heads": 2, "caption_channels": [HD_T5_DIM, HD_LLAMA_DIM], "text_emb_dim": HD_POOLED_DIM,
            "num_routed_experts": experts, "num_activated_experts": 2, "axes_dims_rope": [8, 12, 12],
            "max_resolution": [32, 32], "llama_layers": list(range(blocks)), **layout}
    config = comfy.supported_models.HiDream(unet)
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config.get_model({}, ""), seed)


def make_hidream_conditioning(batch: int = 1, *, t5: int = 16, llama: int = 8, layers: int = 4,
                              seed: int = 0) -> list[list[Any]]:
    """[[T5 context, {pooled_output (CLIP-L+G), conditioning_llama3 (B, layers, tokens, width)}]] (ComfyUI's
    real T5 context is 128 tokens, its Llama about as many: shorter here where the words do not matter)."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, t5, HD_T5_DIM, generator=gen)
    extra = {"pooled_output": torch.randn(batch, HD_POOLED_DIM, generator=gen),
             "conditioning_llama3": torch.randn(batch, layers, llama, HD_LLAMA_DIM, generator=gen)}
    return [[context, extra]]
