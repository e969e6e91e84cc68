"""PerPixelTimesteps on ComfyUI's own UNet classes (random weights, CPU, float32).

What must hold: a constant map reproduces the stock forward; a split map gives every ResBlock
the stock embedding of each pixel's own timestep; nothing survives the context manager; the time
MLP runs once per distinct timestep; bypassed hooks and unsupported models fail loudly.
The forward is always called with a different carrier timestep than the map, so a hook that did
nothing would fail every comparison.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from comfy.ldm.modules.diffusionmodules import openaimodel

from asyndm.comfy_adapter.errors import UnsupportedModelError
from asyndm.comfy_adapter.families.unet import PerPixelTimesteps, block_index_map
from tests import model_factory as mf

CARRIER = 700.0  # the per-row timestep ComfyUI would pass; the map must override it
TIMESTEPS = [0.0, 1.0, 250.0, 500.0, 981.0, 999.0]
TOL = 2e-5  # float32, outputs of unit scale


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {"sd15": mf.build_sd15(), "sd2v": mf.build_sd2v(), "sdxl": mf.build_sdxl()}


def _run(patcher: Any, x: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
    dm = patcher.model.diffusion_model
    with torch.no_grad():
        return dm(x, t, **mf.diffusion_kwargs(patcher, x.shape[0], seed=1), **extra)


def _hooked(patcher: Any, x: torch.Tensor, t_rows: torch.Tensor, **extra: Any) -> torch.Tensor:
    carrier = torch.full((x.shape[0],), CARRIER)
    with PerPixelTimesteps(patcher.model.diffusion_model) as hooks:
        hooks.set_map(t_rows)
        out = _run(patcher, x, carrier, **extra)
        hooks.set_map(None)
    return out


def _latent(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _hook_state(module: torch.nn.Module) -> dict[str, list]:
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
             "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
    return {name: [dict(getattr(m, a, {})) for a in attrs] for name, m in module.named_modules()}


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sdxl"])
def test_constant_map_per_row_equals_stock(models: dict, family: str) -> None:
    """One constant per row (six different t in one batch), non-square latent."""
    p = models[family]
    x = _latent(len(TIMESTEPS), 16, 24)
    t = torch.tensor(TIMESTEPS)
    stock = _run(p, x, t)
    hooked = _hooked(p, x, t[:, None, None].expand(-1, 16, 24).clone())
    diff = (hooked - stock).abs().max().item()
    print(f"\n[{family}] constant map per row vs stock: max abs diff {diff:.2e} (|out| max {stock.abs().max():.2f})")
    assert diff < TOL
    assert (_run(p, x, torch.full_like(t, CARRIER)) - stock).abs().max() > 100 * TOL  # the carrier matters


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_constant_map_odd_size_and_given_unique(models: dict, family: str) -> None:
    """Odd latent sizes (9x13 -> 5x7 -> 3x4) and caller-supplied unique/inverse."""
    p = models[family]
    x = _latent(2, 9, 13, seed=1)
    stock = _run(p, x, torch.tensor([250.0, 250.0]))
    t_rows = torch.full((2, 9, 13), 250.0)
    carrier = torch.full((2,), CARRIER)
    with PerPixelTimesteps(p.model.diffusion_model) as hooks:
        hooks.set_map(t_rows, unique=torch.tensor([250.0]), inverse=torch.zeros(2, 9, 13, dtype=torch.long))
        hooked = _run(p, x, carrier)
    assert (hooked - stock).abs().max().item() < TOL


def test_scale_shift_norm_path() -> None:
    """use_scale_shift_norm splits emb_out into scale/shift along channels: the map must too."""
    p = mf.build_sd15(64, use_scale_shift_norm=True, seed=3)
    x = _latent(2, 8, 8, seed=2)
    t = torch.tensor([30.0, 900.0])
    stock = _run(p, x, t)
    hooked = _hooked(p, x, t[:, None, None].expand(-1, 8, 8).clone())
    assert (hooked - stock).abs().max().item() < TOL


def test_emb_patch_is_applied_per_timestep(models: dict) -> None:
    p = models["sd15"]
    calls: list[int] = []

    def patch(emb: torch.Tensor, model_channels: int, transformer_options: dict) -> torch.Tensor:
        calls.append(emb.shape[0])
        return emb * 1.5 + 0.25 * torch.arange(emb.shape[-1]) / emb.shape[-1]

    options = {"transformer_options": {"patches": {"emb_patch": [patch]}}}
    x = _latent(2, 8, 8, seed=3)
    t = torch.tensor([100.0, 600.0])
    stock = _run(p, x, t, **options)
    plain = _run(p, x, t)
    hooked = _hooked(p, x, t[:, None, None].expand(-1, 8, 8).clone(), **options)
    assert (stock - plain).abs().max() > 100 * TOL  # the patch matters
    assert (hooked - stock).abs().max().item() < TOL
    assert calls == [2, 2, 2, 2]  # stock; then hooked: carrier rows + one call per distinct t


def _split_map(b: int, h: int, w: int, t1: float, t2: float) -> torch.Tensor:
    t = torch.full((b, h, w), t2)
    t[..., : w // 2] = t1
    return t


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sdxl"])
def test_split_map_gathers_stock_embedding(models: dict, family: str) -> None:
    """Every ResBlock's replaced emb_layers output is stock emb_layers at t1 (left) / t2 (right)."""
    p = models[family]
    dm = p.model.diffusion_model
    h, w, t1, t2 = 16, 24, 150.0, 850.0
    x = _latent(2, h, w, seed=4)
    blocks = PerPixelTimesteps(dm).blocks

    def capture(store: list) -> list:
        return [b.emb_layers.register_forward_hook(lambda _m, _a, out, i=i: store.append((i, out))) for i, b in enumerate(blocks)]

    stock = {}
    for tv in (t1, t2):
        seen: list = []
        handles = capture(seen)
        _run(p, x, torch.tensor([tv, tv]))
        for hd in handles:
            hd.remove()
        stock[tv] = dict(seen)

    seen = []
    with PerPixelTimesteps(dm) as hooks:
        handles = capture(seen)  # registered after ours: sees the replaced output
        hooks.set_map(_split_map(2, h, w, t1, t2))
        _run(p, x, torch.full((2,), CARRIER))
        for hd in handles:
            hd.remove()
    assert len(seen) == len(blocks) == len({i for i, _ in seen})
    worst = 0.0
    sizes = set()
    for i, out in seen:
        bh, bw = out.shape[-2:]
        sizes.add((bh, bw))
        left = w // 2 * bw // w  # block columns whose sampled latent column lies in the left half
        assert out.shape[:2] == (2, stock[t1][i].shape[1])
        want_left = stock[t1][i][:, :, None, None].expand(-1, -1, bh, left)
        want_right = stock[t2][i][:, :, None, None].expand(-1, -1, bh, bw - left)
        worst = max(worst, (out[..., :left] - want_left).abs().max().item(),
                    (out[..., left:] - want_right).abs().max().item())
    print(f"\n[{family}] split map, gathered vs stock emb_layers: max abs diff {worst:.2e} over {len(seen)} blocks")
    assert sizes == {(16, 24), (8, 12), (4, 6)}
    # Not bit for bit: the table's time-MLP rows are computed in the stock call, after its carrier rows (one
    # read of the weights), and a matrix product's rows may round differently in a batch of another size. A
    # pixel given another timestep's row, or a wrong block's, would be off by the embeddings' own scale.
    assert worst <= 1e-5


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_split_map_halves_follow_their_timestep(models: dict, family: str) -> None:
    p = models[family]
    h, w, t1, t2 = 16, 16, 100.0, 900.0
    x = _latent(1, h, w, seed=5)
    at1 = _run(p, x, torch.tensor([t1]))
    at2 = _run(p, x, torch.tensor([t2]))
    split = _hooked(p, x, _split_map(1, h, w, t1, t2))

    def dist(a: torch.Tensor, b: torch.Tensor, sl: slice) -> float:
        return (a[..., sl] - b[..., sl]).abs().mean().item()

    left, right = slice(0, w // 2), slice(w // 2, w)
    d = {"L1": dist(split, at1, left), "L2": dist(split, at2, left), "R1": dist(split, at1, right), "R2": dist(split, at2, right)}
    print(f"\n[{family}] split map, mean |diff| to stock at t1/t2: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()))
    assert d["L1"] < 0.8 * d["L2"]  # measured ratios ~0.6: attention and convs mix the halves
    assert d["R2"] < 0.8 * d["R1"]


def test_block_index_map_is_strided_selection() -> None:
    inv = torch.randint(0, 50, (2, 64, 40))
    for s in (1, 2, 4, 8):
        size = (64 // s, 40 // s)
        got = block_index_map(inv, size)
        assert torch.equal(got, inv[:, ::s, ::s])
        nearest = F.interpolate(inv[:, None].float(), size=size, mode="nearest")[:, 0].long()
        assert torch.equal(got, nearest)
    odd = torch.randint(0, 50, (1, 9, 13))
    assert torch.equal(block_index_map(odd, (5, 7)), odd[:, ::2, ::2])  # stride-2 conv centres
    assert torch.equal(block_index_map(odd, (3, 4)), odd[:, ::4, ::4])


def test_hooks_removed_after_normal_exit_and_exceptions(models: dict) -> None:
    p = models["sd15"]
    model = p.model
    dm = model.diffusion_model
    x = _latent(2, 8, 8, seed=6)
    t = torch.tensor([300.0, 300.0])
    before_out = _run(p, x, t)
    before = _hook_state(model)

    with PerPixelTimesteps(dm) as hooks:
        assert _hook_state(model) != before
        hooks.set_map(_split_map(2, 8, 8, 10.0, 990.0))
        _run(p, x, t)
    assert _hook_state(model) == before
    assert torch.equal(_run(p, x, t), before_out)

    with pytest.raises(KeyError):  # raised in the with block, outside the model
        with PerPixelTimesteps(dm) as hooks:
            hooks.set_map(torch.full((2, 8, 8), 5.0))
            raise KeyError("boom")
    assert _hook_state(model) == before

    with pytest.raises(RuntimeError, match="UNet input has shape"):  # raised inside the UNet's forward
        with PerPixelTimesteps(dm) as hooks:
            hooks.set_map(torch.full((3, 8, 8), 5.0))
            _run(p, x, t)
    assert _hook_state(model) == before
    assert torch.equal(_run(p, x, t), before_out)

    with PerPixelTimesteps(dm) as hooks:  # no map: hooks pass everything through
        assert torch.equal(_run(p, x, t), before_out)


def test_table_is_computed_once_per_distinct_timestep(models: dict) -> None:
    p = models["sdxl"]
    dm = p.model.diffusion_model
    rows: list[int] = []
    handle = dm.time_embed.register_forward_hook(lambda _m, a, _o: rows.append(a[0].shape[0]))
    try:
        x = _latent(2, 16, 16, seed=7)
        t_map = _split_map(2, 16, 16, 200.0, 800.0)
        t_map[1, :4] = 500.0  # U = 3 distinct timesteps over 512 pixels
        with PerPixelTimesteps(dm) as hooks:
            hooks.set_map(t_map)
            _run(p, x, torch.full((2,), CARRIER))
            # one time-MLP call per forward, the stock one, on the table's U rows (not the B' rows, nor H*W)
            assert rows == [3]
            _run(p, x, torch.full((2,), CARRIER))
            assert rows == [3, 3]
            assert hooks.table_builds == 2
        # A patch that reads the embedding on its way to the blocks: the stock B' rows go on into the UNet,
        # the table's U rows ride in the same call and are kept while the map is the same.
        rows.clear()
        options = {"transformer_options": {"patches": {"forward_timestep_embed_patch": [(type(None), None)]}}}
        with PerPixelTimesteps(dm) as hooks:
            hooks.set_map(t_map)
            fused = _run(p, x, torch.full((2,), CARRIER), **options)
            assert rows == [2 + 3]
            _run(p, x, torch.full((2,), CARRIER), **options)  # same map: the table is reused
            assert rows == [5, 2]
            hooks.set_map(t_map)
            plain = _run(p, x, torch.full((2,), CARRIER))  # no patch: the table is the embedding again
            assert rows == [5, 2, 3]
        assert (fused - plain).abs().max().item() < TOL
    finally:
        handle.remove()


def test_bypassed_resblock_raises(models: dict) -> None:
    """A forward where some ResBlock never calls emb_layers (another pack, checkpointing) fails."""
    p = models["sd15"]
    dm = p.model.diffusion_model
    block = dm.middle_block[0]
    x = _latent(2, 8, 8, seed=8)
    block.forward = lambda h, emb: h  # instance attribute: replaces ResBlock.forward
    try:
        with pytest.raises(RuntimeError, match="did not use the per-pixel timestep map"):
            with PerPixelTimesteps(dm) as hooks:
                hooks.set_map(torch.full((2, 8, 8), 5.0))
                _run(p, x, torch.full((2,), CARRIER))
    finally:
        del block.forward


def test_map_never_used_raises() -> None:
    """A map set and replaced, or left at exit, without any forward reaching the hooks."""
    dm = mf.build_sd15(32).model.diffusion_model
    before = _hook_state(dm)
    hooks = PerPixelTimesteps(dm)
    with pytest.raises(RuntimeError, match="enter the context manager first"):
        hooks.set_map(torch.full((1, 8, 8), 5.0))
    with pytest.raises(RuntimeError, match="no UNet forward used it"):
        with hooks:
            hooks.set_map(torch.full((1, 8, 8), 5.0))
            hooks.set_map(None)
            hooks.set_map(torch.full((1, 8, 8), 5.0))
    with pytest.raises(RuntimeError, match="no UNet forward used it"):
        with hooks:
            hooks.set_map(torch.full((1, 8, 8), 5.0))
    assert _hook_state(dm) == before


@pytest.mark.skipif(not os.environ.get("ASYNDM_COMPILE_TESTS"), reason="torch.compile trace takes ~45 s on 2 cores")
def test_compiled_model_is_detected() -> None:
    p = mf.build_sd15(32)
    dm = p.model.diffusion_model
    compiled = torch.compile(dm, backend="eager")
    x = _latent(1, 8, 8)
    with torch.no_grad():
        compiled(x, torch.tensor([500.0]), **mf.diffusion_kwargs(p, 1))  # traced without hooks
        with pytest.raises(RuntimeError, match="did not use the per-pixel timestep map"):
            with PerPixelTimesteps(compiled) as hooks:
                hooks.set_map(torch.full((1, 8, 8), 100.0))
                compiled(x, torch.tensor([500.0]), **mf.diffusion_kwargs(p, 1))


def test_unsupported_models_are_refused() -> None:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with pytest.raises(UnsupportedModelError, match="SD1.x, SD2.x and SDXL") as info:
        PerPixelTimesteps(torch.nn.Linear(4, 4))
    assert isinstance(info.value, ValueError)

    base = {**mf._unet_config(64, 64, True), "num_heads": 2, "num_head_channels": -1}
    video = {"use_temporal_resblock": True, "use_temporal_attention": True, "extra_ff_mix_layer": True,
             "use_spatial_context": True, "merge_strategy": "learned_with_images", "merge_factor": 0.0,
             "video_kernel_size": [3, 1, 1]}
    for extra, match in ((video, "temporal"), ({"resblock_updown": True}, "resampling ResBlocks")):
        with torch.device("meta"):
            unet = UNetModel(**{**base, **extra}, device="meta", operations=comfy.ops.disable_weight_init)
        with pytest.raises(UnsupportedModelError, match=match):
            PerPixelTimesteps(unet)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("tracks", [1, 3, 6, 9])  # 1: broadcast, no gather
def test_every_pixel_gets_its_own_timesteps_embedding(models: dict, family: str, tracks: int) -> None:
    """Each ResBlock's per-pixel embedding equals emb_layers(time MLP(t)) of the pixel's own t,
    computed here independently (per distinct t, placed with advanced indexing)."""
    p = models[family]
    dm = p.model.diffusion_model
    rows, h, w = 2, 16, 24
    values = torch.linspace(20.0, 980.0, tracks)
    inverse = torch.randint(0, tracks, (rows, h, w), generator=torch.Generator().manual_seed(tracks))
    inverse[0, 0, 0] = tracks - 1  # every track present
    inverse.view(-1)[: tracks] = torch.arange(tracks)
    x = _latent(rows, h, w, seed=9)
    kwargs = mf.diffusion_kwargs(p, rows, seed=1)
    blocks = PerPixelTimesteps(dm).blocks
    seen: dict[int, torch.Tensor] = {}
    with PerPixelTimesteps(dm) as hooks:
        handles = [b.emb_layers.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out))
                   for i, b in enumerate(blocks)]
        try:
            hooks.set_map(values[inverse])
            with torch.no_grad():
                dm(x, torch.full((rows,), CARRIER), **kwargs)
        finally:
            for hd in handles:
                hd.remove()
    with torch.no_grad():
        emb = dm.time_embed(openaimodel.timestep_embedding(values, dm.model_channels).to(x.dtype))  # (U, E)
        if dm.num_classes is not None:
            emb = emb[None] + dm.label_emb(kwargs["y"])[:, None]  # (rows, U, E)
        else:
            emb = emb[None].expand(rows, -1, -1)
        for i, block in enumerate(blocks):
            out = seen[i]
            idx = block_index_map(inverse, tuple(out.shape[-2:]))  # (rows, bh, bw)
            table = block.emb_layers(emb)  # (rows, U, C)
            want = table[torch.arange(rows)[:, None, None], idx].permute(0, 3, 1, 2)
            assert out.shape == want.shape
            # rounding only (emb_layers on a (rows, U) batch here): a misplaced pixel would be off by ~0.1
            assert (out - want).abs().max().item() <= 1e-5, (i, tracks)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_rows_sharing_one_map_give_the_same_forward(models: dict, family: str) -> None:
    """CFG chunks share their image's map: an index with one row per image (R = B) broadcast to the
    chunks gives exactly the forward of the map repeated per row."""
    p = models[family]
    dm = p.model.diffusion_model
    batch, chunks, h, w = 2, 2, 8, 8
    unique = torch.tensor([100.0, 400.0, 900.0])
    inverse = torch.randint(0, 3, (batch, h, w), generator=torch.Generator().manual_seed(3))
    x = _latent(batch * chunks, h, w, seed=10)
    kwargs = mf.diffusion_kwargs(p, batch * chunks, seed=2)
    carrier = torch.full((batch * chunks,), CARRIER)
    with torch.no_grad(), PerPixelTimesteps(dm) as hooks:
        hooks.set_map(None, unique=unique, inverse=inverse, rows=batch * chunks)
        shared = dm(x, carrier, **kwargs)
        hooks.set_map(unique[inverse].repeat(chunks, 1, 1))
        full = dm(x, carrier, **kwargs)
        with pytest.raises(ValueError, match="does not divide"):
            hooks.set_map(None, unique=unique, inverse=inverse, rows=3)
    assert torch.equal(shared, full)


def test_another_timestep_block_keeps_the_stock_embedding(models: dict) -> None:
    """A timestep block another pack put in the UNet reads the embedding itself: it must get the stock (B', E)
    rows, never the table, and the ResBlocks still get each pixel's timestep."""
    p = models["sd15"]
    dm = p.model.diffusion_model
    seen: list[tuple[int, ...]] = []

    class Reader(openaimodel.TimestepBlock):
        def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(emb.shape))
            return x

    x = _latent(2, 8, 8, seed=11)
    t_map = _split_map(2, 8, 8, 200.0, 800.0)
    t_map[1, :2] = 500.0  # three distinct timesteps for two rows: the table's shape is not the stock one
    want = _hooked(p, x, t_map)
    dm.input_blocks[1].append(Reader())
    try:
        got = _hooked(p, x, t_map)
    finally:
        del dm.input_blocks[1][-1]
    assert seen == [(2, dm.time_embed[-1].out_features)]
    assert (got - want).abs().max().item() < TOL
