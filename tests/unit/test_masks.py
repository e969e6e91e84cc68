"""asyndm.masks against a pixel-by-pixel statement of method.md's mask rule."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyndm.masks import initial_item_masks, item_masks, priority_map

SETTINGS = settings(max_examples=40, deadline=None)


def ref_item_masks(attn: np.ndarray, k: list[float], thr: float, gh: int, gw: int, size: tuple[int, int]) -> np.ndarray:
    """Plain loops: binarise at thr x spatial mean, keep the highest-k item (first on ties), upsample."""
    b, pixels, items = attn.shape
    height, width = size
    grid = np.zeros((b, items, gh, gw))
    for bi in range(b):
        means = [sum(float(attn[bi, p, j]) for p in range(pixels)) / pixels for j in range(items)]
        for p in range(pixels):
            inside = [j for j in range(items) if attn[bi, p, j] >= thr * means[j]]
            if not inside:
                continue
            best = inside[0]
            for j in inside[1:]:
                if k[j] > k[best]:
                    best = j
            grid[bi, best, p // gw, p % gw] = 1.0
    out = np.zeros((b, items, height, width))
    for y in range(height):
        for x in range(width):
            out[:, :, y, x] = grid[:, :, (y * gh) // height, (x * gw) // width]  # nearest: floor(dst * in / out)
    return out


# The attention problems both mask tests draw: batch, items, grid, upsampling factor, seed
PROBLEMS = {"b": st.integers(1, 2), "items": st.integers(1, 4), "gh": st.integers(1, 6), "gw": st.integers(1, 6),
            "scale": st.integers(1, 4), "seed": st.integers(0, 2**16), "data": st.data()}


@SETTINGS
@given(thr=st.floats(0.0, 2.0), **PROBLEMS)
def test_item_masks_match_reference(b: int, items: int, gh: int, gw: int, scale: int, thr: float, seed: int,
                                    data: st.DataObject) -> None:
    k = data.draw(st.lists(st.sampled_from([0.0, 0.3, 0.7, 0.7, 1.0]), min_size=items, max_size=items))
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(b, gh * gw, items, generator=g, dtype=torch.float64)
    attn = torch.where(attn < 0.3, torch.zeros_like(attn), attn)  # ties and exact-mean values
    size = (gh * scale + data.draw(st.integers(0, 2)), gw * scale)
    got = item_masks(attn, k, threshold=thr, size=size, grid=(gh, gw))
    want = ref_item_masks(attn.numpy(), k, thr, gh, gw, size)
    assert got.shape == (b, items, *size)
    assert np.array_equal(got.numpy(), want)
    assert (got.sum(dim=1) <= 1).all()


@SETTINGS
@given(thr=st.sampled_from([0.0, 0.5, 1.0, 1.7]), **PROBLEMS)
def test_priority_map_is_each_pixels_k_from_the_reference_masks(b: int, items: int, gh: int, gw: int, scale: int,
                                                                 thr: float, seed: int, data: st.DataObject) -> None:
    """The dynamic masks' every-step map: the k of the item the plain-loop rule gives each pixel, 0 elsewhere."""
    k = data.draw(st.lists(st.sampled_from([0.0, 0.3, 0.7, 0.7, 1.0]), min_size=items, max_size=items))
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(b, gh * gw, items, generator=g, dtype=torch.float32)
    attn = torch.where(attn < 0.3, torch.zeros_like(attn), attn)  # ties and exact-mean values
    size = (gh * scale + data.draw(st.integers(0, 2)), gw * scale)
    kvec = torch.tensor(k, dtype=torch.float32)
    got = priority_map(attn, kvec, threshold=thr, size=size, grid=(gh, gw))
    masks = ref_item_masks(attn.numpy(), k, thr, gh, gw, size)  # float64 means: compare where float32 agrees
    want = (masks * np.asarray(kvec.numpy(), dtype=np.float64)[None, :, None, None]).max(axis=1)
    assert got.shape == (b, *size) and got.dtype == torch.float32
    ours = item_masks(attn, kvec, threshold=thr, size=size, grid=(gh, gw))
    if torch.equal(ours, torch.from_numpy(masks).float()):
        assert np.array_equal(got.numpy().astype(np.float64), want)
    assert torch.equal(got, (ours * kvec.view(1, -1, 1, 1)).amax(dim=1))


def test_highest_priority_wins_and_ties_go_to_the_first() -> None:
    # Four pixels (2x2 grid), three items, every pixel above the mean of every item it is in.
    attn = torch.tensor(
        [[[1.0, 1.0, 1.0],  # in all three: k = (0.5, 0.9, 0.9) -> item 1 (first of the two 0.9s)
          [1.0, 0.0, 1.0],  # in 0 and 2 -> item 2
          [1.0, 0.0, 0.0],  # only 0 -> item 0
          [0.0, 0.0, 0.0]]]  # in none -> background
    )
    got = item_masks(attn, [0.5, 0.9, 0.9], size=(2, 2))
    labels = torch.where(got.sum(1) > 0, got.argmax(1), -1)[0]
    assert labels.tolist() == [[1, 2], [0, -1]]


def test_an_item_with_k_zero_still_claims_its_pixels() -> None:
    attn = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    got = item_masks(attn, [0.7, 0.0], size=(2, 2))
    assert got[0, 1].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert got[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_threshold_is_relative_to_each_items_mean() -> None:
    col = torch.tensor([0.1, 0.2, 0.3, 0.4])  # mean 0.25
    attn = torch.stack([col, col * 10], dim=-1)[None]
    assert item_masks(attn, [0.5, 0.5], threshold=1.0, size=(2, 2))[0].sum(0).flatten().tolist() == [0, 0, 1, 1]
    at_mean = item_masks(torch.tensor([[[0.25], [0.25], [0.5], [0.0]]]), [0.5], threshold=1.0, size=(2, 2))
    assert at_mean.flatten().tolist() == [1, 1, 1, 0]  # >= the mean counts as inside
    assert item_masks(attn[..., :1], [0.5], threshold=1.5, size=(2, 2)).flatten().tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_nearest_upsample_is_the_inverse_of_the_reference_stride(factor: int) -> None:
    """Each latent cell copies its grid cell, so the reference's [::s, ::s] recovers the grid."""
    g = torch.Generator().manual_seed(factor)
    attn = torch.rand(2, 16 * 16, 3, generator=g)
    grid_masks = item_masks(attn, [0.7, 0.7, 0.4], size=(16, 16))
    up = item_masks(attn, [0.7, 0.7, 0.4], size=(16 * factor, 16 * factor))
    assert torch.equal(up[..., ::factor, ::factor], grid_masks)
    assert torch.equal(up, grid_masks.repeat_interleave(factor, -2).repeat_interleave(factor, -1))


def test_grid_layout_is_row_major() -> None:
    attn = torch.zeros(1, 6, 1)
    attn[0, 4, 0] = 1.0  # row 1, column 1 of a 2x3 grid
    got = item_masks(attn, [1.0], size=(2, 3), grid=(2, 3))
    assert got[0, 0].tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_no_items_gives_an_empty_stack() -> None:
    assert item_masks(torch.zeros(2, 16, 0), [], size=(8, 8)).shape == (2, 0, 8, 8)


def test_initial_masks_follow_the_last_token() -> None:
    m = initial_item_masks(2, [1, 3], (4, 5))
    assert m.shape == (2, 2, 4, 5)
    assert (m[:, 1] == 1).all() and (m[:, 0] == 0).all()
    m = initial_item_masks(1, [7, 2, 7], (2, 2))  # equal positions: the first of them
    assert m[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert initial_item_masks(3, [], (2, 2)).shape == (3, 0, 2, 2)


@pytest.mark.parametrize(
    ("attn", "kwargs", "message"),
    [
        (torch.rand(1, 15, 2), {}, "not a square grid"),
        (torch.rand(1, 16, 2), dict(grid=(3, 5)), "has 15 positions but the attention has 16"),
        (torch.rand(16, 2), {}, "shape (batch, h*w, items)"),
        (torch.full((1, 16, 2), float("nan")), {}, "NaN or infinite"),
        (torch.full((1, 16, 2), float("inf")), {}, "NaN or infinite"),
        (torch.rand(1, 16, 2), dict(k=[0.5]), "2 items but 1 priorities"),
        (torch.rand(1, 16, 2), dict(k=[0.5, 1.5]), "k[1] must lie in [0, 1]"),
        (torch.rand(1, 16, 2), dict(k=torch.tensor([0.5, -0.5])), "outside [0, 1]"),
        (torch.rand(1, 16, 2), dict(threshold=-1.0), "threshold must be a finite number >= 0"),
        (torch.rand(1, 16, 2), dict(threshold=float("nan")), "threshold must be a finite number >= 0"),
        (torch.rand(1, 16, 2), dict(size=(8,)), "size must be (height, width)"),
        (torch.rand(1, 16, 2), dict(size=(0, 8)), "size[0] (height) must be an integer >= 1"),
        (torch.randint(0, 2, (1, 16, 2)), {}, "floating-point"),
    ],
)
def test_item_masks_reject_bad_input(attn: torch.Tensor, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = dict(k=[0.7, 0.7], size=(8, 8))
    args.update(kwargs)
    k = args.pop("k")
    with pytest.raises(ValueError, match=re.escape(message)):
        item_masks(attn, k, **args)  # type: ignore[arg-type]


def test_initial_masks_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        initial_item_masks(0, [1], (2, 2))
    with pytest.raises(ValueError, match=re.escape("token_positions[0] must be an integer >= 0")):
        initial_item_masks(1, [-1], (2, 2))
    with pytest.raises(ValueError, match="size"):
        initial_item_masks(1, [1], (2, -2))
