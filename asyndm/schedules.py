"""Per-pixel timestep schedules: where each pixel's (float) timestep goes next.

Every pixel carries its own timestep state s. At each step it moves towards `target` (the
scheduler's offset) so that it arrives there after the `remaining` steps; background pixels move
on a straight line, pixels of a key object on a concave curve that keeps them noisy for longer
(method.md, "Per-pixel schedule curves"). Curves are evaluated from the pixel's current value, so a
pixel that changes class continues smoothly from where it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from .checks import (
    all_true,
    as_count,
    broadcasts_to,
    check_fraction,
    check_positive_int,
    describe_shape,
    require_float_tensor,
)

__all__ = ["SCHEDULE_CURVES", "NUMPY_CURVES", "step", "next_state", "history_states", "numpy_curve_constants",
           "numpy_history_states", "numpy_state_step", "timestep_maps"]

SCHEDULE_CURVES = ("linear", "bin", "lin", "exp")
NUMPY_CURVES = ("bin", "linear")  # the curves numpy_history_states runs

Remaining = int | torch.Tensor
Priority = float | torch.Tensor


# ------------------------------------------------------------------------------------------------
# The arithmetic, unchecked.


def _curve(s: torch.Tensor, r: int | torch.Tensor, k: Priority, curve: str, *, n: int, t: int, target: float) -> torch.Tensor:
    """One update for remaining r >= 1 (r may be a tensor with every element >= 1)."""
    # The linear step is written exactly like sigma_map.background_track, so a background pixel's
    # state equals its anchor bit for bit.
    linear = s + (target - s) / r
    if curve == "linear":
        out = linear
    elif curve == "bin":
        # The parabola of fixed curvature -k T / N^2 through (0, s) and (r, target), evaluated at
        # x = 1, simplifies to the linear step plus k T / N^2 (r - 1). This form has no division
        # by k, so k = 0 is exactly the linear step (an added zero).
        out = linear + k * (t / (n * n)) * (r - 1)
    elif curve == "lin":
        slow = s - (1 - k) * (t / n)
        fast = target + (1 + k) * (t / n) * (r - 1)
        out = torch.minimum(slow, torch.as_tensor(fast, dtype=s.dtype, device=s.device))
    else:  # "exp"
        b = -(1 - k) * (t / n)
        lam = 1.0 / n
        denom = -torch.expm1(lam * r) if isinstance(r, torch.Tensor) else -math.expm1(lam * r)
        out = s + b + (math.expm1(lam) / denom) * (s - target + b * r)
    # Timesteps never increase (a pixel joining an object near the end would otherwise climb back).
    return torch.minimum(out, s)


def _advance(s: torch.Tensor, remaining: Remaining, k: Priority, curve: str, *, n: int, t: int,
             target: float) -> torch.Tensor:
    """The next state, 0 where no step remains."""
    if isinstance(remaining, torch.Tensor):
        done = remaining == 0
        r_safe = torch.where(done, torch.ones_like(remaining), remaining).to(s.dtype)
        out = _curve(s, r_safe, k, curve, n=n, t=t, target=target)
        return torch.where(done, torch.zeros_like(out), out)
    if remaining == 0:
        return torch.zeros_like(s)
    return _curve(s, remaining, k, curve, n=n, t=t, target=target)


# ------------------------------------------------------------------------------------------------
# Argument checks.


def _check_common(curve: str, num_steps: int, num_train_timesteps: int, target: float) -> tuple[int, int, float]:
    if curve not in SCHEDULE_CURVES:
        raise ValueError(f"unknown curve {curve!r}: expected one of {', '.join(SCHEDULE_CURVES)}")
    n = check_positive_int("num_steps", num_steps)
    t = check_positive_int("num_train_timesteps", num_train_timesteps)
    try:
        tgt = float(target)
    except (TypeError, ValueError):
        raise ValueError(f"target must be a finite number, got {target!r}") from None
    if not math.isfinite(tgt):
        raise ValueError(f"target must be a finite number, got {target!r}")
    return n, t, tgt


def _prepare_remaining(remaining: object, s: torch.Tensor) -> tuple[Remaining, list[torch.Tensor]]:
    """An int >= 0, or a tensor broadcastable to s (its sign is checked with the other flags)."""
    if isinstance(remaining, torch.Tensor):
        if remaining.is_complex() or remaining.dtype == torch.bool:
            raise ValueError(f"remaining must hold whole step counts, got dtype {remaining.dtype}")
        if not broadcasts_to(remaining.shape, s.shape):
            raise ValueError(
                f"remaining of shape {describe_shape(remaining)} does not broadcast to the state's shape {describe_shape(s)}"
            )
        remaining = remaining.to(s.device)
        flags = [remaining >= 0]
        if remaining.is_floating_point():
            flags.append(torch.isfinite(remaining))
        return remaining, flags
    return as_count("remaining", remaining, minimum=0), []


def _prepare_k(k: object, s: torch.Tensor) -> tuple[Priority, list[torch.Tensor]]:
    """A number in [0, 1], or a tensor broadcastable to s whose values are checked later."""
    if isinstance(k, torch.Tensor):
        if not k.is_floating_point():
            k = k.to(s.dtype)
        if not broadcasts_to(k.shape, s.shape):
            raise ValueError(f"k of shape {describe_shape(k)} does not broadcast to the state's shape {describe_shape(s)}")
        k = k.to(device=s.device, dtype=s.dtype)
        return k, [(k >= 0) & (k <= 1)]  # NaN fails both comparisons
    return check_fraction("k", k), []  # type: ignore[arg-type]


def _diagnose(s: torch.Tensor, remaining: Remaining, k: Priority) -> None:
    """Called only after the combined check failed: say which input was wrong."""
    if not bool(torch.isfinite(s).all()):
        raise ValueError("the timestep state s holds NaN or infinite values; expected finite timesteps")
    if isinstance(remaining, torch.Tensor):
        if not bool((remaining >= 0).all()):
            raise ValueError("remaining holds negative values (or NaN); expected whole step counts >= 0")
    if isinstance(k, torch.Tensor) and not bool(((k >= 0) & (k <= 1)).all()):
        raise ValueError("k holds values outside [0, 1] (or NaN); expected priorities in [0, 1]")


# ------------------------------------------------------------------------------------------------
# Public API.


def step(
    s: torch.Tensor,
    remaining: Remaining,
    *,
    curve: str,
    k: Priority,
    num_steps: int,
    num_train_timesteps: int = 1000,
    target: float = 1.0,
) -> torch.Tensor:
    """Next timestep state of pixels that all follow `curve` ("linear", "bin", "lin" or "exp").

    s: float tensor of any shape; remaining: steps left after this one (int, or a tensor that
    broadcasts to s); k: priority in [0, 1] (number or tensor broadcastable to s; ignored by
    "linear"). remaining == 0 gives 0. The result is never larger than s.
    """
    n, t, tgt = _check_common(curve, num_steps, num_train_timesteps, target)
    s = require_float_tensor("s", s)
    remaining, r_flags = _prepare_remaining(remaining, s)
    k, k_flags = _prepare_k(k, s)
    if not all_true([torch.isfinite(s), *r_flags, *k_flags]):
        _diagnose(s, remaining, k)
    return _advance(s, remaining, k, curve, n=n, t=t, target=tgt)


def _k_vector(k: Sequence[float] | torch.Tensor, items: int, like: torch.Tensor) -> torch.Tensor:
    """One priority per item as a 1-D tensor on like's device and dtype."""
    if isinstance(k, torch.Tensor):
        if k.ndim != 1:
            raise ValueError(f"k must be 1-D with one priority per item, got shape {describe_shape(k)}")
        vec = k.to(device=like.device, dtype=like.dtype)
    else:
        vec = torch.tensor([check_fraction(f"k[{j}]", v) for j, v in enumerate(k)], dtype=like.dtype, device=like.device)
    if vec.shape[0] != items:
        raise ValueError(f"{items} item masks but {vec.shape[0]} priorities: give one k per item")
    return vec


def _check_item_masks(item_masks: object, batch_hw: tuple[int, ...] | None) -> torch.Tensor:
    masks = require_float_tensor("item_masks", item_masks)
    if masks.ndim != 4:
        raise ValueError(f"item_masks must have shape (batch, items, height, width), got {describe_shape(masks)}")
    if batch_hw is not None and (masks.shape[0], masks.shape[2], masks.shape[3]) != batch_hw:
        raise ValueError(
            f"item_masks of shape {describe_shape(masks)} do not match the state's (batch, height, width) = {batch_hw}"
        )
    return masks


def _mask_flags(masks: torch.Tensor) -> list[torch.Tensor]:
    """Masks are 0 or 1 (NaN fails), with at most one item per pixel."""
    binary = (masks == 0) | (masks == 1)
    return [binary, masks.sum(dim=1) <= 1]


def _diagnose_masks(masks: torch.Tensor) -> None:
    if not bool(((masks == 0) | (masks == 1)).all()):
        raise ValueError("item_masks must hold only 0 and 1 (no NaN, no soft values); binarise them first")
    if not bool((masks.sum(dim=1) <= 1).all()):
        raise ValueError("item_masks overlap: each pixel may belong to at most one item (see masks.item_masks)")


def _next_state_unchecked(s: torch.Tensor, masks: torch.Tensor, kvec: torch.Tensor, remaining: Remaining,
                          curve: str, *, n: int, t: int, target: float) -> torch.Tensor:
    linear = _advance(s, remaining, 0.0, "linear", n=n, t=t, target=target)
    if masks.shape[1] == 0 or curve == "linear":
        return linear
    in_item = masks.sum(dim=1) > 0.5
    k_map = (masks * kvec.view(1, -1, 1, 1)).sum(dim=1)
    curved = _advance(s, remaining, k_map, curve, n=n, t=t, target=target)
    return torch.where(in_item, curved, linear)


def next_state(
    s: torch.Tensor,
    item_masks: torch.Tensor,
    k: Sequence[float] | torch.Tensor,
    remaining: Remaining,
    *,
    curve: str,
    num_steps: int,
    num_train_timesteps: int = 1000,
    target: float = 1.0,
) -> torch.Tensor:
    """Next state when background pixels follow "linear" and pixels of item j follow `curve` with k[j].

    s: (B, H, W); item_masks: (B, items, H, W) of 0/1 with at most one item per pixel (items may
    be 0: all background); k: one priority in [0, 1] per item.
    """
    n, t, tgt = _check_common(curve, num_steps, num_train_timesteps, target)
    s = require_float_tensor("s", s)
    if s.ndim != 3:
        raise ValueError(f"s must have shape (batch, height, width), got {describe_shape(s)}")
    masks = _check_item_masks(item_masks, tuple(s.shape))
    kvec = _k_vector(k, masks.shape[1], s)
    remaining, r_flags = _prepare_remaining(remaining, s)
    m_flags = _mask_flags(masks)
    k_flags = [(kvec >= 0) & (kvec <= 1)]
    if not all_true([torch.isfinite(s), *r_flags, *k_flags, *m_flags]):
        _diagnose(s, remaining, kvec)
        _diagnose_masks(masks)
    return _next_state_unchecked(s, masks.to(s.dtype), kvec, remaining, curve, n=n, t=t, target=tgt)


def history_states(
    start: torch.Tensor,
    history: torch.Tensor,
    *,
    first: int = 0,
    curve: str,
    num_steps: int,
    num_train_timesteps: int = 1000,
    target: float = 1.0,
) -> torch.Tensor:
    """The states of rows that each follow their own priority history, from column `first` on.

    history: (U, num_steps) the priority with which each row takes each step (0: the background's
    linear step, k > 0: `curve` with that k, as ``step`` takes them); start: (U,) each row's state
    before step `first`. Returns (U, num_steps + 1 - first): the states after steps first ..
    num_steps - 1, then 0. Checked once for the whole table rather than once per step: the
    re-partitions of dynamic masks run this for every new history, every step.
    """
    n, t, tgt = _check_common(curve, num_steps, num_train_timesteps, target)
    s = require_float_tensor("start", start)
    history = require_float_tensor("history", history)
    if history.ndim != 2 or history.shape[1] != n or s.shape != history.shape[:1]:
        raise ValueError(f"need history (rows, {n}) and start (rows,), got {describe_shape(history)} and "
                         f"{describe_shape(s)}")
    first = as_count("first", first, minimum=0)
    k = history.to(s.dtype)
    if curve in NUMPY_CURVES and s.device.type == "cpu" and k.device.type == "cpu":
        return _host_history_states(s, k, first, curve, n=n, t=t, target=tgt)
    if not all_true([torch.isfinite(s), (k >= 0) & (k <= 1)]):
        _diagnose(s, 1, k)
    keyed = (k[:, first:] > 0).any(dim=0).tolist()
    states = []
    for i, any_key in enumerate(keyed, start=first):
        if any_key and curve == "bin":  # k = 0 on "bin" is the linear step exactly (an added zero)
            s = _advance(s, n - i, k[:, i], curve, n=n, t=t, target=tgt)
        elif any_key and curve != "linear":
            linear = _advance(s, n - i, 0.0, "linear", n=n, t=t, target=tgt)
            s = torch.where(k[:, i] > 0, _advance(s, n - i, k[:, i], curve, n=n, t=t, target=tgt), linear)
        else:
            s = _advance(s, n - i, 0.0, "linear", n=n, t=t, target=tgt)
        states.append(s)
    states.append(torch.zeros_like(s))
    return torch.stack(states, dim=1)


def _host_history_states(s: torch.Tensor, k: torch.Tensor, first: int, curve: str, *, n: int, t: int,
                         target: float) -> torch.Tensor:
    """history_states for "bin" and "linear" on CPU tensors, in numpy (numpy_history_states), checked."""
    states_in = s.detach().numpy()
    ks = k.detach().numpy()
    if not (np.isfinite(states_in).all() and ((ks >= 0) & (ks <= 1)).all()):
        _diagnose(s, 1, k)
    return torch.from_numpy(np.ascontiguousarray(numpy_history_states(states_in, ks, first, curve, n=n, t=t,
                                                                      target=target)))


def numpy_history_states(states_in: np.ndarray, ks: np.ndarray, first: int, curve: str, *, n: int, t: int,
                         target: float) -> np.ndarray:
    """history_states for "bin" and "linear" on numpy rows, unchecked (states finite, k in [0, 1]): the same
    IEEE operations in the same order and dtype as _curve (Python numbers taken in the array's dtype, as torch
    takes them), without a torch dispatch per operation on these few-element rows (a re-partition runs this
    every step, on rows it made from checked ones)."""
    if curve not in NUMPY_CURVES:
        raise ValueError(f"numpy_history_states runs the bin and linear curves, not {curve!r}")
    tgt, bend = numpy_curve_constants(states_in.dtype, target, t=t, n=n)
    out = np.empty((n + 1 - first, states_in.shape[0]), dtype=states_in.dtype)  # a state column per row: contiguous
    cur = states_in
    # The curve's k * bend of every step at once (the same products), and which steps have a key row: taken out of
    # the loop, whose numpy calls are the cost on these few-element rows.
    keyed: list[bool] = [False] * (n - first)
    if curve == "bin":
        keyed = cast("list[bool]", (ks[:, first:n] > 0).any(axis=0).tolist())
    bent = ks[:, first:n].T * bend if any(keyed) else None
    for col, i in enumerate(range(first, n)):
        cur = numpy_state_step(cur, bent[col] if keyed[col] and bent is not None else None, n - i, tgt,
                               out=out[col])
    out[-1] = 0
    return out.T


def numpy_curve_constants(dtype: np.dtype, target: float, *, t: int, n: int) -> tuple[np.floating, np.floating]:
    """(target, the "bin" curve's bend T / N^2) in the states' dtype, as numpy_state_step takes them."""
    kind = np.dtype(dtype).type
    return kind(target), kind(t / (n * n))


def numpy_state_step(cur: np.ndarray, bent: np.ndarray | None, remaining: int, target: np.floating,
                     out: np.ndarray | None = None) -> np.ndarray:
    """One column of numpy_history_states: the states after `cur` with `remaining` steps left (r = N - i for the
    state i), in cur's dtype. bent: each row's k * bend ("bin"), or None where no row of the column is keyed (k = 0
    adds an exact zero: the linear step)."""
    kind = cur.dtype.type
    r = kind(remaining)
    nxt = cur + (target - cur) / r  # the linear step
    if bent is not None:
        nxt = nxt + bent * (r - kind(1))
    stepped: np.ndarray = np.minimum(nxt, cur, out=out)
    return stepped


def timestep_maps(
    item_masks: torch.Tensor,
    k: Sequence[float] | torch.Tensor,
    *,
    curve: str = "bin",
    num_steps: int = 50,
    num_train_timesteps: int = 1000,
    offset: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Every state the model sees for fixed masks: (num_steps + 1, B, H, W), the last one all 0.

    Starts from T + offset before the first update (as the reference does), so the linear track
    is 981, 961, ..., 1, 0 for N = 50; all curves aim at `offset`.
    """
    n, t, _ = _check_common(curve, num_steps, num_train_timesteps, float(offset))
    off = as_count("offset", offset, minimum=0)
    masks = _check_item_masks(item_masks, None)
    b, items, h, w = masks.shape
    masks = masks.to(dtype)
    kvec = _k_vector(k, items, masks)
    if not all_true([(kvec >= 0) & (kvec <= 1), *_mask_flags(masks)]):
        if not bool(((kvec >= 0) & (kvec <= 1)).all()):
            raise ValueError("k holds values outside [0, 1] (or NaN); expected priorities in [0, 1]")
        _diagnose_masks(masks)
    s = torch.full((b, h, w), float(t + off), dtype=dtype, device=masks.device)
    states = []
    for i in range(n + 1):
        s = _next_state_unchecked(s, masks, kvec, n - i, curve, n=n, t=t, target=float(off))
        states.append(s)
    return torch.stack(states)
