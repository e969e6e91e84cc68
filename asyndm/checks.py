"""Cheap input checks shared by the numeric modules.

These functions run every sampling step, so every tensor condition of one call is folded into a
single device-to-host read; the slower, per-condition diagnosis runs only once a check has failed.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

__all__ = [
    "all_true",
    "as_count",
    "broadcasts_to",
    "check_fraction",
    "check_positive_int",
    "describe_shape",
    "require_float_tensor",
]


def describe_shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def all_true(flags: Sequence[torch.Tensor]) -> bool:
    """True when every element of every boolean tensor is True, read back with one host sync."""
    if not flags:
        return True
    return bool(torch.stack([f.all() for f in flags]).all())


def broadcasts_to(small: torch.Size | tuple[int, ...], big: torch.Size | tuple[int, ...]) -> bool:
    """True when `small` broadcasts to exactly `big` (the result keeps big's shape)."""
    if len(small) > len(big):
        return False
    return all(a in (1, b) for a, b in zip(reversed(tuple(small)), reversed(tuple(big)), strict=False))


def require_float_tensor(name: str, value: object) -> torch.Tensor:
    """Refuse anything but a floating-point tensor, naming the argument."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def as_count(name: str, value: object, *, minimum: int) -> int:
    """A Python integer >= minimum (bool refused: it is almost always a mistake)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {n}")
    return n


def check_positive_int(name: str, value: object) -> int:
    return as_count(name, value, minimum=1)


def check_fraction(name: str, value: float) -> float:
    """A finite Python number in [0, 1] (NaN fails the comparison and is refused too)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return v
