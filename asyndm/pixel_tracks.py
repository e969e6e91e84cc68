"""Per-pixel values stored as a few distinct values and an index map.

Under AsynDM every pixel of a track (the background, or the pixels of one priority k) shares its
state, sigma and model timestep, so a (B, H, W) map holds only a handful of distinct values. The
sampler keeps its states in this form and does the schedule math on the distinct values only;
full maps are made with one gather when a tensor op needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PixelTracks", "pair_tracks"]


@dataclass(frozen=True)
class PixelTracks:
    """values: (U,) distinct values (duplicates allowed); index: (B, H, W) long into values."""

    values: torch.Tensor
    index: torch.Tensor

    def full(self) -> torch.Tensor:
        """The (B, H, W) map."""
        return self.values[self.index]

    @staticmethod
    def from_map(values_map: torch.Tensor) -> PixelTracks:
        """Group a (B, H, W) map by its distinct values (one sort)."""
        values, index = torch.unique(values_map, return_inverse=True)
        return PixelTracks(values, index.reshape(values_map.shape))


def pair_tracks(a: PixelTracks, b: PixelTracks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group pixels by their (a, b) value pair: (a values, b values, index), one entry per pair.

    When both share one index tensor (fixed masks: the state follows the priority track), no sort
    is needed and the values are returned as they are.
    """
    if a.index is b.index:
        return a.values, b.values, a.index
    n_b = b.values.numel()
    pairs, index = torch.unique(a.index * n_b + b.index, return_inverse=True)
    return a.values[pairs // n_b], b.values[pairs % n_b], index.reshape(a.index.shape)
