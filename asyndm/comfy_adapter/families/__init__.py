"""One time adapter per model family: how a per-pixel (or per-token) timestep map gets into the model.

Every adapter is a context manager with the same small interface, so the sampler stays
family-agnostic:

- ``with adapter:`` installs its hooks for the run and removes them on exit (errors included);
- ``set_map(None, unique=(U,), inverse=(R, H, W), rows=B')`` sets the timesteps of the next forward,
  ``unique[inverse]`` at latent resolution (R divides B': the CFG chunks of an image share its map);
  ``set_map(None)`` restores the stock behaviour;
- ``patch_size``: the latent pixels per token side; the sampler keeps its maps constant on each
  patch, so that a token's timestep and its pixels' updates agree;
- ``family``: the family's name, for messages.

A next family is one new module here and one line in ``time_adapter``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError

__all__ = ["time_adapter", "unwrap"]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The eager module of a torch.compile OptimizedModule (ComfyUI's compile node swaps one in)."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else module


def time_adapter(diffusion_model: torch.nn.Module) -> Any:
    """The adapter for this model's family, after refusing what it cannot serve (by name)."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT, OpenAISignatureMMDITWrapper
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from . import flux, mmdit, unet

    dm = unwrap(diffusion_model)
    if isinstance(dm, UNetModel):
        return unet.PerPixelTimesteps(dm)
    if type(dm) is Flux:
        return flux.PerTokenTimesteps(dm)
    if type(dm) in (MMDiT, OpenAISignatureMMDITWrapper):
        return mmdit.PerTokenTimestepsMMDiT(dm)
    raise UnsupportedModelError(
        f"per-pixel timesteps are not supported for {type(dm).__module__}.{type(dm).__name__}. "
        f"Supported: {SUPPORTED_FAMILIES}."
    )
