"""Pixel tracks and the per-pixel model call of the lock-step sampler (lockstep.py).

A *track* is one scalar sigma sequence (N + 1 values, like a scheduler's SIGMAS) followed by a set
of pixels: every pixel whose priority history is the same follows the same sequence of AsynDM
states. Row 0 is the background: the user's sigmas exactly, also the *carrier* sigma the CFG
guider, the conditionings, ControlNet and the model's hooks see. ``PixelModel`` calls ComfyUI's
guider once for a whole latent whose pixels sit at different sigmas, through the pack's APPLY_MODEL
wrapper and the family's time hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .model_wrapper import StepMaps, model_timesteps
from .per_pixel import per_pixel

__all__ = ["TrackSet", "PixelModel", "tracks_from_history"]


@dataclass(frozen=True)
class TrackSet:
    """sigmas: (U, N + 1), one scalar sequence per track, row 0 the carrier (background);
    index: (B, H, W) long, each pixel's track; states: (U, N + 1) the AsynDM states behind the sigmas."""

    sigmas: torch.Tensor
    index: torch.Tensor
    states: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.sigmas.shape[0])

    def mask(self, j: int) -> torch.Tensor:
        """(B, 1, H, W) bool: the pixels of track j."""
        return (self.index == j)[:, None]

    def sigma_map(self, column: int) -> torch.Tensor:
        """(B, 1, H, W): every pixel's sigma at position `column` of its track."""
        return self.sigmas[:, column][self.index][:, None]

    def state_map(self, column: int) -> torch.Tensor:
        """(B, H, W): every pixel's state at position `column` of its track."""
        assert self.states is not None
        return self.states[:, column][self.index]


def tracks_from_history(history: torch.Tensor, carrier: torch.Tensor,
                        state_rows: Callable[[torch.Tensor], torch.Tensor],
                        to_sigma: Callable[[torch.Tensor], torch.Tensor]) -> TrackSet:
    """Tracks of a priority history: history (N, B, H, W) is the priority k with which each pixel
    reaches its state i. Pixels with the same history share a track; the background (k = 0
    throughout) is track 0, on the carrier sigmas exactly. state_rows (U, N) -> (U, N + 1) runs the
    AsynDM state recurrence per history; to_sigma places states on the run's sigmas."""
    n = int(carrier.numel()) - 1
    if history.shape[0] != n:
        raise ValueError(f"need one priority map per step (got {history.shape[0]} for {n} steps)")
    per_pixel_rows = history.permute(1, 2, 3, 0).reshape(-1, n).float()
    rows, index = torch.unique(per_pixel_rows, dim=0, return_inverse=True)
    background = (rows == 0).all(dim=1)
    if not bool(background[0]):  # no background pixel: track 0 still runs the carrier (it holds no pixel)
        rows = torch.cat([rows.new_zeros(1, n), rows])
        index = index + 1
    states = state_rows(rows)
    sigmas = to_sigma(states.reshape(-1)).reshape(states.shape).to(carrier.dtype)
    sigmas[0] = carrier  # the background follows the user's sigmas exactly
    return TrackSet(sigmas, index.reshape(history.shape[1:]).to(carrier.device), states)


class PixelModel:
    """denoised = PixelModel(x, sigma_map, carrier): one call of ComfyUI's guider for a latent whose
    pixels sit at the sigmas of `sigma_map` (B, 1, H, W); `carrier` (B,) is the sigma the guider,
    conds, ControlNet and hooks see. Inpainting is done per pixel as KSamplerX0Inpaint does it."""

    def __init__(self, model_wrap: Any, maps: StepMaps, latent_image: torch.Tensor, inpaint_noise: torch.Tensor,
                 denoise_mask: torch.Tensor | None, sigmas: torch.Tensor) -> None:
        self.model_wrap = model_wrap
        self.inner = model_wrap.inner_model
        self.ms = self.inner.model_sampling
        self.maps = maps
        self.latent_image = latent_image
        self.inpaint_noise = inpaint_noise
        self.denoise_mask = denoise_mask
        self.sigmas = sigmas
        self.calls = 0

    def _set_maps(self, sigma_map: torch.Tensor | None) -> None:
        if sigma_map is None:  # every pixel at the carrier: the stock call, untouched
            self.maps.clear()
            return
        values, index = torch.unique(sigma_map[:, 0], return_inverse=True)
        self.maps.set(sigma_map, *model_timesteps(values, index, self.ms))

    def __call__(self, x: torch.Tensor, sigma_map: torch.Tensor | None, carrier: torch.Tensor,
                 model_options: dict | None = None, seed: int | None = None) -> torch.Tensor:
        self.calls += 1
        self._set_maps(sigma_map)
        try:
            mask = self.denoise_mask
            if mask is not None:
                if model_options and "denoise_mask_function" in model_options:
                    mask = model_options["denoise_mask_function"](carrier, mask, extra_options={
                        "model": self.model_wrap, "sigmas": self.sigmas})
                if sigma_map is None:  # as KSamplerX0Inpaint
                    known = self.inner.scale_latent_inpaint(x=x, sigma=carrier, noise=self.inpaint_noise,
                                                            latent_image=self.latent_image)
                else:
                    known = per_pixel(lambda sg, n, lat: self.inner.scale_latent_inpaint(
                        x=None, sigma=sg, noise=n, latent_image=lat), sigma_map, self.inpaint_noise, self.latent_image)
                latent_mask = 1.0 - mask
                x = x * mask + known * latent_mask
            out = self.model_wrap(x, carrier, model_options=model_options or {}, seed=seed)
            if mask is not None:
                out = out * mask + self.latent_image * latent_mask
            return out
        finally:
            self.maps.clear()
