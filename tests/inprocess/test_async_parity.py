"""Asynchronous runs follow method.md: the UNet sees each pixel's own scheduled timestep.

Static masks in reference mode must give exactly asyndm.schedules.timestep_maps (rounded);
dynamic masks must follow the one-step lag rule (the masks read at step i set the curves used by
the transition of step i + 1, and before the first step every pixel follows the last-positioned word).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from asyndm.schedule_spec import AsynSchedule
from asyndm.schedules import next_state, timestep_maps
from asyndm.timesteps import round_clamp
from tests.inprocess.sampling import keep_samplers, unet_hooks_class


@pytest.fixture(scope="module")
def adapter():
    from tests.inprocess.conftest import PACK_MODULE, load_pack

    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.asyndm.comfy_adapter.sampler")


class Recorder:
    """Records the timestep rows every UNet forward of the run uses: the per-pixel rows handed to the time hooks,
    or, where every pixel sits at one sigma and the sampler makes KSampler's own call, its timesteps per row."""

    def __init__(self, monkeypatch, adapter) -> None:
        self.maps: list[torch.Tensor] = []
        cls = unet_hooks_class()
        original = cls._unet_pre

        def unet_pre(hooks, module, args, kwargs):
            t_map = hooks.t_map()
            if t_map is None:
                x = args[0] if args else kwargs["x"]
                t = args[1] if len(args) > 1 else kwargs["timesteps"]
                t_map = t.float().view(-1, 1, 1).expand(x.shape[0], *x.shape[-2:])
            self.maps.append(t_map.detach().clone())
            return original(hooks, module, args, kwargs)

        monkeypatch.setattr(cls, "_unet_pre", unet_pre)


def run_node(pack_nodes, model, conds, latent, *, schedule=None, steps=6, sampler="ddim", eta=1.0, reference=True,
             key_words="", mask_mode="dynamic", seed=1, cfg=5.0):
    out = pack_nodes.AsynDMKSampler.execute(model, conds[0], conds[1], latent, seed, steps, cfg, sampler,
                                            "ddim_uniform", 1.0, key_words, 0.7, "bin", 1.0, mask_mode, eta, reference,
                                            schedule)
    return out.args[0]["samples"]


@pytest.mark.parametrize("curve", ["bin", "lin", "exp"])
def test_static_masks_reach_the_unet_as_timestep_maps(monkeypatch, adapter, pack_nodes, sd15_checkpoint, conds, curve):
    model = sd15_checkpoint[0]
    rec = Recorder(monkeypatch, adapter)
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, :4, :4] = 1.0
    masks[0, 1, 4:, 4:] = 1.0
    k = (0.7, 0.9)
    schedule = AsynSchedule(curve=curve, k=k, mask_source="masks", masks=masks)
    steps = 6
    out = run_node(pack_nodes, model, conds, {"samples": torch.zeros(1, 4, 8, 8)}, schedule=schedule, steps=steps)
    assert torch.isfinite(out).all()
    expected = timestep_maps(masks, torch.tensor(k), curve=curve, num_steps=steps)
    assert len(rec.maps) == steps  # one model call per step (cond and uncond batched)
    for i, t_rows in enumerate(rec.maps):
        assert t_rows.shape == (2, 8, 8)  # uncond and cond rows of one image
        want = round_clamp(expected[i]).float()
        for row in t_rows:
            assert torch.equal(row, want[0]), f"step {i}: {row} vs {want[0]}"
    # object pixels really are noisier than the background in the middle of sampling
    mid = rec.maps[steps // 2][0]
    assert mid[:4, :4].min() > mid[:4, 4:].max()


def test_dynamic_masks_follow_the_lag_rule(monkeypatch, adapter, pack_nodes, sd15_checkpoint, conds):
    model = sd15_checkpoint[0]
    seen: list[torch.Tensor] = []
    original = adapter.AsynSampler._priorities_from_attention

    def spy(self, attn, size, grid, **kwargs):
        out = original(self, attn, size, grid, **kwargs)
        if kwargs.get("levels") is not None:  # the map holds each pixel's index among the sorted priorities
            levels = torch.tensor(sorted({0.0, *self.schedule.k}), dtype=torch.float32)
            seen.append(levels[out.long()])
        else:
            seen.append(out.clone())
        return out

    monkeypatch.setattr(adapter.AsynSampler, "_priorities_from_attention", spy)
    made = keep_samplers(monkeypatch, adapter)
    steps = 6
    latent = {"samples": torch.zeros(1, 4, 32, 32)}  # capture grid 8x8
    run_node(pack_nodes, model, conds, latent, steps=steps, key_words="rabbit, basketball:0.9", reference=True)
    record = made[-1].record
    # masks are read after every step but the last (whose attention would decide no later state)
    assert len(record.states) == steps and len(seen) == steps - 1
    # before the first step every pixel follows the last-positioned word (basketball, k = 0.9)
    assert torch.all(record.priorities[0] == 0.9)
    for i in range(1, steps):
        assert torch.equal(record.priorities[i], seen[i - 1]), f"step {i} did not use the masks of step {i - 1}"
    # each transition used the priorities in force at that step
    for i in range(steps - 1):
        k_map = record.priorities[i]
        expected = _mixed_next(record.states[i], k_map, steps - i - 1, steps)
        assert torch.allclose(record.states[i + 1], expected, atol=1e-4), f"transition {i}"
    # the masks come from attention: not everything stays on one curve
    assert any(bool((p == 0).any()) for p in seen), "no pixel was ever background"


def _mixed_next(s: torch.Tensor, k_map: torch.Tensor, remaining: int, n: int) -> torch.Tensor:
    """Independent statement of one transition: background linear, item pixels bin with their k."""
    values = sorted({float(v) for v in k_map.unique()} - {0.0})
    items = torch.stack([(k_map == v).float() for v in values], dim=1) if values else torch.zeros(s.shape[0], 0, *s.shape[1:])
    return next_state(s, items, torch.tensor(values), remaining, curve="bin", num_steps=n)
