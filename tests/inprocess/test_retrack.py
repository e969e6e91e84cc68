"""Dynamic masks' re-partitions on the host. A re-partition gives every pixel new priorities from a step
on (track_model.retracked): built from the track table and one key per pixel, it must be the TrackSet
that grouping every pixel's whole history gives (tracks_from_host_history), bit for bit; the pixels'
histories are grouped as torch.unique groups them (track_model.unique_rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyndm.comfy_adapter.sampler import AsynSampler, _HostSigmas
from asyndm.comfy_adapter.track_model import retracked, tracks_from_host_history, unique_rows
from asyndm.schedule_spec import AsynSchedule

FIELDS = ("sigmas", "index", "states", "host_sigmas", "host_index", "history")


def _to_sigma(steps: int) -> tuple[_HostSigmas, torch.Tensor]:
    """A state -> sigma function like a run's (monotone in the state), and the run's carrier sigmas."""
    carrier = torch.linspace(14.6, 0.03, steps).pow(1.3)
    carrier = torch.cat([carrier, carrier.new_zeros(1)])
    return _HostSigmas(lambda s: (s.double() / 1000.0 * 14.6).pow(1.3).float(), carrier), carrier


@pytest.mark.parametrize("curve", ["bin", "lin", "exp"])
@pytest.mark.parametrize("background", [True, False])
def test_retracked_is_the_whole_regrouping_bit_for_bit(curve, background):
    steps, (b, h, w) = 12, (2, 6, 7)
    sampler = AsynSampler("euler", AsynSchedule(curve=curve, k=(0.7, 0.4), mask_source="attention", words=("cat", "hat")))
    to_sigma, carrier = _to_sigma(steps)
    generator = torch.Generator().manual_seed(5)
    levels = torch.tensor([0.0, 0.4, 0.7]) if background else torch.tensor([0.4, 0.7])
    def k_map():
        return levels[torch.randint(0, levels.numel(), (b, h, w), generator=generator)]
    history = k_map().expand(steps + 1, b, h, w).clone()
    tracks = tracks_from_host_history(history[:steps], carrier, sampler._state_rows, to_sigma, carrier)
    assert tracks.history is not None
    for first in (2, 3, 5, 8, 11):
        new_k = k_map()
        history[first:] = new_k
        want = tracks_from_host_history(history[:steps], carrier, sampler._state_rows, to_sigma, carrier)
        got = retracked(tracks, first, new_k, sampler._state_rows, to_sigma, carrier, carrier)
        # the run's fast paths: the priorities found among the known levels (or, with a level missing from
        # them, sorted after all), the states in numpy where the curve allows it
        for known in ([0.0, 0.4, 0.7], [0.0, 0.7]):
            fast = retracked(tracks, first, new_k, sampler._state_rows, to_sigma, carrier, carrier,
                             levels=np.array(known, dtype=np.float32), numpy_states=sampler._numpy_state_rows)
            for name in FIELDS:
                assert torch.equal(getattr(fast, name), getattr(want, name)), (name, known)
        for name in FIELDS:
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert bool((got.history[0] == 0).all()) and got.count > 1
        assert got.constant_from == first  # the next re-partition takes the rows' order as it is
        tracks = got


@pytest.mark.parametrize(("pixels", "steps"), [(1024, 10), (300, 31), (7, 1), (1, 4)])
def test_unique_rows_groups_as_torch_unique(pixels, steps):
    generator = torch.Generator().manual_seed(pixels)
    levels = torch.tensor([0.0, 0.25, 0.6, 0.8, 1.0])
    distinct = levels[torch.randint(0, 5, (max(pixels // 9, 1), steps), generator=generator)]
    rows = distinct[torch.randint(0, distinct.shape[0], (pixels,), generator=generator)]
    want_rows, want_index = torch.unique(rows, dim=0, return_inverse=True)
    got_rows, got_index = unique_rows(rows)
    assert torch.equal(got_rows, want_rows) and torch.equal(got_index, want_index)
    assert got_index.dtype == want_index.dtype and got_index.shape == want_index.shape


def test_unique_rows_takes_negative_zero_as_zero():
    rows = torch.tensor([[0.0, 0.5], [-0.0, 0.5], [0.5, 0.0], [0.5, -0.0]])
    got_rows, got_index = unique_rows(rows)
    assert got_rows.tolist() == [[0.0, 0.5], [0.5, 0.0]] and got_index.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("background", [True, False])
def test_one_map_for_every_step_groups_as_the_whole_history(background):
    """Fixed masks give every step the same map (an expanded view): grouped by its distinct priorities, the
    TrackSet is the one that grouping every pixel's whole history gives, bit for bit (-0.0 taken as 0.0)."""
    steps, (b, h, w) = 9, (2, 5, 6)
    sampler = AsynSampler("euler", AsynSchedule(curve="bin", k=(0.7, 0.4), mask_source="attention", words=("a", "b")))
    to_sigma, carrier = _to_sigma(steps)
    generator = torch.Generator().manual_seed(3)
    levels = torch.tensor([0.0, -0.0, 0.4, 0.7]) if background else torch.tensor([0.4, 0.7])
    k_map = levels[torch.randint(0, levels.numel(), (b, h, w), generator=generator)]
    one_map = k_map.expand(steps, b, h, w)
    assert one_map.stride(0) == 0
    got = tracks_from_host_history(one_map, carrier, sampler._state_rows, to_sigma, carrier)
    want = tracks_from_host_history(one_map.contiguous(), carrier, sampler._state_rows, to_sigma, carrier)
    for name in FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert getattr(got, name).dtype == getattr(want, name).dtype, name
    assert got.count == 3  # without a background pixel, the background track is added (holding none)


def _hold(row: list[float]) -> int:
    """Leading steps a row of N + 1 sigmas holds still, counted one by one: at most N - 1."""
    n, m = len(row) - 1, 0
    while m < n - 1 and row[m + 1] == row[0]:
        m += 1
    return m


def test_every_tracks_hold_counts_the_leading_repeats():
    """TrackSet.holds (one pass over the host sigmas) is each track's leading repeats of its first sigma, at most
    N - 1 (the last step always runs), repeats later in the row not counted."""
    from asyndm.comfy_adapter.track_model import TrackSet

    rows = torch.tensor([[9.0, 7.0, 5.0, 3.0, 0.0],
                         [9.0, 9.0, 5.0, 5.0, 0.0],
                         [9.0, 9.0, 9.0, 9.0, 0.0],
                         [9.0, 9.0, 9.0, 9.0, 9.0],
                         [4.0, 7.0, 4.0, 4.0, 0.0],
                         [9.0, 9.0, 9.0, 2.0, 0.0]])
    for n in (1, 2, 4):
        table = rows[:, : n + 1].contiguous()
        tracks = TrackSet(table, torch.zeros(1, 2, 2, dtype=torch.long), host_sigmas=table)
        assert tracks.holds == [_hold(row) for row in table.tolist()], n
    assert TrackSet(rows, torch.zeros(1, 1, 1, dtype=torch.long), host_sigmas=rows).holds == [0, 1, 3, 3, 0, 2]
