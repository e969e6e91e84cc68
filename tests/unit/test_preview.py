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


def test_strip_layout_pixel_by_pixel() -> None:
    """Every pixel where it belongs: tile j of the top row is step j's map / start_value, upscaled 2x (4 -> 8 px),
    the bottom row its priorities in orange, grey 0.2 in the gaps between tiles and rows; per image."""
    g = torch.Generator().manual_seed(0)
    steps, batch, size, tile, gap = 3, 2, 4, 8, 1
    states = [torch.rand(batch, size, size, generator=g, dtype=torch.float64) * 1100 for _ in range(steps)]
    prios = [torch.rand(batch, size, size, generator=g) * 1.2 - 0.1 for _ in range(steps)]
    img = timestep_strip(states, prios, start_value=1001.0, tile=tile, gap=gap)
    want = torch.full((batch, 2 * tile + gap, steps * (tile + gap) - gap, 3), 0.2)
    for b in range(batch):
        for j in range(steps):
            for y in range(tile):
                for x in range(tile):
                    col = j * (tile + gap) + x
                    t = float(min(max(states[j][b, y // 2, x // 2] / 1001.0, 0.0), 1.0))
                    k = float(min(max(prios[j][b, y // 2, x // 2], 0.0), 1.0))
                    want[b, y, col] = torch.tensor([t, t, t])
                    want[b, tile + gap + y, col] = torch.tensor([k, k * 0.55, k * 0.1])
    assert img.shape == want.shape
    assert torch.allclose(img, want, atol=1e-6, rtol=0)
    assert img.is_contiguous()
