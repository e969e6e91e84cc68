"""Learned (tabulated) schedules: normalized timestep against progress, per priority level.

A table gives, for each priority level k, the normalized timestep tau(u) in [0, 1] of a pixel at
sampling progress u in [0, 1] (tau = (s - offset) / T, so tau = 1 is pure noise and the background
follows tau = 1 - u). Like the analytic curves, a table step is taken from the pixel's current
value: s' - offset = (s - offset) * tau_k(u') / tau_k(u). A pixel on its level's curve follows the
table exactly; a pixel that changes class continues smoothly from where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ScheduleTable", "validate_table", "table_step", "table_from_curve"]

MAX_LEVELS = 64
MAX_POINTS = 10001


@dataclass(frozen=True)
class ScheduleTable:
    """progress (P,) increasing 0..1; timesteps (L, P) non-increasing in u; priorities (L,) increasing."""

    progress: torch.Tensor = field(compare=False)
    timesteps: torch.Tensor = field(compare=False)
    priorities: torch.Tensor = field(compare=False)
    curve: str = "learned"
    fitted_steps: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        validate_table(self.progress, self.timesteps, self.priorities)


def validate_table(progress: torch.Tensor, timesteps: torch.Tensor, priorities: torch.Tensor) -> None:
    """Raise ValueError naming the first problem with a table's tensors."""
    for name, t, nd in (("progress", progress, 1), ("timesteps", timesteps, 2), ("priorities", priorities, 1)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"'{name}' must be a floating-point tensor")
        if t.ndim != nd:
            raise ValueError(f"'{name}' must have {nd} dimension(s), got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"'{name}' holds NaN or infinite values")
    levels, points = timesteps.shape
    if not (1 <= levels <= MAX_LEVELS):
        raise ValueError(f"a table has 1 to {MAX_LEVELS} priority levels, got {levels}")
    if not (2 <= points <= MAX_POINTS):
        raise ValueError(f"a table has 2 to {MAX_POINTS} progress points, got {points}")
    if progress.shape[0] != points:
        raise ValueError(f"'progress' has {progress.shape[0]} points but 'timesteps' rows have {points}")
    if priorities.shape[0] != levels:
        raise ValueError(f"'priorities' has {priorities.shape[0]} values but 'timesteps' has {levels} rows")
    if abs(float(progress[0])) > 1e-6 or abs(float(progress[-1]) - 1.0) > 1e-6:
        raise ValueError("'progress' must run from 0 to 1")
    if not bool((progress[1:] > progress[:-1]).all()):
        raise ValueError("'progress' must be strictly increasing")
    if not bool(((timesteps >= 0) & (timesteps <= 1)).all()):
        raise ValueError("'timesteps' must lie in [0, 1] (normalized timesteps)")
    if not bool((timesteps[:, 1:] <= timesteps[:, :-1] + 1e-6).all()):
        raise ValueError("'timesteps' must be non-increasing along progress (a pixel's noise never grows)")
    if not bool((timesteps[:, 0] > 1 - 1e-3).all()) or not bool((timesteps[:, -1] < 1e-3).all()):
        raise ValueError("every level must start at timestep 1 (pure noise) and end at 0")
    if not bool(((priorities >= 0) & (priorities <= 1)).all()):
        raise ValueError("'priorities' must lie in [0, 1]")
    if not bool((priorities[1:] > priorities[:-1]).all()):
        raise ValueError("'priorities' must be strictly increasing")


def _tau(table: ScheduleTable, k: torch.Tensor, u: float) -> torch.Tensor:
    """tau_k(u) per pixel: interpolate the table in u, then in k (k below the first level blends
    with the background line 1 - u, k above the last level uses the last level)."""
    prog = table.progress.to(torch.float64)
    tab = table.timesteps.to(torch.float64)
    u = min(max(u, 0.0), 1.0)
    j = int(torch.searchsorted(prog, torch.tensor(u, dtype=torch.float64), right=True).clamp(1, prog.numel() - 1))
    w = (u - float(prog[j - 1])) / float(prog[j] - prog[j - 1])
    col = tab[:, j - 1] * (1 - w) + tab[:, j] * w  # (L,)
    pr = torch.cat([torch.zeros(1, dtype=torch.float64), table.priorities.to(torch.float64)])
    vals = torch.cat([torch.tensor([1.0 - u], dtype=torch.float64), col])
    if float(pr[1]) == 0.0:  # a level at k = 0 replaces the background line
        pr, vals = pr[1:], vals[1:]
    kk = k.to(torch.float64).clamp(0.0, float(pr[-1])).reshape(-1)
    idx = torch.searchsorted(pr, kk, right=True).clamp(1, max(pr.numel() - 1, 1))
    if pr.numel() == 1:
        return vals[0].expand_as(kk).reshape(k.shape)
    lo, hi = pr[idx - 1], pr[idx]
    wk = ((kk - lo) / (hi - lo)).clamp(0.0, 1.0)
    out = vals[idx - 1] * (1 - wk) + vals[idx] * wk
    return out.reshape(k.shape)


def table_step(s: torch.Tensor, remaining: int, *, table: ScheduleTable, k: torch.Tensor | float, num_steps: int,
               num_train_timesteps: int = 1000, offset: float = 1.0) -> torch.Tensor:
    """Next state of pixels with priority k following `table` (same contract as schedules.step)."""
    if remaining == 0:
        return torch.zeros_like(s)
    if not (0 <= remaining <= num_steps):
        raise ValueError(f"remaining must lie in 0..{num_steps}, got {remaining}")
    kt = torch.as_tensor(k, dtype=torch.float64, device=s.device).expand(s.shape)
    u_now = (num_steps - remaining) / num_steps
    u_next = (num_steps - remaining + 1) / num_steps
    now = _tau(table, kt, u_now).to(s.device)
    nxt = _tau(table, kt, u_next).to(s.device)
    ratio = torch.where(now > 0, nxt / now.clamp_min(1e-12), torch.zeros_like(now))
    out = offset + (s.to(torch.float64) - offset).clamp_min(0) * ratio
    return torch.minimum(out.to(s.dtype), s)


def table_from_curve(curve: str, priorities: list[float], *, num_steps: int = 50, num_train_timesteps: int = 1000,
                     offset: int = 1, description: str = "") -> ScheduleTable:
    """Tabulate an analytic curve family (one level per priority) on the steps' progress grid."""
    from .schedules import step

    rows = []
    for k in priorities:
        s = torch.tensor([float(num_train_timesteps + offset)], dtype=torch.float64)
        taus = [1.0]
        for i in range(num_steps):
            remaining = num_steps - i
            s = step(s, remaining, curve=curve, k=float(k), num_steps=num_steps,
                     num_train_timesteps=num_train_timesteps, target=float(offset))
            taus.append(max(0.0, (float(s) - offset) / num_train_timesteps))
        taus[-1] = 0.0
        rows.append(taus)
    progress = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32)
    timesteps = torch.tensor(rows, dtype=torch.float32).clamp(0, 1)
    timesteps = torch.cummin(timesteps, dim=1).values
    return ScheduleTable(progress=progress, timesteps=timesteps, priorities=torch.tensor(priorities, dtype=torch.float32),
                         curve=curve, fitted_steps=num_steps, description=description)
