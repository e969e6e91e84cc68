"""ASYNDM_SCHEDULE: an immutable description of how each pixel's timestep moves.

Values of this type flow between ComfyUI nodes, which cache and share them by reference, so it
is frozen; everything that changes during a run lives in the sampler's run state instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .schedule_table import ScheduleTable

CURVES = ("bin", "lin", "exp")
MASK_SOURCES = ("attention", "masks")

__all__ = ["AsynSchedule", "CURVES", "MASK_SOURCES", "DEFAULT_K", "DEFAULT_THRESHOLD"]

DEFAULT_K = 0.7
DEFAULT_THRESHOLD = 1.0


@dataclass(frozen=True)
class AsynSchedule:
    """How object pixels move and where the item masks come from.

    curve:      "bin", "lin" or "exp" (method.md); background pixels always follow the user's scheduler.
    k:          one priority in [0, 1] per item.
    mask_source:"attention" (items are prompt words, masks read from cross-attention) or "masks".
    words:      the key words / phrases (mask_source "attention").
    masks:      (B or 1, items, H, W) float in [0, 1] (mask_source "masks"); grey = soft priority.
    threshold:  attention binarisation threshold (x the per-item spatial mean).
    dynamic:    re-read attention every step (True) or once from a synchronous pre-pass (False).
    table:      a learned schedule; when set it replaces `curve` for the item pixels.
    """

    curve: str = "bin"
    k: tuple[float, ...] = ()
    mask_source: str = "attention"
    words: tuple[str, ...] = ()
    masks: torch.Tensor | None = field(default=None, compare=False)
    threshold: float = DEFAULT_THRESHOLD
    dynamic: bool = True
    table: ScheduleTable | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.curve not in CURVES:
            raise ValueError(f"unknown curve {self.curve!r}: use one of {', '.join(CURVES)}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"unknown mask source {self.mask_source!r}: use one of {', '.join(MASK_SOURCES)}")
        for v in self.k:
            if not (0.0 <= float(v) <= 1.0):
                raise ValueError(f"priority k must lie in [0, 1], got {v}")
        if not (self.threshold > 0.0 and self.threshold < float("inf")):
            raise ValueError(f"mask threshold must be a positive finite number, got {self.threshold}")
        if self.mask_source == "attention":
            if len(self.k) != len(self.words):
                raise ValueError(f"{len(self.words)} key words but {len(self.k)} priorities: give one k per word")
        else:
            if self.masks is None or self.masks.ndim != 4:
                raise ValueError("mask_source 'masks' needs masks of shape (batch, items, height, width)")
            if len(self.k) != self.masks.shape[1]:
                raise ValueError(f"{self.masks.shape[1]} masks but {len(self.k)} priorities: give one k per mask")
            if not bool(torch.isfinite(self.masks).all()):
                raise ValueError("the masks hold NaN or infinite values")

    @property
    def num_items(self) -> int:
        return len(self.k)

    @property
    def is_synchronous(self) -> bool:
        """True when no pixel can leave the background track (no items, or all k = 0)."""
        return self.num_items == 0 or all(float(v) == 0.0 for v in self.k)
