"""asyndm.mask_schedule against plain-loop statements of each rule (and method.md's curve formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyndm.mask_schedule import (
    apply_threshold,
    as_mask,
    feather,
    gaussian_kernel,
    normalize_attention,
    plot_table,
    preview_size,
    preview_states,
    priority_map,
    stack_item_masks,
    table_tracks,
)
from asyndm.schedule_table import ScheduleTable, table_from_curve, table_step
from asyndm.schedules import timestep_maps

T, OFFSET = 1000, 1


# ------------------------------------------------------------------------------------------------
# Independent statements.


def ref_feather(m: np.ndarray, radius: float) -> np.ndarray:
    """2-D Gaussian sum with clamped (replicated) edges, sigma = radius / 2, half-width ceil(radius)."""
    half = math.ceil(radius)
    sigma = radius / 2
    w = np.array([math.exp(-0.5 * (d / sigma) ** 2) for d in range(-half, half + 1)])
    w /= w.sum()
    h, wd = m.shape
    out = np.zeros_like(m, dtype=np.float64)
    for y in range(h):
        for x in range(wd):
            acc = 0.0
            for dy in range(-half, half + 1):
                for dx in range(-half, half + 1):
                    yy = min(max(y + dy, 0), h - 1)
                    xx = min(max(x + dx, 0), wd - 1)
                    acc += w[dy + half] * w[dx + half] * m[yy, xx]
            out[y, x] = acc
    return out


def ref_bilinear(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Half-pixel-centre bilinear resize (align_corners=False), edges clamped."""
    h, w = m.shape
    oh, ow = size
    out = np.zeros(size)
    for y in range(oh):
        sy = max((y + 0.5) * h / oh - 0.5, 0.0)
        y0 = min(int(math.floor(sy)), h - 1)
        y1 = min(y0 + 1, h - 1)
        fy = sy - y0
        for x in range(ow):
            sx = max((x + 0.5) * w / ow - 0.5, 0.0)
            x0 = min(int(math.floor(sx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            fx = sx - x0
            out[y, x] = ((1 - fy) * ((1 - fx) * m[y0, x0] + fx * m[y0, x1])
                         + fy * ((1 - fx) * m[y1, x0] + fx * m[y1, x1]))
    return out


def paper_next(s: float, r: int, k: float, curve: str, n: int) -> float:
    """method.md's formulas, one pixel: the parabola with x0, y0 for bin, slopes for lin, exp as written."""
    target = float(OFFSET)
    if r == 0:
        return 0.0
    if k == 0.0 or curve == "linear":
        out = s + (target - s) / r
    elif curve == "bin":
        c = -k * T / n**2
        x0 = (c * r * r - (target - s)) / (2 * c * r)
        y0 = s - c * x0 * x0
        out = c * (1 - x0) ** 2 + y0
    elif curve == "lin":
        k1, k2 = -(1 - k) * T / n, -(1 + k) * T / n
        out = min(s + k1, target + k2 * (1 - r))
    else:
        b, lam = -(1 - k) * T / n, 1.0 / n
        out = s + b + (math.exp(lam) - 1) * (s - target + b * r) / (1 - math.exp(lam * r))
    return min(out, s)


def paper_track(k: float, curve: str, n: int) -> list[float]:
    """The states a pixel with priority k is given at steps 0..n-1 (first: one update from 1001)."""
    s = paper_next(float(T + OFFSET), n, k, curve, n)
    out = []
    for i in range(n):
        out.append(s)
        s = paper_next(s, n - i - 1, k, curve, n)
    return out


# ------------------------------------------------------------------------------------------------
# Masks in.


def test_as_mask_accepts_comfy_layouts_and_clamps() -> None:
    m = torch.tensor([[0.5, 1.5], [-0.2, 1.0]])
    assert as_mask("mask", m).shape == (1, 2, 2)
    assert torch.equal(as_mask("mask", m)[0], torch.tensor([[0.5, 1.0], [0.0, 1.0]]))
    assert as_mask("mask", torch.ones(3, 1, 4, 5)).shape == (3, 4, 5)
    assert as_mask("mask", torch.ones(2, 4, 5, dtype=torch.float16)).dtype == torch.float32
    assert as_mask("mask", torch.ones(2, 3, dtype=torch.bool)).sum() == 6


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_as_mask_refuses_non_finite_naming_the_input(bad: float) -> None:
    m = torch.zeros(1, 4, 4)
    m[0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"mask_3 holds NaN or infinite"):
        as_mask("mask_3", m)


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3, 4), (2, 2, 2, 2, 2), (0, 4, 4)])
def test_as_mask_refuses_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="mask"):
        as_mask("mask", torch.zeros(shape))


def test_stack_resizes_to_the_first_mask_bilinearly_and_broadcasts_batch() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 6, 5, generator=g)
    b = torch.rand(1, 4, 7, generator=g)
    out = stack_item_masks([("mask", a), ("mask_2", b)])
    assert out.shape == (3, 2, 6, 5)
    assert torch.equal(out[:, 0], a)
    want = torch.from_numpy(ref_bilinear(b[0].double().numpy(), (6, 5))).float()
    for i in range(3):
        assert torch.allclose(out[i, 1], want, atol=1e-6)


def test_stack_refuses_mismatched_batches() -> None:
    with pytest.raises(ValueError, match=r"different batch sizes \(mask: 2, mask_2: 3\)"):
        stack_item_masks([("mask", torch.zeros(2, 4, 4)), ("mask_2", torch.zeros(3, 4, 4))])


# ------------------------------------------------------------------------------------------------
# Feather and threshold.


@pytest.mark.parametrize("radius", [1, 2, 3.5])
def test_feather_matches_a_direct_gaussian_sum(radius: float) -> None:
    g = torch.Generator().manual_seed(1)
    m = (torch.rand(2, 1, 9, 7, generator=g) > 0.6).float()
    got = feather(m, radius)
    assert got.shape == m.shape
    for b in range(2):
        want = ref_feather(m[b, 0].double().numpy(), radius)
        assert np.allclose(got[b, 0].numpy(), want, atol=1e-6)


def test_feather_zero_is_identity_and_constants_stay_constant() -> None:
    m = torch.rand(1, 2, 5, 5)
    assert torch.equal(feather(m, 0), m)
    ones = torch.ones(1, 1, 6, 6)
    assert torch.allclose(feather(ones, 4), ones)  # replicated edges: nothing leaks in from outside
    k = gaussian_kernel(3)
    assert k.numel() == 7 and math.isclose(float(k.sum()), 1.0)


def test_threshold_zeroes_below_and_keeps_grey_above() -> None:
    m = torch.tensor([[0.0, 0.2, 0.49, 0.5, 0.8, 1.0]])
    assert torch.equal(apply_threshold(m, 0.5), torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.8, 1.0]]))
    assert torch.equal(apply_threshold(m, 0.0), m)
    with pytest.raises(ValueError, match="threshold"):
        apply_threshold(m, 1.5)


def test_priority_map_is_max_of_mask_times_k() -> None:
    g = torch.Generator().manual_seed(2)
    m = torch.rand(2, 3, 4, 5, generator=g)
    k = [0.7, 0.2, 1.0]
    got = priority_map(m, k)
    for b in range(2):
        for y in range(4):
            for x in range(5):
                want = max(float(m[b, j, y, x]) * k[j] for j in range(3))
                assert math.isclose(float(got[b, y, x]), want, rel_tol=1e-6)
    with pytest.raises(ValueError, match="3 masks but 2 priorities"):
        priority_map(m, [0.5, 0.5])


# ------------------------------------------------------------------------------------------------
# Preview states.


@pytest.mark.parametrize("curve", ["bin", "lin", "exp"])
def test_preview_states_equal_timestep_maps_for_binary_masks(curve: str) -> None:
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2] = 1
    masks[0, 1, 2:, :2] = 1
    k = [0.7, 0.9]
    n = 7
    states = preview_states(priority_map(masks.double(), k), curve=curve, num_steps=n)
    want = timestep_maps(masks.double(), torch.tensor(k, dtype=torch.float64), curve=curve, num_steps=n,
                         dtype=torch.float64)
    assert len(states) == n
    for i in range(n):
        assert torch.allclose(states[i], want[i], atol=1e-6), f"step {i}"


@pytest.mark.parametrize("curve", ["bin", "lin", "exp"])
def test_soft_priorities_follow_the_paper_formulas_per_pixel(curve: str) -> None:
    ks = [0.0, 0.25, 0.49, 0.7, 1.0]
    k_map = torch.tensor(ks, dtype=torch.float64).view(1, 1, -1)
    n = 10
    states = preview_states(k_map, curve=curve, num_steps=n)
    for j, k in enumerate(ks):
        track = paper_track(k, curve, n)
        for i in range(n):
            assert math.isclose(float(states[i][0, 0, j]), track[i], abs_tol=1e-6), (k, i)
    # a soft (grey) pixel sits between the background and the full-priority pixel
    mid = states[n // 2][0, 0]
    assert mid[0] < mid[2] < mid[4] or curve == "lin"
    assert mid[0] <= mid[2] <= mid[4]


def test_background_track_is_the_leading_ddim_timesteps() -> None:
    states = preview_states(torch.zeros(1, 1, 1), num_steps=50)
    assert [round(float(s)) for s in states[:3]] == [981, 961, 941]
    assert round(float(states[-1])) == 1


def test_preview_with_a_table_follows_table_step() -> None:
    table = table_from_curve("lin", [0.5, 0.9], num_steps=12)
    k_map = torch.tensor([[[0.0, 0.5, 0.7, 0.9]]], dtype=torch.float64)
    n = 8
    states = preview_states(k_map, num_steps=n, table=table)
    s = torch.full((1, 1, 3), 1001.0, dtype=torch.float64)
    k = k_map[..., 1:]
    s = table_step(s, n, table=table, k=k, num_steps=n)
    for i in range(n):
        assert torch.allclose(states[i][..., 1:], s), i
        assert math.isclose(float(states[i][0, 0, 0]), paper_track(0.0, "linear", n)[i], abs_tol=1e-9)
        s = table_step(s, n - i - 1, table=table, k=k, num_steps=n) if i < n - 1 else s


def test_preview_refuses_bad_k_maps() -> None:
    with pytest.raises(ValueError, match="outside"):
        preview_states(torch.full((1, 2, 2), 1.5))
    with pytest.raises(ValueError, match="batch, height, width"):
        preview_states(torch.zeros(2, 2))


def test_preview_size() -> None:
    assert preview_size(8, 8) == (8, 8)
    assert preview_size(512, 512) == (64, 64)
    assert preview_size(512, 768) == (43, 64)
    assert preview_size(1, 4000) == (1, 64)


# ------------------------------------------------------------------------------------------------
# Attention maps and table plots.


def test_normalize_attention_layout_and_scale() -> None:
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(2, 6, 3, generator=g)
    attn[1, :, 2] = 0.0
    out = normalize_attention(attn, (2, 3))
    assert out.shape == (2, 3, 2, 3)
    for b in range(2):
        for j in range(3):
            peak = float(attn[b, :, j].max())
            for p in range(6):
                want = float(attn[b, p, j]) / peak if peak > 0 else 0.0
                assert math.isclose(float(out[b, j, p // 3, p % 3]), want, rel_tol=1e-6, abs_tol=1e-7)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    with pytest.raises(ValueError, match="grid 2x2"):
        normalize_attention(attn, (2, 2))


def test_plot_draws_each_level_where_its_curve_is() -> None:
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    levels = torch.stack([1 - u * u, (1 - u) ** 0.5]).float()  # below / above the diagonal
    levels[:, -1] = 0.0
    table = ScheduleTable(progress=u.float(), timesteps=levels, priorities=torch.tensor([0.3, 0.9]))
    size, m = 200, 10
    img = plot_table(table, size=size, margin=m)
    assert img.shape == (1, size, size, 3)
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    span = size - 1 - 2 * m
    bright = torch.tensor([1.0, 0.55, 0.1])
    for x in (0.2, 0.5, 0.8):
        col = m + round(x * span)
        want_row = m + (1 - (1 - x) ** 0.5) * span  # the top level, brightest orange
        rows = [r for r in range(size) if torch.allclose(img[0, r, col], bright)]
        assert rows and min(abs(r - want_row) for r in rows) <= 1.0, (x, rows, want_row)
        diag = m + x * span  # the background line, grey
        assert any(torch.allclose(img[0, r, col], torch.tensor([0.6, 0.6, 0.6])) for r in (math.floor(diag), math.ceil(diag)))
    # nothing is drawn far from the curves: the top-right corner stays background
    assert torch.allclose(img[0, m + 2, size - m - 3], torch.tensor([0.1, 0.1, 0.1]))


# ------------------------------------------------------------------------------------------------
# table_tracks: the numbers of Load Learned Scheduler's in-node plot


def _tau_statement(progress: list[float], rows: list[list[float]], levels: list[float], k: float, u: float) -> float:
    """README 'Schedule files': interpolate each level in u, then in k (below the first level towards the
    background line 1 - u, above the last level the last level)."""
    col = [float(np.interp(u, progress, row)) for row in rows]
    if k <= levels[0]:
        w = k / levels[0]
        return (1 - w) * (1 - u) + w * col[0]
    if k >= levels[-1]:
        return col[-1]
    return float(np.interp(k, levels, col))


def test_table_tracks_follow_the_table_level_by_level() -> None:
    """A pixel whose k does not change sits at offset + T * tau_k((i + 1) / N) after step i (the table's
    ratios telescope), then 0; the background on the straight line."""
    progress = [0.0, 0.2, 0.55, 1.0]
    rows = [[1.0, 0.9, 0.5, 0.0], [1.0, 0.97, 0.8, 0.0]]
    levels = [0.4, 0.8]
    table = ScheduleTable(progress=torch.tensor(progress), timesteps=torch.tensor(rows), priorities=torch.tensor(levels))
    ks = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    for n in (1, 3, 7, 20):
        out = table_tracks(table, ks, num_steps=n)
        assert out.shape == (1 + len(ks), n + 1) and out.dtype == torch.float64
        background = [T + OFFSET - T * (i + 1) / n for i in range(n)] + [0.0]
        np.testing.assert_allclose(out[0].numpy(), background, atol=1e-9)
        for j, k in enumerate(ks):
            want = [OFFSET + T * _tau_statement(progress, rows, levels, k, (i + 1) / n) for i in range(n)] + [0.0]
            np.testing.assert_allclose(out[j + 1].numpy(), want, atol=1e-4, err_msg=f"k={k}, N={n}")
        np.testing.assert_array_equal(out[1].numpy(), out[0].numpy())  # k = 0 is the background


def test_table_tracks_are_what_the_preview_and_the_sampler_steps_give() -> None:
    table = table_from_curve("exp", [0.5, 0.9], num_steps=12)
    out = table_tracks(table, [0.3, 0.9], num_steps=9)
    k_map = torch.tensor([[[0.0, 0.3, 0.9]]], dtype=torch.float64)
    states = preview_states(k_map, num_steps=9, table=table)
    for i, state in enumerate(states):
        assert torch.equal(out[:, i], state[0, 0])
    s = torch.full((2,), 1001.0, dtype=torch.float64)
    for i in range(10):
        s = table_step(s, 9 - i, table=table, k=torch.tensor([0.3, 0.9], dtype=torch.float64), num_steps=9)
        assert torch.equal(out[1:, i], s)


def test_table_tracks_refuse_bad_arguments() -> None:
    table = table_from_curve("bin", [0.7], num_steps=4)
    with pytest.raises(ValueError, match="k must lie in"):
        table_tracks(table, [1.5], num_steps=4)
    with pytest.raises(ValueError, match="num_steps"):
        table_tracks(table, [0.5], num_steps=0)
    assert table_tracks(table, [], num_steps=3).shape == (1, 4)
