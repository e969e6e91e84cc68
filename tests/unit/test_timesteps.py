"""asyndm.timesteps.round_clamp: the integer timesteps a discrete model is called with."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyndm.schedules import timestep_maps
from asyndm.timesteps import round_clamp


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-50.0, 1100.0, allow_nan=False), min_size=1, max_size=20))
def test_rounds_half_to_even_and_clamps(values: list[float]) -> None:
    got = round_clamp(torch.tensor(values, dtype=torch.float64))
    assert got.dtype == torch.long
    assert got.tolist() == [min(max(round(v), 0), 999) for v in values]  # Python's round is half to even too


def test_halves_round_to_even_like_the_reference() -> None:
    assert round_clamp(torch.tensor([0.5, 1.5, 2.5, 980.5, 981.5])).tolist() == [0, 2, 2, 980, 982]


def test_bin_with_high_k_no_longer_indexes_past_the_table() -> None:
    """The reference's bin curve at k = 1 starts at 1000.6, i.e. timestep 1001 (out of range)."""
    states = timestep_maps(torch.ones(1, 1, 1, 1), [1.0], curve="bin", num_steps=50)
    assert torch.round(states).max().item() > 999
    t = round_clamp(states)
    assert t.max().item() == 999 and t.min().item() == 0


def test_other_table_sizes() -> None:
    assert round_clamp(torch.tensor([3.4, 20.0]), num_train_timesteps=10).tolist() == [3, 9]


@pytest.mark.parametrize(
    ("s", "kwargs", "message"),
    [
        (torch.tensor([1.0, float("nan")]), {}, "NaN or infinite"),
        (torch.tensor([float("-inf")]), {}, "NaN or infinite"),
        (torch.tensor([1, 2]), {}, "floating-point"),
        (torch.tensor([1.0]), dict(num_train_timesteps=0), "num_train_timesteps must be an integer >= 1"),
    ],
)
def test_rejects_bad_input(s: torch.Tensor, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        round_clamp(s, **kwargs)
