"""asyndm.schedules against an independent float64 statement of method.md's curves.

The reference functions below are written from method.md's text (the parabola form for "bin",
not the closed form the code uses) as plain Python scalar arithmetic, and never call asyndm.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyndm.schedules import history_states, next_state, step, timestep_maps

T = 1000
SETTINGS = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------------------------------------
# Independent reference (method.md, "Per-pixel schedule curves"), float64 scalars.


def ref_next(s: float, r: int, curve: str, k: float, n: int, t: int = T, target: float = 1.0) -> float:
    if r == 0:
        return 0.0
    if curve == "linear" or (curve == "bin" and k == 0.0):
        nxt = s + (target - s) / r
    elif curve == "bin":
        c = -k * t / n**2
        x0 = (c * r**2 - (target - s)) / (2 * c * r)
        y0 = s - c * x0**2
        nxt = c * (1 - x0) ** 2 + y0
    elif curve == "lin":
        k1 = -(1 - k) * t / n
        k2 = -(1 + k) * t / n
        nxt = min(s + k1, target + k2 * (1 - r))
    elif curve == "exp":
        b = -(1 - k) * t / n
        lam = 1 / n
        nxt = s + b + (math.exp(lam) - 1) * (s - target + b * r) / (1 - math.exp(lam * r))
    else:
        raise AssertionError(curve)
    return min(nxt, s)


def ref_track(curve: str, k: float, n: int, t: int = T, offset: int = 1) -> list[float]:
    """States seen at steps 0..n-1 and the final 0, for one pixel on one curve."""
    s = float(t + offset)
    out = []
    for i in range(n + 1):
        s = ref_next(s, n - i, curve, k, n, t, float(offset))
        out.append(s)
    return out


curves = st.sampled_from(["linear", "bin", "lin", "exp"])
async_curves = st.sampled_from(["bin", "lin", "exp"])
unit = st.floats(0.0, 1.0, allow_nan=False)
# The reference's vertex form of the parabola cancels catastrophically for tiny curvature, so
# comparisons against it use k = 0 (its exact linear limit) or k >= 1e-3.
ref_k = st.one_of(st.just(0.0), st.floats(1e-3, 1.0))


# ------------------------------------------------------------------------------------------------
# Numbers from the reference (comfy-integration.md §0), N = 50, k = 0.7, round to integers.


@pytest.mark.parametrize(
    ("curve", "first", "step_25"),
    [("bin", [995, 988, 980], 656), ("lin", [995, 989, 983], 817), ("exp", [987, 972, 958], 567),
     ("linear", [981, 961, 941], 481)],
)
def test_reference_numbers(curve: str, first: list[int], step_25: int) -> None:
    states = timestep_maps(torch.ones(1, 1, 1, 1), [0.7], curve=curve, num_steps=50)[:, 0, 0, 0]
    t = torch.round(states).long().tolist()
    assert t[:3] == first
    # The curve values quoted "at step 25" are the states at 0-based index 25; the "501 for
    # linear" beside them is index 24 (1001 - 20 * 25), index 25 of linear being 481.
    assert t[25] == step_25
    assert t[-2:] == [1, 0]


def test_linear_quoted_501_is_after_25_updates() -> None:
    states = timestep_maps(torch.zeros(1, 0, 1, 1), [], curve="linear", num_steps=50)[:, 0, 0, 0]
    assert states[24].item() == 501.0
    assert torch.round(states[:-1]).long().tolist() == list(range(981, 0, -20))


def test_linear_chain_is_the_sigma_map_anchor_bit_for_bit() -> None:
    from asyndm.sigma_map import background_track

    for n in (1, 7, 30, 50):
        s = torch.tensor(1001.0)
        got = []
        for i in range(n):
            s = step(s, n - i, curve="linear", k=0.0, num_steps=n)
            got.append(s)
        assert torch.equal(torch.stack(got), background_track(n))


# ------------------------------------------------------------------------------------------------
# Against the float64 reference.


@SETTINGS
@given(curve=curves, k=ref_k, n=st.integers(1, 80), data=st.data())
def test_step_matches_reference(curve: str, k: float, n: int, data: st.DataObject) -> None:
    r = data.draw(st.integers(0, n))
    values = data.draw(st.lists(st.floats(0.0, 1001.0, allow_nan=False), min_size=1, max_size=6))
    s = torch.tensor(values, dtype=torch.float64)
    got = step(s, r, curve=curve, k=k, num_steps=n)
    for g, v in zip(got.tolist(), values, strict=True):
        want = ref_next(v, r, curve, k, n)
        tol = 1e-9
        if curve == "bin" and k > 0 and r > 0:
            # The parabola's vertex form cancels catastrophically for small curvature c.
            c = k * T / n**2
            tol += 1e-14 * (v - 1.0) ** 2 / (c * r * r)
        assert abs(g - want) <= tol, (g, want, v, r)


def test_bin_tends_to_linear_as_k_vanishes() -> None:
    s = torch.tensor([1001.0, 600.0, 3.0], dtype=torch.float64)
    lin = step(s, 7, curve="linear", k=0.0, num_steps=50)
    for k in (1e-6, 1e-12, 1e-300):
        assert torch.allclose(step(s, 7, curve="bin", k=k, num_steps=50), lin, rtol=0, atol=k * 7 + 1e-12)


@SETTINGS
@given(curve=async_curves, n=st.integers(1, 60), k=ref_k)
def test_float64_tracks_match_reference(curve: str, n: int, k: float) -> None:
    got = timestep_maps(torch.ones(1, 1, 1, 1), [k], curve=curve, num_steps=n, dtype=torch.float64)[:, 0, 0, 0]
    want = torch.tensor(ref_track(curve, k, n), dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-8)


@pytest.mark.parametrize("curve", ["linear", "bin", "lin", "exp"])
def test_float32_tracks_round_like_reference(curve: str) -> None:
    """The float32 states the sampler uses give the reference's integer timesteps."""
    for k in (0.0, 0.3, 0.5, 0.7, 0.9):
        got = timestep_maps(torch.ones(1, 1, 1, 1), [k], curve=curve, num_steps=50)[:, 0, 0, 0].double()
        want = torch.tensor(ref_track(curve, k, 50), dtype=torch.float64)
        assert (got - want).abs().max().item() < 2e-3
        assert torch.equal(torch.round(got), torch.round(want))


def test_step_accepts_tensor_remaining_and_k() -> None:
    s = torch.tensor([[900.0, 500.0], [300.0, 40.0]], dtype=torch.float64)
    r = torch.tensor([[10, 0], [5, 1]])
    k = torch.tensor([0.2, 0.9], dtype=torch.float64)
    got = step(s, r, curve="bin", k=k, num_steps=20)
    want = [[ref_next(900, 10, "bin", 0.2, 20), 0.0], [ref_next(300, 5, "bin", 0.2, 20), ref_next(40, 1, "bin", 0.9, 20)]]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Properties.


@SETTINGS
@given(values=st.lists(st.floats(0.0, 1001.0, allow_nan=False), min_size=1, max_size=8), n=st.integers(1, 80),
       data=st.data())
def test_bin_with_k_zero_is_exactly_linear(values: list[float], n: int, data: st.DataObject) -> None:
    r = data.draw(st.integers(0, n))
    s = torch.tensor(values)
    assert torch.equal(step(s, r, curve="bin", k=0.0, num_steps=n), step(s, r, curve="linear", k=0.0, num_steps=n))
    assert torch.equal(step(s, r, curve="bin", k=torch.zeros_like(s), num_steps=n),
                       step(s, r, curve="linear", k=0.7, num_steps=n))


@SETTINGS
@given(curve=curves, n=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_k_zero_starts_together_and_ends_at_zero(curve: str, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    masks = _random_masks(g, 2, 3, 4, 5)
    maps = timestep_maps(masks, [0.0, 0.0, 0.0], curve=curve, num_steps=n)
    first = maps[0]
    assert torch.allclose(first, torch.full_like(first, 1001 - 1000 / n), atol=1e-3)
    if curve in ("linear", "bin"):
        assert (first == first.flatten()[0]).all()  # the same arithmetic for every pixel
    else:  # "lin" and "exp" with k = 0 meet the linear track only up to float rounding
        assert (first - first.flatten()[0]).abs().max().item() < 1e-3
    assert (maps[-1] == 0).all()
    assert maps.shape == (n + 1, 2, 4, 5)


@SETTINGS
@given(curve=async_curves, n=st.integers(1, 60), seed=st.integers(0, 2**16), ks=st.lists(unit, min_size=3, max_size=3))
def test_timesteps_never_increase_with_changing_masks(curve: str, n: int, seed: int, ks: list[float]) -> None:
    """Masks redrawn every step (pixels change class): still no pixel's timestep goes up."""
    g = torch.Generator().manual_seed(seed)
    s = torch.full((2, 4, 4), 1001.0)
    previous = s
    for i in range(n + 1):
        masks = _random_masks(g, 2, 3, 4, 4)
        s = next_state(s, masks, ks, n - i, curve=curve, num_steps=n)
        assert (s <= previous).all()
        assert (s >= 0).all()
        previous = s
    assert (s == 0).all()


@SETTINGS
@given(curve=async_curves, n=st.integers(2, 60), k=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_objects_are_never_less_noisy_than_background(curve: str, n: int, k: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    masks = _random_masks(g, 1, 1, 6, 6)
    masks[0, 0, 0, 0], masks[0, 0, 0, 1] = 1.0, 0.0  # at least one of each
    maps = timestep_maps(masks, [k], curve=curve, num_steps=n, dtype=torch.float64)
    obj = maps[:, 0][:, masks[0, 0] > 0.5]
    bg = maps[:, 0][:, masks[0, 0] < 0.5]
    assert (obj.amin(dim=1) >= bg.amax(dim=1) - 1e-9).all()
    # ... and strictly noisier somewhere before the end when k > 0.
    assert (obj[:-2].amin(dim=1) > bg[:-2].amax(dim=1)).any() or n <= 2


def test_clamp_keeps_a_late_object_pixel_from_climbing() -> None:
    # A pixel that was background (near the target) joins an object with a concave curve: the
    # unclamped bin step would move it up by k T / N^2 (r - 1).
    s = torch.tensor([5.0])
    unclamped = 5.0 + (1.0 - 5.0) / 20 + 0.9 * 1000 / 50**2 * 19
    assert unclamped > 5.0
    assert step(s, 20, curve="bin", k=0.9, num_steps=50).item() == 5.0


def test_next_state_mixes_background_and_items() -> None:
    s = torch.full((1, 2, 2), 700.0, dtype=torch.float64)
    masks = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    masks[0, 0, 0, 0] = 1
    masks[0, 1, 1, 1] = 1
    got = next_state(s, masks, [0.3, 0.8], 15, curve="exp", num_steps=50)
    assert got[0, 0, 0].item() == pytest.approx(ref_next(700, 15, "exp", 0.3, 50), abs=1e-9)
    assert got[0, 1, 1].item() == pytest.approx(ref_next(700, 15, "exp", 0.8, 50), abs=1e-9)
    assert got[0, 0, 1].item() == pytest.approx(ref_next(700, 15, "linear", 0.0, 50), abs=1e-9)
    assert got[0, 1, 0].item() == got[0, 0, 1].item()


def test_next_state_without_items_is_linear() -> None:
    s = torch.full((2, 3, 3), 600.0)
    got = next_state(s, torch.zeros(2, 0, 3, 3), [], 9, curve="bin", num_steps=30)
    assert torch.equal(got, step(s, 9, curve="linear", k=0.0, num_steps=30))


def test_timestep_maps_shape_and_offset() -> None:
    maps = timestep_maps(torch.ones(3, 1, 2, 2), torch.tensor([0.5]), curve="lin", num_steps=10, offset=0,
                         num_train_timesteps=500)
    assert maps.shape == (11, 3, 2, 2)
    want = ref_track("lin", 0.5, 10, t=500, offset=0)
    assert torch.allclose(maps[:, 0, 0, 0].double(), torch.tensor(want, dtype=torch.float64), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(curve="cubic"), "unknown curve 'cubic'"),
        (dict(k=1.5), "k must lie in [0, 1]"),
        (dict(k=-0.1), "k must lie in [0, 1]"),
        (dict(k=float("nan")), "k must lie in [0, 1]"),
        (dict(k=torch.tensor([0.5, 1.2])), "k holds values outside [0, 1]"),
        (dict(k=torch.tensor([0.5, 0.5, 0.5])), "does not broadcast"),
        (dict(num_steps=0), "num_steps must be an integer >= 1"),
        (dict(remaining=-1), "remaining must be an integer >= 0"),
        (dict(remaining=torch.tensor([1, -2])), "remaining holds negative values"),
        (dict(s=torch.tensor([1.0, float("nan")])), "holds NaN or infinite"),
        (dict(s=torch.tensor([1.0, float("inf")])), "holds NaN or infinite"),
        (dict(s=torch.tensor([1, 2])), "floating-point"),
    ],
)
def test_step_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = dict(s=torch.tensor([500.0, 400.0]), remaining=3, curve="bin", k=0.5, num_steps=10)
    args.update(kwargs)
    s = args.pop("s")
    remaining = args.pop("remaining")
    with pytest.raises(ValueError, match=_escape(message)):
        step(s, remaining, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("masks", "k", "message"),
    [
        (torch.ones(1, 1, 2, 3), [0.5], "do not match"),
        (torch.ones(1, 2, 2), [0.5], "shape (batch, items, height, width)"),
        (torch.ones(1, 2, 2, 2), [0.5, 0.5], "overlap"),
        (torch.full((1, 1, 2, 2), 0.5), [0.5], "only 0 and 1"),
        (torch.full((1, 1, 2, 2), float("nan")), [0.5], "only 0 and 1"),
        (torch.ones(1, 1, 2, 2), [0.5, 0.5], "1 item masks but 2 priorities"),
        (torch.ones(1, 1, 2, 2), [2.0], "k[0] must lie in [0, 1]"),
        (torch.ones(1, 1, 2, 2), torch.tensor([-1.0]), "outside [0, 1]"),
    ],
)
def test_next_state_rejects_bad_input(masks: torch.Tensor, k: object, message: str) -> None:
    with pytest.raises(ValueError, match=_escape(message)):
        next_state(torch.full((1, 2, 2), 500.0), masks, k, 3, curve="bin", num_steps=10)  # type: ignore[arg-type]


def test_next_state_rejects_bad_state() -> None:
    with pytest.raises(ValueError, match="shape \\(batch, height, width\\)"):
        next_state(torch.ones(2, 2), torch.ones(1, 1, 2, 2), [0.5], 3, curve="bin", num_steps=10)
    with pytest.raises(ValueError, match="NaN"):
        next_state(torch.full((1, 2, 2), float("nan")), torch.ones(1, 1, 2, 2), [0.5], 3, curve="bin", num_steps=10)


def test_timestep_maps_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        timestep_maps(torch.ones(1, 1, 2, 2), [0.5], num_steps=0)
    with pytest.raises(ValueError, match="unknown curve"):
        timestep_maps(torch.ones(1, 1, 2, 2), [0.5], curve="sigmoid")
    with pytest.raises(ValueError, match="outside"):
        timestep_maps(torch.ones(1, 1, 2, 2), torch.tensor([1.5]))
    with pytest.raises(ValueError, match="overlap"):
        timestep_maps(torch.ones(1, 2, 2, 2), [0.5, 0.5])


# ------------------------------------------------------------------------------------------------


def _random_masks(g: torch.Generator, b: int, items: int, h: int, w: int) -> torch.Tensor:
    """Non-overlapping 0/1 masks: each pixel gets one of items + 1 labels (the last = background)."""
    labels = torch.randint(0, items + 1, (b, h, w), generator=g)
    return torch.stack([(labels == j).float() for j in range(items)], dim=1)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


# ------------------------------------------------------------------------------------------------
# history_states: rows that each follow their own priority history (dynamic masks' re-partitions).


def _histories(seed: int, rows: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.4, 0.7], dtype=torch.float64)
    return levels[torch.randint(0, 3, (rows, n), generator=generator)]


@pytest.mark.parametrize("curve", ["linear", "bin", "lin", "exp"])
def test_history_states_follow_the_reference_row_by_row(curve: str) -> None:
    n, history = 12, _histories(3, 6, 12)
    got = history_states(torch.full((6,), 1001.0, dtype=torch.float64), history, curve=curve, num_steps=n)
    for row in range(6):
        s, want = 1001.0, []
        for i in range(n + 1):
            k = float(history[row, i]) if i < n else 0.0
            s = ref_next(s, n - i, "linear" if k == 0.0 else curve, k, n)
            want.append(s)
        assert got[row].tolist() == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("curve", ["linear", "bin", "lin", "exp"])
def test_history_states_are_the_checked_steps_bit_for_bit(curve: str) -> None:
    """float32: the same operations as step() per step (background linear, keyed pixels on the curve)."""
    n, history = 10, _histories(4, 5, 10).float()
    s = torch.full((5,), 1001.0)
    want = []
    for i in range(n):
        linear = step(s, n - i, curve="linear", k=0.0, num_steps=n)
        s = torch.where(history[:, i] > 0, step(s, n - i, curve=curve, k=history[:, i], num_steps=n), linear)
        want.append(s)
    full = history_states(torch.full((5,), 1001.0), history, curve=curve, num_steps=n)
    assert torch.equal(full, torch.stack([*want, torch.zeros(5)], dim=1))
    for first in (1, 6, 10):  # resumed from a known state: the rest of the same table
        tail = history_states(full[:, first - 1], history, first=first, curve=curve, num_steps=n)
        assert torch.equal(tail, full[:, first:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_history_states_on_the_host_are_the_torch_steps_bit_for_bit(seed: int, dtype: torch.dtype) -> None:
    """"bin" on CPU rows runs in numpy: the same values as step() in torch, from odd starts, every resume."""
    generator = torch.Generator().manual_seed(100 + seed)
    n, rows = 7 + 5 * seed, 9
    history = _histories(seed, rows, n).to(dtype) * torch.rand(rows, n, generator=generator, dtype=dtype).ceil()
    start = (torch.rand(rows, generator=generator, dtype=dtype) * 1000 + 1).to(dtype)
    want, s = [], start
    for i in range(n):
        linear = step(s, n - i, curve="linear", k=0.0, num_steps=n)
        s = torch.where(history[:, i] > 0, step(s, n - i, curve="bin", k=history[:, i], num_steps=n), linear)
        want.append(s)
    full = history_states(start, history, curve="bin", num_steps=n)
    assert full.dtype == dtype and torch.equal(full, torch.stack([*want, torch.zeros(rows, dtype=dtype)], dim=1))
    for first in range(1, n + 1):
        assert torch.equal(history_states(full[:, first - 1], history, first=first, curve="bin", num_steps=n),
                           full[:, first:])


@pytest.mark.parametrize(
    ("start", "history", "message"),
    [
        (torch.full((2,), 900.0), torch.full((2, 4), 1.5), "outside [0, 1]"),
        (torch.full((2,), float("nan")), torch.zeros(2, 4), "NaN"),
        (torch.full((3,), 900.0), torch.zeros(2, 4), "need history (rows, 4)"),
        (torch.full((2,), 900.0), torch.zeros(2, 5), "need history (rows, 4)"),
    ],
)
def test_history_states_reject_bad_input(start: torch.Tensor, history: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=_escape(message)):
        history_states(start, history, curve="bin", num_steps=4)
