"""Evaluate ComfyUI's per-image sigma formulas pixel by pixel.

ComfyUI's ModelSampling methods (calculate_input, calculate_denoised, noise_scaling) reshape a
sigma of shape (B,) to (B, 1, 1, 1). Treating every latent pixel as its own batch row lets us call
those same methods with a sigma map, for every model type (eps, v, flow) without restating them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["per_pixel", "expand_map"]


def expand_map(sigma_map: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (B, 1, H, W) map to like's batch and spatial size (no channel axis)."""
    b, _, h, w = like.shape
    return sigma_map.expand(b, 1, h, w)


def per_pixel(fn: Callable[..., torch.Tensor], sigma_map: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """fn(sigma, *tensors) with sigma varying per pixel.

    sigma_map: (B, 1, H, W); tensors: (B, C_i, H, W). fn sees sigma of shape (B*H*W,) and tensors
    of shape (B*H*W, C_i, 1, 1), and must return (B*H*W, C_out, 1, 1).
    """
    first = tensors[0]
    if first.ndim != 4:
        raise ValueError(f"per-pixel sampling needs 4-D image latents (B, C, H, W), got shape {tuple(first.shape)}")
    b, _, h, w = first.shape
    sig = sigma_map.expand(b, 1, h, w).permute(0, 2, 3, 1).reshape(-1)
    flat = [t.permute(0, 2, 3, 1).reshape(b * h * w, t.shape[1], 1, 1) for t in tensors]
    out = fn(sig, *flat)
    return out.reshape(b, h, w, -1).permute(0, 3, 1, 2)
