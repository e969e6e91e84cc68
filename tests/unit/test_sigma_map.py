"""asyndm.sigma_map: the background track maps onto the scheduler's sigmas exactly."""

from __future__ import annotations

import math

import pytest
import torch

from asyndm.sigma_map import background_track, state_to_sigma


def karras(n: int, lo: float = 0.03, hi: float = 14.6, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


@pytest.mark.parametrize("n", [1, 2, 7, 20, 30, 50])
def test_background_track_is_the_linear_schedule(n: int) -> None:
    track = background_track(n).double()
    expected = torch.tensor([1001 - 1000 * (i + 1) / n for i in range(n)], dtype=torch.float64)
    assert torch.allclose(track, expected, atol=1e-3)
    assert track[-1].item() == pytest.approx(1.0, abs=1e-4)


def test_paper_timesteps_for_50_steps() -> None:
    assert background_track(50)[:3].tolist() == [981.0, 961.0, 941.0]


@pytest.mark.parametrize("n", [5, 20, 33])
def test_background_states_get_the_scheduler_sigmas_bit_for_bit(n: int) -> None:
    sig = karras(n)
    track = background_track(n)
    out = state_to_sigma(track[:, None, None].expand(n, 3, 4).contiguous(), sig, sigma_top=14.6)
    assert torch.equal(out, sig[:-1, None, None].expand(n, 3, 4))


def test_states_between_anchors_interpolate_log_sigma() -> None:
    n = 10
    sig = karras(n)
    track = background_track(n)
    mid = (track[3] + track[4]) / 2
    got = state_to_sigma(mid.reshape(1), sig, sigma_top=14.6).item()
    want = math.exp((math.log(sig[3].item()) + math.log(sig[4].item())) / 2)
    assert got == pytest.approx(want, rel=1e-5)


def test_noisier_states_get_larger_sigmas_and_top_is_sigma_top() -> None:
    n = 12
    sig = karras(n, hi=10.0)
    s = torch.linspace(1001, 1, 200)
    out = state_to_sigma(s, sig, sigma_top=14.6)
    assert bool((out[:-1] >= out[1:]).all())
    assert out[0].item() == pytest.approx(14.6, rel=1e-6)
    assert state_to_sigma(torch.tensor([0.0]), sig, sigma_top=14.6).item() == 0.0


def test_bad_carrier_is_refused() -> None:
    with pytest.raises(ValueError, match="N \\+ 1"):
        state_to_sigma(torch.tensor([5.0]), torch.tensor([1.0]), sigma_top=1.0)
    with pytest.raises(ValueError, match="> 0"):
        state_to_sigma(torch.tensor([5.0]), torch.tensor([1.0, 0.0, 0.0]), sigma_top=1.0)
