"""Small random-weight AuraFlow models of ComfyUI's own classes, built in-process for tests.

ComfyUI's AuraFlow config (supported_models.AuraFlow: flow matching, shift 1.73, multiplier 1,
SDXL latents) builds model_base.AuraFlow around comfy.ldm.aura.mmdit.MMDiT. Detection from a file
only reads the depth, the text width and the position table (the width would be AuraFlow's 3072),
so these models are made in-process with a narrow width. Import after ComfyUI is importable.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.model_factory import _patcher

__all__ = ["AURA_TEXT_DIM", "build_auraflow", "make_auraflow_conditioning"]

AURA_TEXT_DIM = 32  # Pile-T5-XL's 2048, shrunk
AURA_MAX_SEQ = 16 * 16  # a 16x16 token position table (a 32x32 latent), interpolated above


def build_auraflow(*, dim: int = 64, n_double: int = 2, n_single: int = 2, seed: int = 0, heads: int = 2) -> Any:
    """An AuraFlow-shaped ModelPatcher: heads of dim / heads channels (2 of 32), joint then single blocks."""
    import comfy.supported_models

    unet = {"cond_seq_dim": AURA_TEXT_DIM, "max_seq": AURA_MAX_SEQ, "n_double_layers": n_double,
            "n_layers": n_double + n_single, "dim": dim, "n_heads": heads, "global_conddim": dim,
            "in_channels": 4, "out_channels": 4, "patch_size": 2}
    config = comfy.supported_models.AuraFlow(unet)
    config.set_inference_dtype(torch.float32, None)
    patcher = _patcher(config.get_model({}, ""), seed)
    dm = patcher.model.diffusion_model
    with torch.no_grad():  # _fill scales these 3-D tables by their whole size: give them unit scale
        gen = torch.Generator().manual_seed(seed + 17)
        dm.positional_encoding.copy_(torch.randn(dm.positional_encoding.shape, generator=gen) * 0.5)
        dm.register_tokens.copy_(torch.randn(dm.register_tokens.shape, generator=gen))
    return patcher


def make_auraflow_conditioning(batch: int = 1, tokens: int = 12, *, seed: int = 0) -> list[list[Any]]:
    """[[Pile-T5-like context, {}]] for build_auraflow's models (AuraFlow has no pooled text)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, AURA_TEXT_DIM, generator=gen), {}]]
