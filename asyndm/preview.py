"""Pictures of what a run did: timestep maps and item priorities over the steps.

Returned as a ComfyUI IMAGE (B, H, W, 3 in [0, 1]) so any image node can show or save it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["timestep_strip", "pick_steps"]


def pick_steps(num_steps: int, count: int = 8) -> list[int]:
    """Up to `count` step indices spread evenly over 0..num_steps-1 (first and last included)."""
    if num_steps <= 0:
        return []
    if num_steps <= count:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)})


def _tiles(values: torch.Tensor, tile: int) -> torch.Tensor:
    """(B, S, H, W) in [0, 1] -> (B, S, tile_h, tile_w) float32, nearest-upscaled by a whole factor so that the
    shorter side is >= tile: every map of the strip in one call."""
    h, w = values.shape[-2:]
    scale = max(1, -(-tile // min(h, w)))
    return F.interpolate(values.float(), scale_factor=scale, mode="nearest")


def timestep_strip(states: list[torch.Tensor], priorities: list[torch.Tensor], *, start_value: float,
                   count: int = 8, tile: int = 64, gap: int = 2) -> torch.Tensor:
    """One image per batch item: a row of timestep maps (white = noisy) over a row of priority maps.

    states / priorities: one (B, H, W) tensor per step. Priority maps are drawn in orange
    (brightness = k), background black; the tiles sit on a grey canvas, `gap` pixels apart.
    The whole strip is a few tensor ops (the node draws it after every run).
    """
    if not states:
        return torch.zeros(1, tile, tile, 3)
    steps = pick_steps(len(states), count)
    top = _tiles((torch.stack([states[i] for i in steps], dim=1) / start_value).clamp(0, 1), tile)
    bottom = _tiles(torch.stack([priorities[i] for i in steps], dim=1).clamp(0, 1), tile)
    batch, shown, th, tw = top.shape
    width = shown * (tw + gap) - gap
    canvas = torch.full((batch, 2 * th + gap, width, 3), 0.2)
    # the canvas as (B, rows, tiles, tile width, RGB): tile j's columns start at j * (tw + gap)
    tiles = canvas.as_strided((batch, 2 * th + gap, shown, tw, 3), (*canvas.stride()[:2], (tw + gap) * 3, 3, 1))
    tiles[:, :th] = top.permute(0, 2, 1, 3)[..., None]
    orange = torch.tensor([1.0, 0.55, 0.1], device=bottom.device)
    tiles[:, th + gap:] = bottom.permute(0, 2, 1, 3)[..., None] * orange  # maps on any device; the strip on the CPU
    return canvas
