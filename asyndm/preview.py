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


def _tile(values: torch.Tensor, tile: int) -> torch.Tensor:
    """(H, W) in [0, 1] -> (tile_h, tile_w) nearest-upscaled so the shorter side is >= tile."""
    h, w = values.shape
    scale = max(1, -(-tile // min(h, w)))
    return F.interpolate(values[None, None].float(), scale_factor=scale, mode="nearest")[0, 0]


def timestep_strip(states: list[torch.Tensor], priorities: list[torch.Tensor], *, start_value: float,
                   count: int = 8, tile: int = 64, gap: int = 2) -> torch.Tensor:
    """One image per batch item: a row of timestep maps (white = noisy) over a row of priority maps.

    states / priorities: one (B, H, W) tensor per step. Priority maps are drawn in orange
    (brightness = k), background black.
    """
    if not states:
        return torch.zeros(1, tile, tile, 3)
    steps = pick_steps(len(states), count)
    batch = states[0].shape[0]
    images = []
    for b in range(batch):
        top, bottom = [], []
        for i in steps:
            t = _tile((states[i][b] / start_value).clamp(0, 1), tile)
            p = _tile(priorities[i][b].clamp(0, 1), tile)
            top.append(t[..., None].expand(-1, -1, 3))
            bottom.append(torch.stack([p, p * 0.55, p * 0.1], dim=-1))
        th, tw = top[0].shape[:2]
        width = len(steps) * (tw + gap) - gap
        canvas = torch.full((2 * th + gap, width, 3), 0.2)
        for j, (a, c) in enumerate(zip(top, bottom, strict=True)):
            x0 = j * (tw + gap)
            canvas[:th, x0 : x0 + tw] = a
            canvas[th + gap :, x0 : x0 + tw] = c
        images.append(canvas)
    return torch.stack(images)
