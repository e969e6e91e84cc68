"""Euler on per-pixel sigma maps with dynamic masks, each pixel's state stepped on the host: no tracks.

With dynamic masks the map route (map_steps.py) re-partitions the pixels into tracks at every reading that changes
a priority: a new track table, its states and sigmas for the whole run, its flags, and its calls' tables, most of
it a prediction of a future that the next reading replaces. Euler reads only each pixel's sigma now and next. So
here every pixel's AsynDM state is kept on the host (per group of pixels that share it, _Groups) and stepped one
column per step, with the operations the tracks' recurrence runs (numpy_state_step, the same IEEE operations element
by element), placed on the run's sigmas by the same function, and a pixel whose priorities were all 0 so far, and
are predicted 0, follows the carrier exactly, as the background track does. A pixel therefore sits at its track's
sigma at every call, and waits (holds at its first sigma) exactly when its track's sampler has not started. Each
call's table has one row per distinct sigma (the carrier's among them) and image, as map_steps' distinct calls make
it, and a call whose pixels all sit at the carrier's sigma is KSampler's own. Only the order of a table's rows can
differ from the track route's (sorted here, by track there).

What the host reads of the device is the dynamic masks' one pipelined read per step (the reading, taken after the
next model call was queued); what goes to the device is uploaded without a stream sync (host.to_device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import comfy.k_diffusion.sampling as kdiff
import numpy as np
import torch

from .host import host_maths, to_device
from .lockstep import CARRIER_HOLDS, StartLatent
from .map_steps import euler_step
from .model_wrapper import CallTable
from .track_model import TrackSet, call_entries

__all__ = ["LevelReader", "NextStates", "run_on_pixels"]

# (states (P,), priorities (P,), steps remaining for the new state) -> the next states (P,), on the host
NextStates = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


class LevelReader(Protocol):
    """The dynamic masks as this route reads them (sampler._DynamicMasks)."""

    levels: np.ndarray  # the sorted priorities a pixel can take (float32)

    def begin(self, step: int) -> Any: ...

    def level_of(self, reading: Any) -> np.ndarray | None: ...


class _Groups:
    """The pixels in groups that share a state, a predicted priority and whether they are still background, each
    group's values on the host (a few dozen numbers): a reading splits the groups by the pixels' new levels (one
    integer key per pixel), and a step moves every group's state once. Groups that come to share a state stay apart;
    what is computed per group is the same element by element either way."""

    def __init__(self, tracks: TrackSet, levels: np.ndarray) -> None:
        assert tracks.states is not None and tracks.history is not None and tracks.host_index is not None
        self.pixel = tracks.host_index.numpy().reshape(-1)  # each pixel's group: its track, to begin with
        states, sigmas = tracks.states.numpy(), tracks.host_array
        self.state = states[:, 0]
        self.level_count = levels.shape[0]
        self.priorities = levels.astype(states.dtype)
        self.k = tracks.history.numpy()[:, -1].astype(states.dtype)  # the first tracks' (constant) priorities
        self.background = np.arange(tracks.count) == 0  # every priority so far, and predicted, 0: the carrier
        self.first_sigma = sigmas[:, 0]
        self.held = np.ones(tracks.count, dtype=bool)  # still at the first sigma: the track's sampler not started

    def split(self, level: np.ndarray) -> None:
        """Every pixel takes its new level (its index in the levels) from the next state on."""
        key = self.pixel * self.level_count + level
        used = np.zeros(self.state.shape[0] * self.level_count, dtype=bool)
        used[key] = True
        pairs = np.flatnonzero(used)  # (old group, new level) in use
        self.pixel = (np.cumsum(used) - 1)[key]
        old, new_level = np.divmod(pairs, self.level_count)
        self.state, self.first_sigma, self.held = self.state[old], self.first_sigma[old], self.held[old]
        self.k = self.priorities[new_level]
        self.background = self.background[old] & (self.k == 0)


def _call(sigma: np.ndarray, pixel: np.ndarray, carrier: np.floating, shape: tuple[int, ...],
          like: torch.Tensor) -> tuple[torch.Tensor, CallTable | None]:
    """(the sigma map (B, 1, H, W) on the device, the call's table: one row per distinct sigma and image, the
    carrier's among them as the background track's is in the track route; None where every pixel sits at the
    carrier's sigma) for groups at `sigma` (G,) holding `pixel` (each pixel's group); on like's device and dtype
    (the run's sigmas')."""
    per_pixel = sigma[pixel].reshape(shape[0], 1, *shape[1:])
    sigma_map = to_device(torch.from_numpy(per_pixel), like.device).to(like.dtype)
    listed = sigma.tolist()
    values = sorted({*listed, float(carrier)})  # a few dozen numbers: Python's set, not np.unique
    if len(values) == 1:
        return sigma_map, None
    row = {value: r for r, value in enumerate(values)}
    rows = torch.from_numpy(np.array([row[value] for value in listed])[pixel].reshape(shape))
    table = np.repeat(np.array(values, dtype=sigma.dtype), shape[0])  # one entry per row and image (row-major)
    return sigma_map, CallTable(to_device(torch.from_numpy(table), like.device).to(like.dtype),
                                to_device(call_entries(rows), like.device))


def run_on_pixels(tracks: TrackSet, reader: LevelReader, next_states: NextStates,
                  to_sigma: Callable[[torch.Tensor], torch.Tensor], extra_args: dict, callback: Callable | None,
                  start: StartLatent, disable_pbar: bool,
                  pixel_model: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """ComfyUI's euler with dynamic masks, every pixel on its own sigmas (see the module doc). tracks: the run's
    first tracks (states, history and host tables on the host); the reader's readings then decide each pixel's
    priority from the step after the next on. Returns (latent, the carrier's last sigma, every step's state map
    (B, H, W) on the CPU)."""
    assert tracks.states is not None and tracks.host_index is not None
    if tracks.holds[0]:
        raise ValueError(CARRIER_HOLDS)
    x = start(tracks)
    seed = extra_args.get("seed")
    model_options = extra_args.get("model_options", {})
    s_in = x.new_ones([x.shape[0]])
    device = tracks.sigmas.device
    n = int(tracks.sigmas.shape[1]) - 1
    shape = tuple(tracks.host_index.shape)
    with host_maths():
        groups = _Groups(tracks, reader.levels)
        carrier = tracks.host_array[0]
        held_states: list[tuple[np.ndarray, np.ndarray]] = [(groups.state, groups.pixel)]  # each step's, by group
        sigma, table = _call(groups.first_sigma, groups.pixel, carrier[0], shape, tracks.sigmas)
    for i in kdiff.trange(n, disable=disable_pbar):
        reading = reader.begin(i)
        denoised = pixel_model(x, None if table is None else sigma, tracks.sigmas[0, i] * s_in, model_options,
                               seed=seed, table=table)
        level = reader.level_of(reading) if reading is not None else None
        with host_maths():
            split = level is not None and i + 1 < n  # (the last reading only changes the preview's last map)
            if split:
                groups.split(level)
            if i == 0 and not split:  # the first tracks' own next state
                groups.state = tracks.states.numpy()[:, 1]
                next_sigma = tracks.host_array[:, 1]
            else:
                groups.state = (next_states(groups.state, groups.k, n - i - 1) if i + 1 < n
                                else np.zeros_like(groups.state))
                next_sigma = to_sigma(torch.from_numpy(groups.state)).to(tracks.host.dtype).numpy()
                next_sigma = np.where(groups.background, carrier[i + 1], next_sigma)
            groups.held &= next_sigma == groups.first_sigma
            waiting = i + 1 < n and bool(groups.held.any())
            next_map, next_table = _call(next_sigma, groups.pixel, carrier[i + 1], shape, tracks.sigmas)
            if waiting:
                held = to_device(torch.from_numpy(groups.held[groups.pixel].reshape(shape[0], 1, *shape[1:])), device)
            if i + 1 < n:
                held_states.append((groups.state, groups.pixel))
        if callback is not None:
            callback(i, denoised, x, n)
        new = euler_step(x, denoised, sigma, next_map)  # the step agrees_with_comfy checks against ComfyUI's
        x = torch.where(held, x, new) if waiting else new
        sigma, table = next_map, next_table
    with host_maths():
        state_maps = [torch.from_numpy(state[pixel].reshape(shape)) for state, pixel in held_states]
    return x, tracks.sigmas[0, -1].clone(), state_maps
