"""Euler, Euler-ancestral and DPM-Solver++(2M) (ComfyUI's euler, ddim, euler_ancestral, dpmpp_2m) on
per-pixel sigma maps.

The lock step (lockstep.py) runs one instance of the sampler function per pixel track, which is what
makes every ComfyUI sampler work, at a cost that grows with the number of tracks (each instance's
own ops, composing the instances' tensors, and with dynamic masks replaying new instances). These
two samplers are one-step and element-wise: an instance's update of a pixel reads only that pixel's
x and denoised and its track's two sigmas. So one element-wise update with the tracks' sigmas
gathered per pixel gives every pixel exactly what its instance gives: the same IEEE operations on
the same values, in the same order, the same shared noise draws. The ops per step are then constant
in the number of tracks, and a re-partition (dynamic masks) costs no replay. DPM-Solver++(2M) is a
multistep sampler, but its update is element-wise too: x, denoised, the previous call's denoised and
coefficients of the track's sigmas (computed on the device with ComfyUI's own expressions, once per
track set, then gathered per pixel).

``map_kind`` says whether a sampler can run here: the function must be ComfyUI's own (by identity,
so a pack that replaces it keeps the lock step), with options this file restates, and its maths must
still be what this file restates: ``agrees_with_comfy`` runs the function itself against these steps
on a small CPU problem (waiting pixels, a mid-run hold, the last step to 0) and the lock step is used
when they differ (a ComfyUI release that changes the sampler).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import comfy.k_diffusion.sampling as kdiff
import comfy.model_sampling
import numpy as np
import torch

from .host import host_maths, to_device
from .lockstep import CARRIER_HOLDS, Retrack, StartLatent
from .model_wrapper import CallTable
from .track_model import TrackSet, call_entries

__all__ = ["agrees_with_comfy", "euler_step", "map_kind", "run_on_maps"]

_EULER_OPTIONS = frozenset({"s_churn", "s_tmin", "s_tmax", "s_noise"})
_ANCESTRAL_OPTIONS = frozenset({"eta", "s_noise", "noise_sampler"})


def map_kind(sampler: Any, model_sampling: Any) -> str | None:
    """'euler', 'euler_ancestral' or 'dpmpp_2m' when this KSAMPLER can run on sigma maps, else None (lock step)."""
    fn = getattr(sampler, "sampler_function", None)
    options = dict(getattr(sampler, "extra_options", {}) or {})
    if fn is kdiff.sample_euler:
        if set(options) - _EULER_OPTIONS or float(options.get("s_churn", 0.0)) > 0:
            return None
        return "euler"
    if fn is kdiff.sample_euler_ancestral:
        if set(options) - _ANCESTRAL_OPTIONS or options.get("noise_sampler") is not None:
            return None
        if isinstance(model_sampling, comfy.model_sampling.CONST):
            return None  # ComfyUI runs its rectified-flow variant there
        return "euler_ancestral"
    if fn is kdiff.sample_dpmpp_2m:
        return None if options else "dpmpp_2m"
    return None


def ancestral_tables(rows: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up), each (U, N), of every track's steps: ComfyUI's get_ancestral_step, element
    by element (the same operations as on its scalar sigmas)."""
    frm, to = rows[:, :-1], rows[:, 1:]
    if not eta:
        return to.clone(), torch.zeros_like(to)
    up = torch.minimum(to, eta * (to ** 2 * (frm ** 2 - to ** 2) / frm ** 2) ** 0.5)
    down = (to ** 2 - up ** 2) ** 0.5
    return down, up


class _Tables:
    """What the steps of one track set need, decided on the host and uploaded once: per track and step
    the next sigma (euler) or sigma_down / sigma_up (ancestral), which tracks still wait, and in which
    steps some running track draws noise or lands on 0."""

    def __init__(self, tracks: TrackSet, kind: str, eta: float, model_sampling: Any = None,
                 dtype: torch.dtype | None = None, distinct_calls: bool = False) -> None:
        device = tracks.sigmas.device
        # The model timesteps and input scales (calculate_input's factor) of every track's sigmas, once per
        # track set: each call takes its column (what the call would compute from the column's sigmas).
        self.timesteps = self.input_scales = None
        if model_sampling is not None:  # ComfyUI's methods take a 1-D batch of sigmas
            sigmas = tracks.sigmas.to(dtype or tracks.sigmas.dtype)
            flat = sigmas.reshape(-1)
            self.timesteps = model_sampling.timestep(flat).float().view(sigmas.shape)
            ones = sigmas.new_ones(flat.shape[0], 1, 1, 1)
            self.input_scales = model_sampling.calculate_input(flat, ones).view(sigmas.shape)
        with host_maths():  # the flags in numpy: a re-partition makes a table set every step
            host = tracks.host_array  # exact, whatever the sigmas' dtype
            rows = tracks.host
            n = int(rows.shape[1]) - 1
            starts = np.array(tracks.holds)
            if starts[0]:
                raise ValueError(CARRIER_HOLDS)
            steps = np.arange(n)
            waiting = starts[:, None] > steps[None, :]  # (U, N): the track's instance has not started
            # Steps whose model call has every track at one sigma: KSampler's own call (distinct_calls, see run_on_maps).
            self.uniform = ((host[:, :n] == host[:1, :n]).all(axis=0).tolist() if distinct_calls
                            else [False] * n)
            self._host_columns = host if distinct_calls else None  # for shared_rows
            self.any_waiting = waiting.any(axis=0).tolist()
            self.draws = [False] * n
            self.all_land = self.some_land = [False] * n
            if kind == "euler_ancestral":
                down, up = ancestral_tables(rows, eta)
                running = ~waiting
                lands = (down == 0).numpy()
                self.draws = ((~lands) & running).any(axis=0).tolist()  # an instance calls its noise sampler
                self.all_land = (lands | waiting).all(axis=0).tolist()
                self.some_land = (lands & running).any(axis=0).tolist()
                tables = [down, up]
            elif kind == "dpmpp_2m":
                # First order where the instance has no previous denoised yet (its first step) or lands on 0.
                first = (starts[:, None] == steps[None, :]) | (host[:, 1:] == 0)
                self.all_first = (first | waiting).all(axis=0).tolist()
                self.some_first = (first & ~waiting).any(axis=0).tolist()
                tables = [torch.from_numpy(first)]
            else:
                tables = None
        # euler's one table, the next sigmas, is a view of the device's own sigmas (no copy, no upload)
        self.tables = ([tracks.sigmas[:, 1:]] if tables is None else
                       [to_device(t.contiguous(), device) for t in tables])
        if kind == "dpmpp_2m":
            self.tables = dpmpp_2m_tables(tracks.sigmas) + self.tables
        self.waiting = to_device(torch.from_numpy(waiting), device) if any(self.any_waiting) else None
        self.index = tracks.index
        self.calls: list[tuple[torch.Tensor, torch.Tensor, CallTable]] | None = None  # per step: call_sigmas'
        # result, when made for the run at once
        self._columns: dict[int, list[torch.Tensor]] = {}  # id(table) -> its column maps, step by step
        if self.timesteps is not None and _fits(rows.shape[1], tracks.index):
            for table in [*self.tables, *([self.waiting] if self.waiting is not None else [])]:
                self._columns[id(table)] = list(self._all_columns(table).unbind(0))

    def shared_rows(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the tracks that give step i's call its rows (U',), each track's row among them (U,)), both on the
        device, where some tracks sit at one sigma in that call (distinct_calls); else None (a row per track).
        Decided on the host copy of the sigmas: equal sigmas there are equal on the device (an exact upload)."""
        host = self._host_columns
        if host is None:
            return None
        keep: list[int] = []  # the first track at each distinct sigma, in track order (the carrier's first)
        row: list[int] = []
        seen: dict[float, int] = {}
        for track, sigma in enumerate(host[:, i].tolist()):  # a few dozen tracks: Python, not numpy's unique
            r = seen.get(sigma)
            if r is None:
                r = seen[sigma] = len(keep)
                keep.append(track)
            row.append(r)
        if len(keep) == len(row):
            return None
        with host_maths():
            keep_rows, track_rows = torch.tensor(keep), torch.tensor(row)
        device = self.index.device
        return to_device(keep_rows, device), to_device(track_rows, device)

    def _all_columns(self, table: torch.Tensor) -> torch.Tensor:
        """(N, B, 1, H, W): every step's column of a (U, N) table, in one gather (the same values)."""
        return table.t()[:, self.index][:, :, None]

    def column(self, table: torch.Tensor, i: int) -> torch.Tensor:
        """(B, 1, H, W): each pixel's entry of step i."""
        made = self._columns.get(id(table))
        if made is not None:
            return made[i]
        return table[:, i][self.index][:, None]

    def make_calls(self, tracks: TrackSet, s_in: torch.Tensor, dtype: torch.dtype) -> None:
        """Every step's call_sigmas result at once, where this table set has the timesteps and input scales and
        the maps fit (_fits): a handful of ops for the run instead of a dozen per call. The same values:
        the same elementwise products and the same gathers, taken over all steps."""
        if self.timesteps is None or self.input_scales is None or tracks.count == 1 or not self._columns:
            return
        n = int(tracks.sigmas.shape[1]) - 1
        batch = s_in.shape[0]
        # column[0] * s_in, step by step: a 0-d sigma times s_in takes s_in's dtype (a row of them would not)
        carrier_dtype = torch.result_type(tracks.sigmas[0, 0], s_in)
        carriers = (tracks.sigmas[0, :n, None].to(carrier_dtype) * s_in).unbind(0)

        def per_entry(table: torch.Tensor) -> torch.Tensor:  # (U, N + 1) -> (N, U * B): each call's table
            return table[:, :n, None].expand(-1, -1, batch).transpose(0, 1).reshape(n, -1)

        values = per_entry(tracks.sigmas.to(dtype))
        timesteps, scales = per_entry(self.timesteps), per_entry(self.input_scales)
        index = tracks.call_index
        sigma_maps = values[:, index][:, :, None]  # (N, B, 1, H, W)
        input_maps = scales[:, index][:, :, None]
        self.calls = [(carriers[i], None, None) if self.uniform[i] else
                      (carriers[i], sigma_maps[i], CallTable(values[i], index, timesteps[i], scales[i], input_maps[i]))
                      for i in range(n)]


# Per-step maps made for a whole run take (N, B, H, W) elements per table: at most this many (16 MiB in float32),
# else each call makes its own (the same values, a few more ops per step).
_MAX_RUN_MAP_ELEMENTS = 1 << 22


def _fits(columns: int, index: torch.Tensor) -> bool:
    return columns * index.numel() <= _MAX_RUN_MAP_ELEMENTS


def dpmpp_2m_tables(sigmas: torch.Tensor) -> list[torch.Tensor]:
    """(a, b, c1, c2), each (U, N), of every track's steps on the device, written as ComfyUI's
    sample_dpmpp_2m writes them on its scalar sigmas (the same operations, element by element):
    x = a x - b denoised at first order, x = a x - b (c1 denoised - c2 old_denoised) after it."""
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731 - ComfyUI's own helpers, restated op for op
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    t = t_fn(sigmas)
    t_now, t_next = t[:, :-1], t[:, 1:]
    h = t_next - t_now
    a = sigma_fn(t_next) / sigma_fn(t_now)
    b = (-h).expm1()
    c1 = torch.ones_like(a)
    c2 = torch.zeros_like(a)
    if sigmas.shape[1] > 2:
        h_last = t_now[:, 1:] - t_fn(sigmas[:, :-2])
        r = h_last / h[:, 1:]
        c2[:, 1:] = 1 / (2 * r)  # ComfyUI writes this twice; the same operation gives the same value
        c1[:, 1:] = 1 + c2[:, 1:]
    return [a.contiguous(), b.contiguous(), c1, c2]


def dpmpp_2m_update(i: int, tables: _Tables, x: torch.Tensor, denoised: torch.Tensor,
                    old: torch.Tensor | None) -> torch.Tensor:
    """Step i of every pixel as its track's sample_dpmpp_2m instance takes it; old: the previous call's
    denoised (None before the first call)."""
    a, b, c1, c2, first = tables.tables
    if tables.all_first[i] or old is None:
        new = tables.column(a, i) * x - tables.column(b, i) * denoised
    else:
        denoised_d = tables.column(c1, i) * denoised - tables.column(c2, i) * old
        if tables.some_first[i]:
            denoised_d = torch.where(tables.column(first, i), denoised, denoised_d)
        new = tables.column(a, i) * x - tables.column(b, i) * denoised_d
    if tables.any_waiting[i]:
        assert tables.waiting is not None
        new = torch.where(tables.column(tables.waiting, i), x, new)
    return new


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """sample_euler's step (no churn) element by element, from `sigma` to `sigma_next` (maps or numbers)."""
    d = (x - denoised) / sigma  # kdiff.to_d
    return x + d * (sigma_next - sigma)


def euler_update(kind: str, i: int, tables: _Tables, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor,
                 noise: Callable[[], torch.Tensor] | None, s_noise: float) -> torch.Tensor:
    """Step i of every pixel from x at `sigma` (B, 1, H, W), as each track's instance would take it."""
    if kind == "euler":
        new = euler_step(x, denoised, sigma, tables.column(tables.tables[0], i))
    elif tables.all_land[i]:
        new = denoised
    else:
        down, up = tables.column(tables.tables[0], i), tables.column(tables.tables[1], i)
        d = (x - denoised) / sigma
        assert noise is not None
        new = x + d * (down - sigma) + noise() * s_noise * up
        if tables.some_land[i]:
            new = torch.where(down == 0, denoised, new)
    if tables.any_waiting[i]:
        assert tables.waiting is not None
        new = torch.where(tables.column(tables.waiting, i), x, new)
    return new


def _update(kind: str, i: int, tables: _Tables, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor,
            noise: Callable[[], torch.Tensor] | None, s_noise: float, old: torch.Tensor | None) -> torch.Tensor:
    """Step i of every pixel, for either family of samplers here."""
    if kind == "dpmpp_2m":
        return dpmpp_2m_update(i, tables, x, denoised, old)
    return euler_update(kind, i, tables, x, denoised, sigma, noise, s_noise)


def _noise_options(sampler: Any) -> tuple[float, float]:
    """(eta, s_noise) of the sampler's options, with ComfyUI's defaults."""
    options = sampler.extra_options
    return float(options.get("eta", 1.0)), float(options.get("s_noise", 1.0))


def call_sigmas(tracks: TrackSet, i: int, s_in: torch.Tensor, dtype: torch.dtype,
                tables: _Tables | None = None) -> tuple[torch.Tensor, torch.Tensor | None, CallTable | None]:
    """(carrier sigma (B,), sigma map, its CallTable) of step i's model call, as the lock step makes them: the
    carrier as its sampler asks it, one table entry per track and image; the timesteps and input scales from
    `tables`, when it computed them (and the maps, when it made them for the run)."""
    if tables is not None and tables.calls is not None:
        return tables.calls[i]
    column = tracks.sigmas[:, i]
    carrier = column[0] * s_in
    if tracks.count == 1 or (tables is not None and tables.uniform[i]):
        return carrier, None, None
    batch = s_in.shape[0]
    shared = tables.shared_rows(i) if tables is not None else None
    index = tracks.call_index
    if shared is not None:  # one row per distinct sigma: the tracks' rows, and each pixel's entry among them
        keep, row = shared
        column, index = column[keep], call_entries(row[tracks.index])
    values = column[:, None].expand(-1, batch).reshape(-1).to(dtype)
    if tables is None or tables.timesteps is None or tables.input_scales is None:
        return carrier, values[index][:, None], CallTable(values, index)
    timesteps, scales = (table[:, i] for table in (tables.timesteps, tables.input_scales))
    if shared is not None:
        timesteps, scales = timesteps[shared[0]], scales[shared[0]]
    timesteps, scales = (t[:, None].expand(-1, batch).reshape(-1) for t in (timesteps, scales))
    return carrier, values[index][:, None], CallTable(values, index, timesteps, scales)


def run_on_maps(kind: str, sampler: Any, tracks: TrackSet, extra_args: dict, callback: Callable | None,
                start: StartLatent, disable_pbar: bool, pixel_model: Callable[..., torch.Tensor],
                retrack: Retrack | None = None, model_sampling: Any = None,
                distinct_calls: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The lock step's result for euler / euler_ancestral / dpmpp_2m (see the module doc): one model call per
    step exactly as the lock step makes it, one element-wise update. model_sampling: the model's, whose
    timesteps and input scales of every track's sigmas are then computed once for the run rather than once
    per call (not with re-partitions, whose track sets last a step or two). distinct_calls: a call's table has one
    row per distinct sigma of its tracks (known on the host: re-partitions leave many tracks at one sigma), and a
    call whose pixels all sit at one sigma is KSampler's own call, with no sigma map; the lock step cannot tell
    such calls apart, so the two routes then differ by the time embedding's rounding at those calls (its table
    has one row per track there: a row's bits can depend on how many rows its call has).
    Returns (latent, the carrier's last sigma)."""
    eta, s_noise = _noise_options(sampler)
    x = start(tracks)
    seed = extra_args.get("seed")
    draw = kdiff.default_noise_sampler(x, seed=seed) if kind == "euler_ancestral" else None
    model_options = extra_args.get("model_options", {})
    s_in = x.new_ones([x.shape[0]])
    if retrack is not None:  # a new track set at every re-partition: the timesteps of each call's column only
        model_sampling = None
    tables = _Tables(tracks, kind, eta, model_sampling, x.dtype, distinct_calls)
    tables.make_calls(tracks, s_in, x.dtype)
    n = int(tracks.sigmas.shape[1]) - 1
    old: torch.Tensor | None = None  # dpmpp_2m: the previous call's denoised
    for i in kdiff.trange(n, disable=disable_pbar):
        reading = retrack.begin(i) if retrack is not None else None
        carrier, sigma_map, table = call_sigmas(tracks, i, s_in, x.dtype, tables)
        denoised = pixel_model(x, sigma_map, carrier, model_options, seed=seed, table=table)
        if reading is not None:
            assert retrack is not None
            new = retrack.finish(reading, tracks)
            if new is not None:  # sigmas from step i + 2 on changed; step i's call and sigma stand
                tracks, tables = new, _Tables(new, kind, eta, model_sampling, x.dtype, distinct_calls)
        sigma = tracks.sigma_map(i) if sigma_map is None else sigma_map  # the same values either way
        if callback is not None:
            callback(i, denoised, x, n)
        noise = partial(draw, carrier[0], tracks.sigmas[0, i + 1]) if draw is not None and tables.draws[i] else None
        x = _update(kind, i, tables, x, denoised, sigma, noise, s_noise, old)
        old = denoised
    return x, tracks.sigmas[0, -1].clone()


def agrees_with_comfy(kind: str, sampler: Any) -> bool:
    """Do these steps give what ComfyUI's function gives, bit for bit, on a small problem: two tracks, the carrier
    and one that waits a step, then holds mid-run (dpmpp_2m: takes a second-order step of its own spacing), the last
    step to 0; the second track's pixels compared with the function run on its sigmas as the lock step runs it (the
    carrier's run is the same function on plainer sigmas). On the CPU in float32, with a denoiser that depends on
    sigma and the same noise draws. Host maths: it reads no device value."""
    with host_maths():
        return _agrees_with_comfy(kind, sampler)


def _check_denoise(x: torch.Tensor, sigma: torch.Tensor, tenth: torch.Tensor) -> torch.Tensor:
    """The check's denoiser: it depends on x and sigma, in two ops (it runs 8 times per check)."""
    return torch.addcdiv(tenth, x, 1.0 + sigma, value=0.75)


class _CheckModel:
    """What a k-diffusion sampler function reads of its model: model_sampling, and calls (counted)."""

    class inner_model:  # noqa: N801 - the attribute path k-diffusion reads
        class inner_model:  # noqa: N801
            model_sampling = None

    def __init__(self, start: int, tenth: torch.Tensor) -> None:
        self.start = start
        self.tenth = tenth
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        self.calls += 1
        return _check_denoise(x, sigma.view(-1, 1, 1, 1), self.tenth)


def _agrees_with_comfy(kind: str, sampler: Any) -> bool:
    # A mid-run hold (h = 0) sends the multistep sampler's next step to inf / NaN, its own result too.
    second = [8.0, 8.0, 6.5, 4.0, 0.0] if kind == "dpmpp_2m" else [8.0, 8.0, 6.0, 6.0, 0.0]
    rows = torch.tensor([[8.0, 5.0, 2.5, 1.0, 0.0], second])
    index = torch.tensor([[[0, 1, 1], [1, 0, 1]]])
    tracks = TrackSet(rows, index, None, rows, index)
    generator = torch.Generator().manual_seed(7)
    x0 = torch.randn(1, 2, 2, 3, generator=generator)
    draws = ([torch.randn(1, 2, 2, 3, generator=generator) for _ in range(rows.shape[1])]
             if kind == "euler_ancestral" else [])  # only the ancestral steps draw noise
    options = dict(sampler.extra_options)
    start = tracks.holds[1]
    tenth = torch.tensor(0.1)
    proxy = _CheckModel(start, tenth)
    if kind == "euler_ancestral":
        options["noise_sampler"] = lambda s, sn: draws[proxy.start + proxy.calls - 1]
    with torch.no_grad():
        want = sampler.sampler_function(proxy, x0.clone(), rows[1, start:].clone(), extra_args={}, callback=None,
                                        disable=True, **options)
    eta, s_noise = _noise_options(sampler)
    tables = _Tables(tracks, kind, eta)
    x = x0.clone()
    old = None
    for i in range(rows.shape[1] - 1):
        sigma = tracks.sigma_map(i)
        noise = (lambda i=i: draws[i]) if tables.draws[i] else None
        denoised = _check_denoise(x, sigma, tenth)
        x = _update(kind, i, tables, x, denoised, sigma, noise, s_noise, old)
        old = denoised
    second_track = (index == 1)[:, None].expand_as(x)
    return torch.equal(x[second_track], want[second_track])
