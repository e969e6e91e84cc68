"""Map AsynDM's timestep states onto the sigmas of the user's own scheduler.

The paper's schedules live in a "linear timestep" space: the background moves on the straight
line from T + offset to offset in N steps (981, 961, ..., 1 for N = 50), object pixels on concave
curves above it. A ComfyUI user picks any scheduler (karras, normal, ...), which gives one sigma
per step. Two mappings keep the background on those sigmas exactly:

- TimestepTable, when the scheduler's sigmas are the model's own sigmas at the background's
  rounded timesteps (ddim_uniform with N dividing T, and the reference sampler): every state s
  is the paper's integer timestep round(s), so every pixel gets the model's sigma at it, key
  pixels above the scheduler's first timestep included (995, 988, ... for bin, k = 0.7, N = 50).
- SigmaInterpolator otherwise: the background's linear values are anchored to the scheduler's
  sigmas and log-sigma is interpolated between anchors for pixels off the track.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SigmaInterpolator", "TimestepTable", "background_track", "state_to_sigma", "track_on_table"]


def background_track(
    num_steps: int, *, num_train_timesteps: int = 1000, offset: int = 1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The linear states seen at steps 0..N-1, computed by the same recurrence as the sampler.

    Using the recurrence (rather than a closed form) makes a background pixel's state equal to
    its anchor bit for bit, so it maps to the scheduler's sigma exactly.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if dtype in (torch.float32, torch.float64):  # numpy: the same IEEE operations in the same dtype, no dispatch each
        kind = np.float32 if dtype == torch.float32 else np.float64
        value, target_value = kind(num_train_timesteps + offset), kind(offset)
        values = np.empty(num_steps, dtype=kind)
        for i in range(num_steps):
            value = value + (target_value - value) / kind(num_steps - i)
            values[i] = value
        return torch.from_numpy(values)
    s = torch.tensor(float(num_train_timesteps + offset), dtype=dtype)
    target = float(offset)
    out = []
    for i in range(num_steps):
        remaining = num_steps - i
        s = s + (target - s) / remaining
        out.append(s)
    return torch.stack(out)


def track_on_table(carrier_sigmas: torch.Tensor, table: torch.Tensor, *, offset: int = 1) -> bool:
    """True when the first N carrier sigmas are exactly table[round(background track)].

    table is the model's sigma per integer timestep (length T). Then the scheduler samples the
    paper's own timesteps, and TimestepTable reproduces it for the background bit for bit.
    """
    if carrier_sigmas.ndim != 1 or carrier_sigmas.numel() < 2 or table.ndim != 1 or table.numel() < 2:
        return False
    n = carrier_sigmas.numel() - 1
    t = table.numel()
    track = background_track(n, num_train_timesteps=t, offset=offset)
    index = torch.round(track).clamp(0, t - 1).long().to(table.device)
    return torch.equal(carrier_sigmas[:n].to(table.device, table.dtype), table[index])


class TimestepTable:
    """state -> the model's sigma at the rounded (integer) timestep: the paper's sampler exactly.

    A state of exactly 0 (after the last step) maps to `final`: ComfyUI's last sigma (0) for a
    scheduler run, alphas_cumprod[0]'s sigma (table[0]) for the reference sampler.
    """

    def __init__(self, table: torch.Tensor, final: torch.Tensor | float, *, out_dtype: torch.dtype = torch.float32) -> None:
        if table.ndim != 1 or table.numel() < 2:
            raise ValueError("table must be the model's 1-D sigma table (one sigma per training timestep)")
        self.table = table
        self.final = torch.as_tensor(final, dtype=table.dtype, device=table.device)
        self.out_dtype = out_dtype

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        """Sigma for each state in ``s`` (any shape)."""
        t = torch.round(s.to(self.table.device)).clamp(0, self.table.numel() - 1).long()
        sigma = torch.where(s.to(self.table.device) == 0, self.final, self.table[t])
        return sigma.to(device=s.device, dtype=self.out_dtype)


class SigmaInterpolator:
    """state -> sigma for one sampling run: the anchors are built once, then applied to any states.

    The sampler calls this every step on a handful of distinct states; building the background
    track and the knots once per run keeps the per-step cost to a few vector operations.
    """

    def __init__(self, carrier_sigmas: torch.Tensor, *, sigma_top: float, num_train_timesteps: int = 1000,
                 offset: int = 1, dtype: torch.dtype = torch.float32) -> None:
        if carrier_sigmas.ndim != 1 or carrier_sigmas.numel() < 2:
            raise ValueError("carrier_sigmas must be a 1-D tensor of N + 1 sigmas (N >= 1)")
        n = carrier_sigmas.numel() - 1
        device = carrier_sigmas.device
        sig = carrier_sigmas.to(dtype=torch.float64)
        if not bool(torch.all(sig[:-1] > 0)):
            raise ValueError("every carrier sigma but the last must be > 0")
        track = background_track(n, num_train_timesteps=num_train_timesteps, offset=offset, dtype=dtype).to(device)
        top = max(float(sigma_top), float(sig[0]))
        # Anchors in decreasing state order: T+offset, track[0..N-1]; searchsorted needs them increasing.
        knots_s = torch.cat([torch.tensor([float(num_train_timesteps + offset)], device=device, dtype=dtype), track])
        knots_sigma = torch.cat([torch.tensor([top], device=device, dtype=torch.float64), sig[:-1]])
        self.ks = knots_s.flip(0)
        self.kv = knots_sigma.flip(0)
        self.log_kv = torch.log(self.kv)
        self.final = sig[-1]
        self.out_dtype = carrier_sigmas.dtype
        self._host_knots: tuple[np.ndarray, ...] | None = None  # numpy views of the CPU knots (_on_host), made once

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        """Sigma for each state in ``s`` (any shape), in the carrier sigmas' dtype."""
        if s.device.type == "cpu" and self.ks.device.type == "cpu":
            return self._on_host(s)
        return self._on_device(s)

    def _on_host(self, s: torch.Tensor) -> torch.Tensor:
        """_on_device's operations, one for one, in numpy on CPU states (the sampler's track tables live on the
        host and a re-partition asks every step): the same IEEE arithmetic in the same dtypes, and torch's own
        exp, so the same values bit for bit, without a torch dispatch per operation on a few dozen states."""
        if self._host_knots is None:
            self._host_knots = (self.ks.numpy(), self.kv.numpy(), self.log_kv.numpy(), self.final.numpy())
        ks, kv, log_kv, final = self._host_knots
        flat = s.detach().reshape(-1).to(self.ks.dtype).numpy()  # no copy where s has the knots' dtype
        idx = np.searchsorted(ks, flat, side="right")
        np.minimum(np.maximum(idx, 1, out=idx), ks.shape[0] - 1, out=idx)  # np.clip, in place, without its wrapper
        below = idx - 1
        lo_s, hi_s = ks[below], ks[idx]
        w = ((flat - lo_s) / (hi_s - lo_s)).astype(np.float64)
        np.minimum(np.maximum(w, 0.0, out=w), 1.0, out=w)
        lo_log = log_kv[below]
        step = log_kv[idx] - lo_log
        step *= w  # w * (hi - lo) and lo + that: products and sums commute bit for bit
        step += lo_log
        out = torch.exp(torch.from_numpy(step)).numpy()
        out = np.where(flat == hi_s, kv[idx], out)
        out = np.where(flat == lo_s, kv[below], out)
        # The two ends, where some state lies there (only the run's last states reach below the last anchor).
        last_s = ks[0]
        if flat.size and flat.min() < last_s:
            frac = (flat / last_s).astype(np.float64)
            np.minimum(np.maximum(frac, 0.0, out=frac), 1.0, out=frac)
            out = np.where(flat < last_s, final + frac * (kv[0] - final), out)
        if flat.size and flat.max() >= ks[-1]:
            out = np.where(flat >= ks[-1], kv[-1], out)
        return torch.from_numpy(np.ascontiguousarray(out)).reshape(s.shape).to(self.out_dtype)

    def _on_device(self, s: torch.Tensor) -> torch.Tensor:
        ks, kv, log_kv = self.ks.to(s.device), self.kv.to(s.device), self.log_kv.to(s.device)
        flat = s.reshape(-1).to(ks.dtype)
        idx = torch.searchsorted(ks, flat, right=True).clamp(1, ks.numel() - 1)
        lo_s, hi_s = ks[idx - 1], ks[idx]
        lo_v, hi_v = kv[idx - 1], kv[idx]
        w = ((flat - lo_s) / (hi_s - lo_s)).to(torch.float64).clamp(0.0, 1.0)
        lo_log = log_kv[idx - 1]
        interp = torch.exp(lo_log + w * (log_kv[idx] - lo_log))
        # Exact anchors (the background track) take the scheduler's sigma itself.
        out = torch.where(flat == lo_s, lo_v, torch.where(flat == hi_s, hi_v, interp))
        # Below the last positive anchor: linear in sigma down to the final sigma at state 0.
        last_s = ks[0]
        final = self.final.to(s.device)
        frac = (flat / last_s).to(torch.float64).clamp(0.0, 1.0)
        out = torch.where(flat < last_s, final + frac * (kv[0] - final), out)
        out = torch.where(flat >= ks[-1], kv[-1], out)
        return out.reshape(s.shape).to(self.out_dtype)


def state_to_sigma(
    s: torch.Tensor,
    carrier_sigmas: torch.Tensor,
    *,
    sigma_top: float,
    num_train_timesteps: int = 1000,
    offset: int = 1,
) -> torch.Tensor:
    """Sigma for each state in ``s`` given the scheduler's sigmas (length N + 1).

    Anchors: T + offset -> sigma_top (the noise level the latent starts at), the background track
    value of step i -> carrier_sigmas[i], and 0 -> carrier_sigmas[N] (the end of sampling).
    Between anchors log-sigma is interpolated linearly; below the last positive anchor sigma
    goes linearly to the final sigma (usually 0).
    """
    interpolate = SigmaInterpolator(carrier_sigmas.to(s.device), sigma_top=sigma_top,
                                    num_train_timesteps=num_train_timesteps, offset=offset, dtype=s.dtype)
    return interpolate(s)
