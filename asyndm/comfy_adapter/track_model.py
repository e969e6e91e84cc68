"""Pixel tracks and the per-pixel model call of the lock-step sampler (lockstep.py).

A *track* is one scalar sigma sequence (N + 1 values, like a scheduler's SIGMAS) followed by a set
of pixels: every pixel whose priority history is the same follows the same sequence of AsynDM
states. Row 0 is the background: the user's sigmas exactly, also the *carrier* sigma the CFG
guider, the conditionings, ControlNet and the model's hooks see. ``PixelModel`` calls ComfyUI's
guider once for a whole latent whose pixels sit at different sigmas, through the pack's APPLY_MODEL
wrapper and the family's time hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .host import host_maths, model_call_queued, to_device, to_host
from .model_wrapper import CallTable, StepMaps, model_timesteps
from .per_pixel import per_pixel

__all__ = ["NumpyStates", "TrackSet", "PixelModel", "call_entries", "levels_of", "retracked",
           "tracks_from_host_history", "unique_rows"]

# (histories (U, N), first, states before first (U,)) -> the states from first on (U, N + 1 - first), or None
NumpyStates = Callable[[np.ndarray, int, np.ndarray], "np.ndarray | None"]


@dataclass(frozen=True)
class TrackSet:
    """sigmas: (U, N + 1) on the run's device, one scalar sequence per track, row 0 the carrier
    (background); index: (B, H, W) long, each pixel's track; host_sigmas: the same sigmas on the CPU
    (every decision about tracks reads these, never the device's); states: (U, N + 1) the AsynDM
    states behind the sigmas (CPU); host_index: index on the CPU; history: (U, N) the priority
    history each track's states follow (CPU), when the tracks were made from priorities;
    constant_from: a column from which every history row repeats one value, when known (a re-partition's
    rows are the old prefix, then the new priority to the end)."""

    sigmas: torch.Tensor
    index: torch.Tensor
    states: torch.Tensor | None = None
    host_sigmas: torch.Tensor | None = None
    host_index: torch.Tensor | None = None
    history: torch.Tensor | None = None
    constant_from: int | None = None
    _derived: dict = field(default_factory=dict, compare=False, repr=False)  # values made once per track set

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    @property
    def count(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def host(self) -> torch.Tensor:
        """(U, N + 1) sigmas on the CPU (a copy made once, when a TrackSet was built without one)."""
        if self.host_sigmas is not None:
            return self.host_sigmas
        return self._once("host", lambda: to_host(self.sigmas))

    @property
    def host_array(self) -> np.ndarray:
        """The host sigmas as a numpy array of the same values (a view of float32 or float64 ones; other dtypes in
        float64, which holds them exactly), for the host's comparisons in numpy."""
        def make() -> np.ndarray:
            host = self.host
            return (host if host.dtype in (torch.float32, torch.float64) else host.to(torch.float64)).numpy()
        return self._once("host_array", make)

    @property
    def rows(self) -> list[tuple[float, ...]]:
        """Each track's sigmas as Python numbers (to compare and look up tracks on the host)."""
        return self._once("rows", lambda: [tuple(row) for row in self.host.tolist()])

    @property
    def holds(self) -> list[int]:
        """How many leading steps each track holds still (sigmas[0] == ... == sigmas[m], m at most N - 1: the last
        step always runs): its pixels wait at their first sigma, and its sampler run starts at step m on
        sigmas[m:]. From the host sigmas, in one pass over the table (a re-partition asks every step)."""
        def make() -> list[int]:
            rows = self.host_array
            same = rows[:, 1:-1] == rows[:, :1]  # sigma m + 1 == sigma 0, for m = 0 .. N - 2
            return np.cumprod(same, axis=1).sum(axis=1).tolist()
        return self._once("holds", make)

    def mask(self, j: int) -> torch.Tensor:
        """(B, 1, H, W) bool: the pixels of track j (built once per track set)."""
        masks = self._once("masks", lambda: [(self.index == k)[:, None] for k in range(self.count)])
        return masks[j]

    @property
    def call_index(self) -> torch.Tensor:
        """(B, H, W) long: each pixel's entry in a model call's (U * B,) table of per-track, per-image
        sigmas (track-major), so that a call's sigma map is one gather and needs no torch.unique."""
        return self._once("call_index", lambda: call_entries(self.index))

    def sigma_map(self, column: int) -> torch.Tensor:
        """(B, 1, H, W): every pixel's sigma at position `column` of its track."""
        return self.sigmas[:, column][self.index][:, None]

    def state_map(self, column: int) -> torch.Tensor:
        """(B, H, W) on the CPU: every pixel's state at position `column` of its track."""
        assert self.states is not None
        index = self.host_index if self.host_index is not None else self.index.cpu()
        return self.states[:, column].cpu()[index]

    def same_partition(self, other: TrackSet) -> bool:
        """The same tracks holding the same pixels (compared on the host copies; the pixels first, which settles
        it without making either set's rows)."""
        if self.count != other.count:
            return False
        if self.host_index is None or other.host_index is None:  # the device's pixels only when the rows agree
            return self.rows == other.rows and torch.equal(self.index, other.index)
        with host_maths():
            if not torch.equal(self.host_index, other.host_index):
                return False
        return self.rows == other.rows


def call_entries(rows: torch.Tensor) -> torch.Tensor:
    """(B, H, W) each pixel's row (a track, or a call's shared row) -> its entry in a (rows * B,) table of per-row,
    per-image values (row-major): row * B + image."""
    if rows.shape[0] == 1:  # one image: the entries are the rows (rows * 1 + 0, without the two ops)
        return rows
    batch = torch.arange(rows.shape[0], device=rows.device).view(-1, 1, 1)
    return rows * rows.shape[0] + batch


def tracks_from_host_history(host_history: torch.Tensor, carrier: torch.Tensor,
                             state_rows: Callable[[torch.Tensor], torch.Tensor],
                             to_sigma: Callable[[torch.Tensor], torch.Tensor],
                             host_carrier: torch.Tensor | None = None) -> TrackSet:
    """Tracks of a priority history: host_history (N, B, H, W), on the CPU, is the priority k with which
    each pixel reaches its state i. Pixels with the same history share a track; the background (k = 0
    throughout) is track 0, on the carrier sigmas exactly. state_rows (U, N) -> (U, N + 1) runs the
    AsynDM state recurrence per history; to_sigma places states on the run's sigmas. Both run on the
    CPU (host maths); the tables are uploaded without a stream sync (host.to_device).
    host_carrier: a CPU copy of `carrier` already made (else one read of it).
    """
    n = int(carrier.numel()) - 1
    if host_history.shape[0] != n:
        raise ValueError(f"need one priority map per step (got {host_history.shape[0]} for {n} steps)")
    if host_carrier is None:
        host_carrier = to_host(carrier)
    with host_maths():
        constant_from = None
        if n > 0 and host_history.stride(0) == 0:  # one map for every step (fixed masks): a row per priority
            levels, index = torch.unique(host_history[0].float() + 0.0, return_inverse=True)
            rows, index = levels[:, None].expand(-1, n).contiguous(), index.reshape(-1)
            constant_from = 0
        else:
            per_pixel_rows = host_history.float().permute(1, 2, 3, 0).reshape(-1, n)
            rows, index = unique_rows(per_pixel_rows)
        with_bg, index_bg, _ = _with_background(rows.numpy(), index.numpy())
        rows, index = torch.from_numpy(with_bg), torch.from_numpy(index_bg)
        states = state_rows(rows)
    return _track_set(rows, index.reshape(host_history.shape[1:]), states, carrier, host_carrier, to_sigma,
                      constant_from)


def retracked(tracks: TrackSet, first: int, k_map: torch.Tensor | None,
              state_rows: Callable[..., torch.Tensor],
              to_sigma: Callable[[torch.Tensor], torch.Tensor], carrier: torch.Tensor,
              host_carrier: torch.Tensor, *, levels: np.ndarray | None = None,
              numpy_states: NumpyStates | None = None, level: np.ndarray | None = None) -> TrackSet:
    """The tracks once every pixel takes the priority k_map (B, H, W, on the CPU) from step `first` on,
    its history before `first` being its track's: what tracks_from_host_history gives for the new
    history, the same TrackSet, built from the track table and one integer key per pixel (its track
    and its new priority) rather than from every pixel's whole history. The states before `first`
    are the old track's; state_rows(histories, first, states before first) runs the recurrence on
    (state_rows(histories): from the top). The grouping runs in numpy: a re-partition comes every
    step, on a few dozen tracks, where a torch dispatch per operation would cost more than the work.
    levels: the sorted priorities k_map may hold (else found with np.unique); numpy_states: state_rows
    on numpy rows, or None where it does not apply (then state_rows runs); level: each pixel's index among
    the given levels (k_map == levels[level], flattened), when the caller has it; then k_map may be None."""
    assert tracks.history is not None and tracks.states is not None and tracks.host_index is not None
    with host_maths():
        if level is None or levels is None:
            assert k_map is not None
            levels, level = levels_of(k_map.numpy().astype(np.float32, copy=False).reshape(-1), levels)
        key = tracks.host_index.numpy().reshape(-1) * levels.size + level
        used = np.zeros(tracks.count * levels.size, dtype=bool)
        used[key] = True
        pairs = np.flatnonzero(used)  # (old track, new priority) in use, in key order
        pair = (np.cumsum(used) - 1)[key]
        old, new_level = np.divmod(pairs, levels.size)
        rows = tracks.history.numpy()[old]  # fancy indexing copies
        rows[:, first:] = levels[new_level][:, None]
        states = tracks.states.numpy()[old]
        after = numpy_states(rows, first, states[:, first - 1]) if numpy_states is not None else None
        if after is None:
            after = state_rows(torch.from_numpy(rows), first, torch.from_numpy(states[:, first - 1])).numpy()
        states[:, first:] = after
        if tracks.constant_from is not None and tracks.constant_from < first:
            # The old rows repeat their value from before `first`, so they differ before it, and torch.unique's
            # (lexicographic) order of the new rows is the pairs' (old track, new priority) order: every pair is
            # its own track, already in place.
            index = pair
        else:  # old tracks with the same beginning may now share a history: one track each, in torch.unique's order
            rows, rank, keep = _distinct_rows(rows)
            index, states = rank[pair], states[keep]
        rows, index, background = _with_background(rows, index)
        if background:  # track 0 of every track set is the background, with the background's states
            states = np.concatenate([tracks.states.numpy()[:1], states])
    return _track_set(torch.from_numpy(rows), torch.from_numpy(index).reshape(tracks.host_index.shape),
                      torch.from_numpy(states), carrier, host_carrier, to_sigma, first)


def levels_of(k: np.ndarray, levels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(the priorities, each pixel's index among them): from the given sorted levels when they hold every value of
    k (three vector ops), else np.unique's (a sort of the pixels); -0.0 is 0.0 either way."""
    if levels is not None and levels.size:
        level = np.searchsorted(levels, k)
        if (levels[np.minimum(level, levels.size - 1)] == k).all():
            return levels, level
    return np.unique(k + np.float32(0.0), return_inverse=True)


def _distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct rows of a small (P, n) float array in torch.unique(dim=0)'s (lexicographic) order, each
    row's rank among them, and one row index per distinct row."""
    order = np.lexsort(rows.T[::-1])  # column 0 the primary key; stable
    ordered = rows[order]
    new = np.ones(rows.shape[0], dtype=bool)
    new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    rank = np.empty(rows.shape[0], dtype=np.int64)
    rank[order] = np.cumsum(new) - 1
    return ordered[new], rank, order[new]


def _with_background(rows: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Track 0 is the background (k = 0 throughout): with no background pixel it is added, holding none,
    because it still runs the carrier. (rows, index, whether it was added)."""
    if not rows[0].any():  # -0.0 counts as 0
        return rows, index, False
    return np.concatenate([np.zeros_like(rows[:1]), rows]), index + 1, True


def _track_set(rows: torch.Tensor, host_index: torch.Tensor, states: torch.Tensor, carrier: torch.Tensor,
               host_carrier: torch.Tensor, to_sigma: Callable[[torch.Tensor], torch.Tensor],
               constant_from: int | None = None) -> TrackSet:
    """The TrackSet of these host tables: sigmas from the states, the background on the carrier exactly,
    uploaded without a stream sync. constant_from: as TrackSet's, when the caller knows it."""
    with host_maths():
        host_sigmas = to_sigma(states.reshape(-1)).reshape(states.shape).to(carrier.dtype)
        host_sigmas[0] = host_carrier  # the background follows the user's sigmas exactly
    sigmas = to_device(host_sigmas, carrier.device)
    if host_carrier.dtype != carrier.dtype:  # else row 0 is already the carrier, bit for bit (its exact copy)
        sigmas[0] = carrier
    return TrackSet(sigmas, to_device(host_index, carrier.device), states, host_sigmas, host_index, history=rows,
                    constant_from=constant_from)


def unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(rows, dim=0, return_inverse=True) of a (P, n) float32 CPU tensor without NaN: the
    same distinct rows in the same (lexicographic) order and the same inverse, about 4x faster. The
    P rows are deduplicated by their bytes (one sort of P fixed-size records), then only the few
    distinct rows are put in torch's order. A re-partition groups every pixel's history, every step."""
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return torch.unique(rows, dim=0, return_inverse=True)
    array = np.ascontiguousarray((rows + 0.0).numpy())  # + 0.0: -0.0 and 0.0 have different bytes
    records = array.view(np.dtype((np.void, array.dtype.itemsize * array.shape[1]))).ravel()
    _, first, by_bytes = np.unique(records, return_index=True, return_inverse=True)
    distinct = torch.from_numpy(array[first])
    ordered, rank = torch.unique(distinct, dim=0, return_inverse=True)  # byte order -> torch's order
    return ordered, rank[torch.from_numpy(by_bytes.reshape(-1))]


class PixelModel:
    """denoised = PixelModel(x, sigma_map, carrier): one call of ComfyUI's guider for a latent whose
    pixels sit at the sigmas of `sigma_map` (B, 1, H, W); `carrier` (B,) is the sigma the guider,
    conds, ControlNet and hooks see. Inpainting is done per pixel as KSamplerX0Inpaint does it."""

    def __init__(self, model_wrap: Any, maps: StepMaps, latent_image: torch.Tensor, inpaint_noise: torch.Tensor,
                 denoise_mask: torch.Tensor | None, sigmas: torch.Tensor) -> None:
        self.model_wrap = model_wrap
        self.inner = model_wrap.inner_model
        self.ms = self.inner.model_sampling
        self.maps = maps
        self.latent_image = latent_image
        self.inpaint_noise = inpaint_noise
        self.denoise_mask = denoise_mask
        self.sigmas = sigmas
        self.calls = 0

    def _set_maps(self, sigma_map: torch.Tensor | None, table: CallTable | None) -> None:
        if sigma_map is None:  # every pixel at the carrier: the stock call, untouched
            self.maps.clear()
            return
        if table is None:  # a map without its table: find the distinct sigmas (reads the map back)
            values, index = torch.unique(sigma_map[:, 0], return_inverse=True)
            self.maps.set(sigma_map, *model_timesteps(values, index, self.ms))
            return
        timesteps = table.timesteps if table.timesteps is not None else self.ms.timestep(table.values).float()
        self.maps.set(sigma_map, timesteps, table.index, table.values, table.input_scales, table.input_map)

    def __call__(self, x: torch.Tensor, sigma_map: torch.Tensor | None, carrier: torch.Tensor,
                 model_options: dict | None = None, seed: int | None = None,
                 table: CallTable | None = None) -> torch.Tensor:
        """table: the call's sigmas as a small table, sigma_map = table.values[table.index] (see CallTable)."""
        self.calls += 1
        self._set_maps(sigma_map, table)
        try:
            mask = self.denoise_mask
            if mask is not None:
                if model_options and "denoise_mask_function" in model_options:
                    mask = model_options["denoise_mask_function"](carrier, mask, extra_options={
                        "model": self.model_wrap, "sigmas": self.sigmas})
                if sigma_map is None:  # as KSamplerX0Inpaint
                    known = self.inner.scale_latent_inpaint(x=x, sigma=carrier, noise=self.inpaint_noise,
                                                            latent_image=self.latent_image)
                else:
                    known = per_pixel(lambda sg, n, lat: self.inner.scale_latent_inpaint(
                        x=None, sigma=sg, noise=n, latent_image=lat), sigma_map, self.inpaint_noise, self.latent_image)
                latent_mask = 1.0 - mask
                x = x * mask + known * latent_mask
            out = self.model_wrap(x, carrier, model_options=model_options or {}, seed=seed)
            model_call_queued()
            if mask is not None:
                out = out * mask + self.latent_image * latent_mask
            return out
        finally:
            self.maps.clear()
