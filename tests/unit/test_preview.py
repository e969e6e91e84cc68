"""The timestep-map strip."""

from __future__ import annotations

import torch

from asyndm.preview import pick_steps, timestep_strip


def test_pick_steps() -> None:
    assert pick_steps(5, 8) == [0, 1, 2, 3, 4]
    picked = pick_steps(50, 8)
    assert picked[0] == 0 and picked[-1] == 49 and len(picked) == 8
    assert pick_steps(0) == []


def test_strip_shows_noisy_as_white_and_priorities() -> None:
    states = [torch.full((2, 4, 4), 1001.0 - 100 * i) for i in range(3)]
    prios = [torch.zeros(2, 4, 4) for _ in range(3)]
    prios[0][1, :2] = 0.7
    img = timestep_strip(states, prios, start_value=1001.0, tile=8, gap=1)
    assert img.shape == (2, 8 * 2 + 1, 3 * 8 + 2, 3)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert torch.allclose(img[0, 0, 0], torch.ones(3))  # step 0 fully noisy -> white
    assert float(img[1, 9:, :8, 0].max()) > 0.6  # image 1 has orange priority at step 0
    assert float(img[0, 9:, :8].max()) == 0.0  # image 0 has none
