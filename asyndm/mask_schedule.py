"""User masks -> per-pixel priorities, previews of the timestep maps they give, and table plots.

Pure torch helpers behind the mask and schedule-file nodes:
- `as_mask` / `stack_item_masks`: validate ComfyUI MASK tensors and stack them as (B, items, H, W);
- `feather` (Gaussian blur) and `apply_threshold` (below = background, above = soft priority);
- `priority_map`: k per pixel, k_map = max_j(mask_j * k_j), 0 = background (the sampler's rule);
- `preview_states`: the timestep states a sampler would give each pixel for a fixed k map;
- `normalize_attention`: averaged cross-attention (B, h*w, items) as per-item maps scaled to [0, 1];
- `plot_table`: a ScheduleTable's levels drawn as curves (timestep against progress) in an IMAGE;
- `table_tracks`: the timesteps a background pixel and key pixels of given k see over a run that
  follows a table (the numbers behind the loader's in-node plot).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .checks import check_fraction, check_positive_int, describe_shape
from .schedule_table import ScheduleTable, table_step
from .schedules import step

__all__ = [
    "as_mask",
    "stack_item_masks",
    "feather",
    "gaussian_kernel",
    "apply_threshold",
    "priority_map",
    "preview_size",
    "preview_states",
    "normalize_attention",
    "plot_table",
    "table_tracks",
]


def as_mask(name: str, mask: object) -> torch.Tensor:
    """A ComfyUI MASK ((H, W), (B, H, W) or (B, 1, H, W)) as float32 CPU (B, H, W) clamped to [0, 1].

    NaN or infinite values are refused with a ValueError naming the input.
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a MASK tensor, got {type(mask).__name__}")
    m = mask
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.ndim != 3:
        raise ValueError(f"{name} must have shape (batch, height, width), got {describe_shape(mask)}")
    if min(m.shape) < 1:
        raise ValueError(f"{name} is empty (shape {describe_shape(mask)})")
    m = m.detach().to("cpu", torch.float32)  # schedules are small values shared between nodes: keep them on the CPU
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} holds NaN or infinite values: fix the node that produced it (masks lie in [0, 1])")
    return m.clamp(0.0, 1.0)


def stack_item_masks(masks: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """(name, (B_i, H_i, W_i)) per item -> (B, items, H, W) at the first mask's size.

    Other sizes are resized bilinearly (as the sampler resizes to the latent). Each batch is 1 or
    the common batch B; a batch-1 mask is shared by every image.
    """
    if not masks:
        raise ValueError("at least one mask is needed")
    first_name, first = masks[0]
    h, w = int(first.shape[-2]), int(first.shape[-1])
    batches = {int(m.shape[0]) for _, m in masks} - {1}
    if len(batches) > 1:
        sizes = ", ".join(f"{n}: {int(m.shape[0])}" for n, m in masks)
        raise ValueError(f"the masks have different batch sizes ({sizes}): give each mask batch 1 or the same batch")
    b = batches.pop() if batches else 1
    out = []
    for _, m in masks:
        if tuple(m.shape[-2:]) != (h, w):
            m = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        out.append(m.expand(b, h, w))
    return torch.stack(out, dim=1).clamp(0.0, 1.0)


def gaussian_kernel(radius: float) -> torch.Tensor:
    """1-D normalized Gaussian of half-width ceil(radius) and sigma = radius / 2 (float64)."""
    r = float(radius)
    if not (r > 0 and math.isfinite(r)):
        raise ValueError(f"feather radius must be a positive finite number, got {radius!r}")
    half = math.ceil(r)
    sigma = r / 2.0
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def feather(masks: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian blur over the last two dims (any leading dims), edges replicated; radius 0 = none.

    The kernel spans +-ceil(radius) pixels with sigma = radius / 2, so `radius` is roughly how far
    an edge spreads.
    """
    r = float(radius)
    if r == 0.0:
        return masks
    kernel = gaussian_kernel(r).to(masks.dtype if masks.is_floating_point() else torch.float32)
    lead = masks.shape[:-2]
    h, w = masks.shape[-2:]
    x = masks.reshape(-1, 1, h, w).to(kernel.dtype)
    half = kernel.numel() // 2
    x = F.pad(x, (half, half, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, half, half), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.reshape(*lead, h, w).to(masks.dtype).clamp(0.0, 1.0)


def apply_threshold(masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """Values below `threshold` become 0 (background); values at or above it are kept as they are."""
    thr = check_fraction("threshold", threshold)
    return torch.where(masks >= thr, masks, torch.zeros_like(masks))


def priority_map(masks: torch.Tensor, k: Sequence[float]) -> torch.Tensor:
    """k per pixel from (B, items, H, W) masks in [0, 1]: max_j(mask_j * k_j); 0 = background."""
    if masks.ndim != 4:
        raise ValueError(f"masks must have shape (batch, items, height, width), got {describe_shape(masks)}")
    if len(k) != masks.shape[1]:
        raise ValueError(f"{masks.shape[1]} masks but {len(k)} priorities: give one k per mask")
    kvec = torch.tensor([check_fraction(f"k[{j}]", v) for j, v in enumerate(k)], dtype=masks.dtype,
                        device=masks.device)
    if masks.shape[1] == 0:
        return masks.new_zeros(masks.shape[0], masks.shape[2], masks.shape[3])
    return (masks.clamp(0.0, 1.0) * kvec.view(1, -1, 1, 1)).amax(dim=1)


def preview_size(height: int, width: int, max_side: int = 64) -> tuple[int, int]:
    """(H, W) scaled down (never up) so the longer side is at most max_side, keeping the aspect."""
    h = check_positive_int("height", height)
    w = check_positive_int("width", width)
    m = check_positive_int("max_side", max_side)
    if max(h, w) <= m:
        return h, w
    scale = m / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _next(s: torch.Tensor, k_map: torch.Tensor, remaining: int, *, curve: str, table: ScheduleTable | None,
          num_steps: int, num_train_timesteps: int, offset: int) -> torch.Tensor:
    """One transition as the asynchronous sampler takes it: background linear, k > 0 on the curve."""
    linear = step(s, remaining, curve="linear", k=0.0, num_steps=num_steps, num_train_timesteps=num_train_timesteps,
                  target=float(offset))
    if not bool((k_map > 0).any()):
        return linear
    if table is not None:
        curved = table_step(s, remaining, table=table, k=k_map, num_steps=num_steps,
                            num_train_timesteps=num_train_timesteps, offset=float(offset))
    else:
        curved = step(s, remaining, curve=curve, k=k_map, num_steps=num_steps,
                      num_train_timesteps=num_train_timesteps, target=float(offset))
    return torch.where(k_map > 0, curved, linear)


def preview_states(k_map: torch.Tensor, *, curve: str = "bin", num_steps: int = 20,
                   table: ScheduleTable | None = None, num_train_timesteps: int = 1000,
                   offset: int = 1) -> list[torch.Tensor]:
    """The timestep state each pixel is given at each of num_steps steps, for a fixed k map (B, H, W).

    The first state is one update from T + offset (981 on the background for 50 steps); pixels with
    k = 0 follow the straight background line, the others `curve` (or `table` when given) with their
    own k. Returns num_steps tensors of shape (B, H, W) (float64), as the sampler's StepRecord.states.
    """
    n = check_positive_int("num_steps", num_steps)
    if k_map.ndim != 3:
        raise ValueError(f"k_map must have shape (batch, height, width), got {describe_shape(k_map)}")
    k = k_map.detach().to(torch.float64)
    if not bool(((k >= 0) & (k <= 1)).all()):
        raise ValueError("k_map holds values outside [0, 1] (or NaN); expected priorities in [0, 1]")
    def advance(s: torch.Tensor, remaining: int) -> torch.Tensor:
        if remaining == 0:
            return torch.zeros_like(s)
        return _next(s, k, remaining, curve=curve, table=table, num_steps=n, num_train_timesteps=num_train_timesteps,
                     offset=offset)

    s = advance(torch.full(k.shape, float(num_train_timesteps + offset), dtype=torch.float64, device=k.device), n)
    states = []
    for i in range(n):
        states.append(s)
        s = advance(s, n - i - 1)
    return states


def table_tracks(table: ScheduleTable, k: Sequence[float], *, num_steps: int, num_train_timesteps: int = 1000,
                 offset: int = 1) -> torch.Tensor:
    """The timestep of every step for the background and for key pixels with priorities k following `table`.

    Returns a float64 tensor of shape (1 + len(k), num_steps + 1): row 0 is the background (the straight
    line), row j + 1 a pixel with priority k[j]; column i < num_steps is the timestep of the model call at
    step i (as `preview_states`, i.e. as the sampler moves a pixel whose class does not change), the last
    column the final 0. A k of 0 gives the background's row.
    """
    n = check_positive_int("num_steps", num_steps)
    ks = [check_fraction("k", float(v)) for v in k]
    k_map = torch.tensor([[[0.0, *ks]]], dtype=torch.float64)  # (1, 1, 1 + items)
    states = preview_states(k_map, num_steps=n, table=table, num_train_timesteps=num_train_timesteps, offset=offset)
    rows = torch.stack([s[0, 0] for s in states], dim=1)  # (1 + items, N)
    return torch.cat([rows, torch.zeros(rows.shape[0], 1, dtype=torch.float64)], dim=1)


def normalize_attention(attn: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, h*w, items) attention -> (B, items, h, w) with each map divided by its maximum (0 stays 0)."""
    if attn.ndim != 3:
        raise ValueError(f"attention must have shape (batch, h*w, items), got {describe_shape(attn)}")
    gh, gw = (check_positive_int("grid height", grid[0]), check_positive_int("grid width", grid[1]))
    b, pixels, items = attn.shape
    if pixels != gh * gw:
        raise ValueError(f"grid {gh}x{gw} has {gh * gw} positions but the attention has {pixels}")
    a = attn.detach().float()
    if not bool(torch.isfinite(a).all()):
        raise ValueError("the attention holds NaN or infinite values")
    maps = a.clamp_min(0.0).permute(0, 2, 1).reshape(b, items, gh, gw)
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(1e-30), torch.zeros_like(maps)).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Plot of a table: drawn with torch only (no font: the axes are fixed, see the docstring).

BACKGROUND = (0.1, 0.1, 0.1)
AXES = (0.45, 0.45, 0.45)
LINE = (0.6, 0.6, 0.6)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp for increasing xp (1-D), clamped at the ends."""
    idx = torch.searchsorted(xp, x.clamp(float(xp[0]), float(xp[-1])), right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return fp[idx - 1] * (1 - w) + fp[idx] * w


def _level_colour(j: int, levels: int) -> tuple[float, float, float]:
    """Orange, brighter for higher levels (as the priority maps of the timestep strip)."""
    b = 1.0 if levels == 1 else 0.45 + 0.55 * j / (levels - 1)
    return (b, b * 0.55, b * 0.1)


def _draw_curve(canvas: torch.Tensor, rows: torch.Tensor, x0: int, colour: tuple[float, float, float],
                thickness: int = 1) -> None:
    """Join the points (x0 + j, rows[j]) with vertical runs per column, `thickness` pixels each way."""
    h = canvas.shape[0]
    r = rows.round().long()
    nxt = torch.cat([r[1:], r[-1:]])
    lo = torch.minimum(r, nxt) - thickness
    hi = torch.maximum(r, nxt) + thickness
    yy = torch.arange(h).view(-1, 1)
    hit = (yy >= lo.view(1, -1)) & (yy <= hi.view(1, -1))  # (h, columns)
    cols = hit.shape[1]
    for side in range(-thickness, thickness + 1):  # horizontal thickness
        a, b = max(0, x0 + side), min(canvas.shape[1], x0 + side + cols)
        if b <= a:
            continue
        part = hit[:, a - (x0 + side): b - (x0 + side)]
        region = canvas[:, a:b]
        region[part] = torch.tensor(colour, dtype=canvas.dtype)


def plot_table(table: ScheduleTable, *, size: int = 256, margin: int = 12) -> torch.Tensor:
    """A (1, size, size, 3) IMAGE of the table: x = progress 0 -> 1 (left to right), y = normalized
    timestep (top = 1, pure noise; bottom = 0). Grey diagonal: the background line 1 - u; orange:
    one curve per priority level, brighter for higher k. Axes along the left and bottom edges."""
    side = check_positive_int("size", size)
    m = int(margin)
    if side < 2 * m + 8:
        raise ValueError(f"size {size} is too small for the margin {margin}")
    canvas = torch.empty(side, side, 3)
    canvas[:] = torch.tensor(BACKGROUND)
    span = side - 1 - 2 * m
    cols = span + 1
    u = torch.linspace(0.0, 1.0, cols, dtype=torch.float64)
    canvas[m: side - m, m] = torch.tensor(AXES)  # y axis (u = 0)
    canvas[side - 1 - m, m: side - m] = torch.tensor(AXES)  # x axis (tau = 0)

    def rows_of(tau: torch.Tensor) -> torch.Tensor:
        return m + (1.0 - tau.clamp(0.0, 1.0)) * span

    _draw_curve(canvas, rows_of(1.0 - u), m, LINE, thickness=0)
    prog = table.progress.to(torch.float64)
    levels = table.timesteps.shape[0]
    for j in range(levels):
        tau = _interp(u, prog, table.timesteps[j].to(torch.float64))
        _draw_curve(canvas, rows_of(tau), m, _level_colour(j, levels), thickness=1)
    return canvas.unsqueeze(0)
