"""PixelTracks: maps held as distinct values + index give the same per-pixel results as full maps."""

from __future__ import annotations

import torch

from asyndm.pixel_tracks import PixelTracks, pair_tracks
from asyndm.schedules import step


def test_from_map_round_trips() -> None:
    m = torch.tensor([[[3.0, 1.0], [3.0, 7.0]], [[1.0, 1.0], [7.0, 3.0]]])
    tracks = PixelTracks.from_map(m)
    assert tracks.values.tolist() == [1.0, 3.0, 7.0]
    assert tracks.index.shape == m.shape and tracks.index.dtype == torch.long
    assert torch.equal(tracks.full(), m)


def test_pairs_give_the_full_map_computation() -> None:
    """Next states computed once per (state, k) pair equal the per-pixel computation, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    states = torch.tensor([981.0, 700.5, 501.0, 120.25])[torch.randint(0, 4, (2, 9, 7), generator=gen)]
    k_map = torch.tensor([0.0, 0.6, 0.8])[torch.randint(0, 3, (2, 9, 7), generator=gen)]
    want = step(states, 5, curve="bin", k=k_map, num_steps=20)
    s_values, k_values, index = pair_tracks(PixelTracks.from_map(states), PixelTracks.from_map(k_map))
    assert s_values.numel() <= 12 and torch.equal(s_values[index], states) and torch.equal(k_values[index], k_map)
    got = PixelTracks(step(s_values, 5, curve="bin", k=k_values, num_steps=20), index).full()
    assert torch.equal(got, want)


def test_shared_index_needs_no_regrouping() -> None:
    """Fixed masks: the states are grouped by the priority index itself, which is passed through."""
    k = PixelTracks.from_map(torch.tensor([[[0.0, 0.7], [0.7, 0.3]]]))
    states = PixelTracks(torch.tensor([981.0, 950.0, 900.0]), k.index)
    s_values, k_values, index = pair_tracks(states, k)
    assert index is k.index and s_values is states.values and k_values is k.values
