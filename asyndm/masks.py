"""Item masks: which latent pixels belong to which of the prompt's key items.

The masks decide which pixels leave the background schedule. They come from the cross-attention
of each item's token (method.md, "Which pixels are prompt related"): a pixel is in an item where
that item's attention is at least `threshold` times its spatial mean, and a pixel in several items
goes to the one with the highest priority, so every pixel follows exactly one curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .checks import all_true, as_count, check_fraction, check_positive_int, describe_shape, require_float_tensor

__all__ = ["item_masks", "initial_item_masks", "priority_map"]


def _size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {tuple(size)!r}")
    return check_positive_int("size[0] (height)", size[0]), check_positive_int("size[1] (width)", size[1])


def _grid(pixels: int, grid: Sequence[int] | None) -> tuple[int, int]:
    """The attention grid (h, w): given, or square."""
    if grid is None:
        side = math.isqrt(pixels)
        if side * side != pixels:
            raise ValueError(
                f"attention has {pixels} positions, which is not a square grid: pass grid=(h, w) with h * w = {pixels}"
            )
        return side, side
    gh, gw = _size(grid)
    if gh * gw != pixels:
        raise ValueError(f"grid {gh}x{gw} has {gh * gw} positions but the attention has {pixels}")
    return gh, gw


def _k_tensor(k: Sequence[float] | torch.Tensor, items: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(k, torch.Tensor):
        if k.ndim != 1:
            raise ValueError(f"k must be 1-D with one priority per item, got shape {describe_shape(k)}")
        vec = k.to(device=like.device, dtype=torch.float32 if not k.is_floating_point() else k.dtype)
    else:
        vec = torch.tensor([check_fraction(f"k[{j}]", v) for j, v in enumerate(k)], device=like.device)
    if vec.shape[0] != items:
        raise ValueError(f"the attention has {items} items but {vec.shape[0]} priorities were given: one k per item")
    return vec


def _members(attn: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, hw, items) bool: the pixel is in the item where its attention is at least threshold times the item's
    mean over pixels (method.md's rule)."""
    reference = attn.mean(dim=1, keepdim=True)
    if threshold != 1.0:  # x * 1.0 is x: one op fewer at the usual threshold
        reference = reference * threshold
    return attn >= reference


def item_masks(
    attn: torch.Tensor,
    k: Sequence[float] | torch.Tensor,
    *,
    threshold: float = 1.0,
    size: Sequence[int],
    grid: Sequence[int] | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Binary, non-overlapping item masks (B, items, H, W) from averaged attention (B, h*w, items).

    A pixel is in item j where attn >= threshold * (mean of item j's attention over pixels); of the
    items it is in, it keeps only the one with the largest k (ties: the first). The (h, w) grid is
    upsampled to size = (H, W) by nearest neighbour. validate=False skips the check of attn's and k's
    values (it reads them back to the host): for callers that made them (the sampler, every step).
    """
    attn = require_float_tensor("attn", attn)
    if attn.ndim != 3:
        raise ValueError(f"attn must have shape (batch, h*w, items), got {describe_shape(attn)}")
    height, width = _size(size)
    b, pixels, items = attn.shape
    gh, gw = _grid(pixels, grid)
    try:
        thr = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}") from None
    if not (0.0 <= thr < math.inf):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    kvec = _k_tensor(k, items, attn)
    if validate and not all_true([torch.isfinite(attn), (kvec >= 0) & (kvec <= 1)]):
        if not bool(torch.isfinite(attn).all()):
            raise ValueError("attn holds NaN or infinite values; expected attention probabilities")
        raise ValueError("k holds values outside [0, 1] (or NaN); expected priorities in [0, 1]")
    if items == 0:
        return attn.new_zeros(b, 0, height, width)

    member = _members(attn, thr)  # (B, hw, items)
    # Non-members rank below every member (k >= 0), so argmax picks the best item a pixel is in;
    # argmax returns the first of equal maxima, which is the tie rule.
    rank = torch.where(member, kvec.to(attn.dtype).view(1, 1, -1), torch.full_like(attn, -1.0))
    best = rank.argmax(dim=-1)  # (B, hw)
    winner = (best[..., None] == torch.arange(items, device=best.device)) & member  # one-hot, without its range check
    masks = winner.to(attn.dtype).permute(0, 2, 1).reshape(b, items, gh, gw)
    if (gh, gw) != (height, width):
        masks = F.interpolate(masks, size=(height, width), mode="nearest")
    return masks


def priority_map(attn: torch.Tensor, k: torch.Tensor, *, threshold: float, size: Sequence[int],
                 grid: Sequence[int]) -> torch.Tensor:
    """(B, H, W): each pixel's priority, the k of the item item_masks gives it (0: background), which is what
    (item_masks(attn, k, ...) * k).amax(items) gives, bit for bit: of the items a pixel is in, the largest k
    (the tie rule picks among equal k, so it does not change the value). k: (items,) float32 on attn's
    device. Unchecked values (it reads nothing back): for the sampler, on the maps it made, every step."""
    b, pixels, items = attn.shape
    gh, gw = _size(grid)
    if gh * gw != pixels or k.shape != (items,):
        raise ValueError(f"attention of shape {tuple(attn.shape)} does not fit grid {gh}x{gw} and {tuple(k.shape)} k")
    picked = (_members(attn, float(threshold)) * k.to(attn.dtype)).amax(dim=-1)  # (B, hw): the largest k of its items
    height, width = _size(size)
    if (gh, gw) == (height, width):
        return picked.view(b, gh, gw)
    return F.interpolate(picked.view(b, 1, gh, gw), size=(height, width), mode="nearest")[:, 0]


def initial_item_masks(
    batch: int,
    token_positions: Sequence[int],
    size: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Masks before any attention exists: every pixel belongs to the item whose token comes last.

    This is the reference's start (the item with the largest token position, the first of equal
    ones), so the whole image begins on that item's curve. Shape (batch, items, H, W).
    """
    b = check_positive_int("batch", batch)
    height, width = _size(size)
    positions = [as_count(f"token_positions[{j}]", p, minimum=0) for j, p in enumerate(token_positions)]
    out = torch.zeros(b, len(positions), height, width, device=device, dtype=dtype)
    if positions:
        last = max(range(len(positions)), key=lambda j: (positions[j], -j))
        out[:, last] = 1
    return out
