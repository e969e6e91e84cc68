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
from dataclasses import dataclass, field
from typing import Any

import torch

from .host import host_maths, model_call_queued, to_device, to_host
from .model_wrapper import StepMaps, model_timesteps
from .per_pixel import per_pixel

__all__ = ["TrackSet", "PixelModel", "tracks_from_host_history"]


@dataclass(frozen=True)
class TrackSet:
    """sigmas: (U, N + 1) on the run's device, one scalar sequence per track, row 0 the carrier
    (background); index: (B, H, W) long, each pixel's track; host_sigmas: the same sigmas on the CPU
    (every decision about tracks reads these, never the device's); states: (U, N + 1) the AsynDM
    states behind the sigmas (CPU); host_index: index on the CPU."""

    sigmas: torch.Tensor
    index: torch.Tensor
    states: torch.Tensor | None = None
    host_sigmas: torch.Tensor | None = None
    host_index: torch.Tensor | None = None
    _derived: dict = field(default_factory=dict, compare=False, repr=False)  # values made once per track set

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    @property
    def count(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def host(self) -> torch.Tensor:
        """(U, N + 1) sigmas on the CPU (a copy made once, when a TrackSet was built without one)."""
        if self.host_sigmas is not None:
            return self.host_sigmas
        return self._once("host", lambda: to_host(self.sigmas))

    @property
    def rows(self) -> list[tuple[float, ...]]:
        """Each track's sigmas as Python numbers (to compare and look up tracks on the host)."""
        return self._once("rows", lambda: [tuple(row) for row in self.host.tolist()])

    def mask(self, j: int) -> torch.Tensor:
        """(B, 1, H, W) bool: the pixels of track j (built once per track set)."""
        masks = self._once("masks", lambda: [(self.index == k)[:, None] for k in range(self.count)])
        return masks[j]

    @property
    def call_index(self) -> torch.Tensor:
        """(B, H, W) long: each pixel's entry in a model call's (U * B,) table of per-track, per-image
        sigmas (track-major), so that a call's sigma map is one gather and needs no torch.unique."""
        def make() -> torch.Tensor:
            batch = torch.arange(self.index.shape[0], device=self.index.device).view(-1, 1, 1)
            return self.index * self.index.shape[0] + batch
        return self._once("call_index", make)

    def sigma_map(self, column: int) -> torch.Tensor:
        """(B, 1, H, W): every pixel's sigma at position `column` of its track."""
        return self.sigmas[:, column][self.index][:, None]

    def state_map(self, column: int) -> torch.Tensor:
        """(B, H, W) on the CPU: every pixel's state at position `column` of its track."""
        assert self.states is not None
        index = self.host_index if self.host_index is not None else self.index.cpu()
        return self.states[:, column].cpu()[index]

    def same_partition(self, other: TrackSet) -> bool:
        """The same tracks holding the same pixels (compared on the host copies)."""
        if self.rows != other.rows:
            return False
        if self.host_index is None or other.host_index is None:
            return torch.equal(self.index, other.index)
        with host_maths():
            return torch.equal(self.host_index, other.host_index)


def tracks_from_host_history(host_history: torch.Tensor, carrier: torch.Tensor,
                             state_rows: Callable[[torch.Tensor], torch.Tensor],
                             to_sigma: Callable[[torch.Tensor], torch.Tensor],
                             host_carrier: torch.Tensor | None = None) -> TrackSet:
    """Tracks of a priority history: host_history (N, B, H, W), on the CPU, is the priority k with which
    each pixel reaches its state i. Pixels with the same history share a track; the background (k = 0
    throughout) is track 0, on the carrier sigmas exactly. state_rows (U, N) -> (U, N + 1) runs the
    AsynDM state recurrence per history; to_sigma places states on the run's sigmas. Both run on the
    CPU (host maths); the tables are uploaded without a stream sync (host.to_device).
    host_carrier: a CPU copy of `carrier` already made (else one read of it).
    """
    n = int(carrier.numel()) - 1
    if host_history.shape[0] != n:
        raise ValueError(f"need one priority map per step (got {host_history.shape[0]} for {n} steps)")
    device = carrier.device
    if host_carrier is None:
        host_carrier = to_host(carrier)
    with host_maths():
        per_pixel_rows = host_history.float().permute(1, 2, 3, 0).reshape(-1, n)
        rows, index = torch.unique(per_pixel_rows, dim=0, return_inverse=True)
        if bool((rows[0] != 0).any()):  # no background pixel: track 0 still runs the carrier (it holds no pixel)
            rows = torch.cat([rows.new_zeros(1, n), rows])
            index = index + 1
        states = state_rows(rows)
        host_sigmas = to_sigma(states.reshape(-1)).reshape(states.shape).to(carrier.dtype)
        host_sigmas[0] = host_carrier  # the background follows the user's sigmas exactly
        host_index = index.reshape(host_history.shape[1:])
    sigmas = to_device(host_sigmas, device)
    sigmas[0] = carrier
    return TrackSet(sigmas, to_device(host_index, device), states, host_sigmas, host_index)


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

    def _set_maps(self, sigma_map: torch.Tensor | None, table: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if sigma_map is None:  # every pixel at the carrier: the stock call, untouched
            self.maps.clear()
            return
        if table is None:  # a map without its table: find the distinct sigmas (reads the map back)
            values, index = torch.unique(sigma_map[:, 0], return_inverse=True)
            self.maps.set(sigma_map, *model_timesteps(values, index, self.ms))
            return
        values, index = table
        self.maps.set(sigma_map, self.ms.timestep(values).float(), index, values)

    def __call__(self, x: torch.Tensor, sigma_map: torch.Tensor | None, carrier: torch.Tensor,
                 model_options: dict | None = None, seed: int | None = None,
                 table: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """table: (values (V,), index (B, H, W) long) with sigma_map = values[index]: the call's sigmas
        as a small table (one row per track and image), so no distinct values have to be found."""
        self.calls += 1
        self._set_maps(sigma_map, table)
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
            model_call_queued()
            if mask is not None:
                out = out * mask + self.latent_image * latent_mask
            return out
        finally:
            self.maps.clear()
