"""Turn float timestep states into the integer timesteps a discrete model is called with."""

from __future__ import annotations

import torch

from .checks import check_positive_int, require_float_tensor

__all__ = ["round_clamp"]


def round_clamp(s: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """round(s) clamped to [0, T - 1], as a long tensor.

    The reference rounds and indexes alphas_cumprod directly, which runs past the end for the
    "bin" curve with k > ~0.944 (state 1000); clamping keeps every index valid. Rounding is
    torch.round (half to even), the same as the reference.
    """
    s = require_float_tensor("s", s)
    t = check_positive_int("num_train_timesteps", num_train_timesteps)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("the timestep state s holds NaN or infinite values; expected finite timesteps")
    return torch.round(s).clamp_(0, t - 1).long()
