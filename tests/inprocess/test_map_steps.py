"""euler, ddim, euler_ancestral and dpmpp_2m on per-pixel sigma maps (map_steps.py) give the lock step's result bit
for bit: with a drawn key item, with the static mask, and with dynamic masks (where the pixels are
re-partitioned at every step and the lock step replays new sampler instances), on an eps UNet and on a
flow transformer; and the run-time check that guards the restated maths fails on maths that differ."""

from __future__ import annotations

import sys

import comfy.k_diffusion.sampling as kdiff
import comfy.samplers
import pytest
import torch

from asyndm.comfy_adapter import track_model
from asyndm.comfy_adapter.map_steps import agrees_with_comfy, map_kind
from asyndm.schedule_spec import AsynSchedule
from tests import model_factory as mf
from tests.inprocess.sampling import asyn, fixed_masks, rel_err, stock

MAP_SAMPLERS = [("euler", None), ("ddim", 0.0), ("ddim", 1.0), ("euler_ancestral", None), ("dpmpp_2m", None)]


def _run_node(pack_nodes, model, conds, name, eta, words, mode, schedule=None, steps=6, batch=1, scheduler="normal",
              denoise=1.0):
    latent = {"samples": torch.zeros(batch, 4, 16, 16)}
    return pack_nodes.AsynDMKSampler.execute(model, conds[0], conds[1], latent, 3, steps, 5.0, name, scheduler, denoise,
                                             words, 0.7, "bin", 1.0, mode, eta if eta is not None else 0.0, False,
                                             schedule).args[0]["samples"]


def _pack_modules(module: str = "sampler") -> list:
    """An adapter module as the tests import it and as the pack's nodes import it (under the pack's name)."""
    return [m for name, m in list(sys.modules.items()) if name.endswith(f"asyndm.comfy_adapter.{module}")]


def _sampler_modules() -> list:
    return _pack_modules("sampler")


def _lockstep_only(monkeypatch):
    for module in _sampler_modules():
        monkeypatch.setattr(module, "map_kind", lambda *args, **kwargs: None)


def _distinct_sigma_calls(monkeypatch, on: bool) -> None:
    for module in _sampler_modules():
        monkeypatch.setattr(module.AsynSampler, "distinct_sigma_calls", on)


@pytest.fixture(autouse=True)
def _same_calls_on_both_routes(monkeypatch):
    """The routes are compared with the same table call everywhere: the map route's KSampler calls where every
    pixel sits at one sigma (which the lock step cannot see) are tested on their own below."""
    _distinct_sigma_calls(monkeypatch, False)


@pytest.mark.parametrize(("name", "eta"), MAP_SAMPLERS)
@pytest.mark.parametrize("mode", ["dynamic", "static", "drawn"])
def test_map_steps_are_the_lock_step_bit_for_bit(sd15_checkpoint, conds, pack_nodes, monkeypatch, name, eta, mode):
    model = sd15_checkpoint[0]
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., 3:11, 5:13] = 1.0
    drawn = AsynSchedule(curve="bin", k=(0.8,), mask_source="masks", masks=masks)
    words, source, schedule = ("", "dynamic", drawn) if mode == "drawn" else ("rabbit, basketball", mode, None)
    calls: list[str] = []
    real = _sampler_modules()[0].run_on_maps

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    for module in _sampler_modules():
        monkeypatch.setattr(module, "run_on_maps", spy)
    on_maps = _run_node(pack_nodes, model, conds, name, eta, words, source, schedule)
    assert calls, "the map steps did not run"
    _lockstep_only(monkeypatch)
    in_lock_step = _run_node(pack_nodes, model, conds, name, eta, words, source, schedule)
    assert torch.isfinite(on_maps).all()
    assert torch.equal(on_maps, in_lock_step), float((on_maps - in_lock_step).abs().max())


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m"])
def test_map_steps_on_a_flow_transformer(monkeypatch, name):
    """Flux (sigma = t, rectified flow): euler runs on maps; euler_ancestral keeps ComfyUI's RF variant
    in the lock step (map_kind refuses it)."""
    model = mf.build_flux()
    pos, neg = mf.make_flux_conditioning(seed=1), mf.make_flux_conditioning(seed=2)
    latent = torch.zeros(1, 16, 8, 8)
    schedule = fixed_masks(1, 8, 8)
    kw = dict(schedule=schedule, seed=2, steps=5, cfg=2.0, sampler=name, scheduler="simple")
    on_maps = asyn(model, pos, neg, latent, **kw)
    _lockstep_only(monkeypatch)
    assert torch.equal(on_maps, asyn(model, pos, neg, latent, **kw))
    ms = model.model.model_sampling
    assert map_kind(comfy.samplers.ksampler("euler_ancestral"), ms) is None


@pytest.mark.parametrize("options", [{}, {"eta": 0.5, "s_noise": 0.7}, {"eta": 0.0}, {"eta": 1.6}])
def test_the_run_time_check_accepts_comfyuis_ancestral_maths(options):
    assert agrees_with_comfy("euler_ancestral", comfy.samplers.ksampler("euler_ancestral", options))


def test_the_run_time_check_accepts_comfyuis_euler_and_refuses_other_maths():
    assert agrees_with_comfy("euler", comfy.samplers.ksampler("euler"))

    def half_step_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in)
            x = x + kdiff.to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i]) * 0.5
        return x

    assert not agrees_with_comfy("euler", comfy.samplers.KSAMPLER(half_step_euler))


def test_the_run_time_check_accepts_comfyuis_dpmpp_2m_and_refuses_first_order_only():
    assert agrees_with_comfy("dpmpp_2m", comfy.samplers.ksampler("dpmpp_2m"))

    def first_order_only(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in)
            t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            x = (t_next.neg().exp() / t.neg().exp()) * x - (t - t_next).expm1() * denoised
        return x

    assert not agrees_with_comfy("dpmpp_2m", comfy.samplers.KSAMPLER(first_order_only))


def test_only_comfyuis_own_functions_with_known_options_run_on_maps():
    ms = mf.build_sd15(model_channels=32).model.model_sampling
    assert map_kind(comfy.samplers.ksampler("euler"), ms) == "euler"
    assert map_kind(comfy.samplers.sampler_object("ddim"), ms) == "euler"
    assert map_kind(comfy.samplers.ksampler("euler_ancestral", {"eta": 0.3}), ms) == "euler_ancestral"
    assert map_kind(comfy.samplers.ksampler("euler", {"s_churn": 0.5}), ms) is None  # churn adds its own noise
    assert map_kind(comfy.samplers.ksampler("euler_ancestral", {"noise_sampler": lambda a, b: a}), ms) is None
    assert map_kind(comfy.samplers.ksampler("dpmpp_2m"), ms) == "dpmpp_2m"
    assert map_kind(comfy.samplers.ksampler("dpmpp_2m", {"eta": 0.5}), ms) is None
    assert map_kind(comfy.samplers.ksampler("heun"), ms) is None
    assert map_kind(comfy.samplers.ksampler("dpmpp_2m_sde"), ms) is None
    assert map_kind(comfy.samplers.KSAMPLER(lambda *a, **k: None), ms) is None


@pytest.fixture(scope="module")
def tiny_sd15():
    model = mf.build_sd15(model_channels=32)
    return model, mf.make_conditioning(model, seed=1), mf.make_conditioning(model, seed=2)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("scheduler", ["karras", "ddim_uniform"])
def test_map_steps_with_a_batch_inpainting_and_img2img(tiny_sd15, monkeypatch, name, scheduler):
    """Two images with their own key masks, a latent noise mask (inpainting) and denoise 0.6: still the
    lock step's result bit for bit."""
    model, pos, neg = tiny_sd15
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    noise_mask = torch.zeros(2, 1, 8, 8)
    noise_mask[:, :, 2:7, 1:6] = 1.0
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, :, :4] = 1.0
    masks[1, :, :, 3:] = 1.0
    schedule = AsynSchedule(curve="bin", k=(0.8,), mask_source="masks", masks=masks)
    kw = dict(schedule=schedule, seed=4, steps=6, cfg=3.0, sampler=name, scheduler=scheduler, denoise=0.6,
              noise_mask=noise_mask)
    on_maps = asyn(model, pos, neg, latent, **kw)
    _lockstep_only(monkeypatch)
    in_lock_step = asyn(model, pos, neg, latent, **kw)
    assert torch.equal(on_maps, in_lock_step)
    assert not torch.equal(on_maps, asyn(model, pos, neg, latent, **{**kw, "schedule": None}))


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_a_call_with_every_pixel_at_one_sigma_is_ksamplers_own(tiny_sd15, monkeypatch, name):
    """Before the first step every pixel sits at the top sigma (key pixels wait there) and the last step starts
    every track from the carrier's sigma: the map route makes those two calls as KSampler's own, so the first
    denoised is KSampler's bit for bit, and the rest of the run differs from the table calls only by the time
    embedding's rounding."""
    model, pos, neg = tiny_sd15
    latent = torch.zeros(1, 4, 8, 8)
    kw = dict(seed=5, steps=6, cfg=3.0, sampler=name, scheduler="normal")
    sigma_maps: list[bool] = []
    real_call = track_model.PixelModel.__call__

    def spy(self, x, sigma_map, *args, **kwargs):
        sigma_maps.append(sigma_map is not None)
        return real_call(self, x, sigma_map, *args, **kwargs)

    def first_denoised(run):
        seen: list[torch.Tensor] = []
        out = run(callback=lambda step, x0, x, total: seen.append(x0.clone()) if step == 0 else None)
        return seen[0], out

    want, _ = first_denoised(lambda callback: stock(model, pos, neg, latent, callback=callback, **kw))
    _distinct_sigma_calls(monkeypatch, True)
    monkeypatch.setattr(track_model.PixelModel, "__call__", spy)
    got, on = first_denoised(lambda callback: asyn(model, pos, neg, latent, schedule=fixed_masks(1, 8, 8),
                                                   callback=callback, **kw))
    assert sigma_maps == [False, True, True, True, True, False]
    assert torch.equal(got, want)
    _distinct_sigma_calls(monkeypatch, False)
    sigma_maps.clear()
    off = asyn(model, pos, neg, latent, schedule=fixed_masks(1, 8, 8), **kw)
    assert sigma_maps == [True] * 6
    assert torch.isfinite(on).all() and rel_err(on, off) < 1e-4, rel_err(on, off)


@pytest.mark.parametrize("batch", [1, 2])
def test_tracks_at_one_sigma_share_a_table_row(sd15_checkpoint, conds, pack_nodes, monkeypatch, batch):
    """Dynamic masks leave many tracks at one sigma in a call (key pixels waiting at the top, tracks apart only in
    their future): the map route gives each distinct sigma one table row and every pixel its sigma's row, so every
    sigma map is the one-row-per-track call's, and the run differs from it only by the time embedding's rounding."""
    model = sd15_checkpoint[0]
    calls: list[tuple[int, int, torch.Tensor | None]] = []  # (table rows, distinct sigmas, sigma map) per model call

    def spy(real):
        def call(self, x, sigma_map, carrier, *args, table=None, **kwargs):
            rows = distinct = 0
            if table is not None:
                rows, distinct = table.values.numel(), torch.unique(table.values).numel()
            calls.append((rows, distinct, None if sigma_map is None else sigma_map.clone()))
            return real(self, x, sigma_map, carrier, *args, table=table, **kwargs)
        return call

    for module in _pack_modules("track_model"):
        monkeypatch.setattr(module.PixelModel, "__call__", spy(module.PixelModel.__call__))
    per_track = _run_node(pack_nodes, model, conds, "euler", None, "rabbit, basketball", "dynamic", steps=12,
                          batch=batch)
    one_row_per_track = list(calls)
    calls.clear()
    _distinct_sigma_calls(monkeypatch, True)
    shared = _run_node(pack_nodes, model, conds, "euler", None, "rabbit, basketball", "dynamic", steps=12,
                          batch=batch)
    # a table has a row per track (or distinct sigma) and image
    assert any(rows > distinct * batch for rows, distinct, _ in one_row_per_track), "no call had tracks at one sigma"
    assert all(rows == distinct * batch for rows, distinct, _ in calls)
    assert len(calls) == len(one_row_per_track)
    for (rows, _, sigma_map), (_, _, want) in zip(calls, one_row_per_track, strict=True):
        if rows:  # a table call (the others are KSampler's own, tested above)
            assert want is not None and torch.equal(sigma_map, want)
    assert torch.isfinite(shared).all() and rel_err(shared, per_track) < 1e-4, rel_err(shared, per_track)


def test_the_dynamic_history_is_what_the_tracks_followed(sd15_checkpoint, conds, pack_nodes, monkeypatch):
    """The readings are written into the priority history once, after the run (the preview's priorities): every
    step's map equals, pixel by pixel, the priority the run's last tracks reached that step's state with."""
    made, tracks = [], []
    for module in _sampler_modules():
        cls, masks = module.AsynSampler, module._DynamicMasks
        real_init, real_finish = cls.__init__, masks.finish

        def init(self, *args, real=real_init, **kwargs):
            real(self, *args, **kwargs)
            made.append(self)

        def finish(self, reading, current, real=real_finish):
            new = real(self, reading, current)
            tracks.append(current if new is None else new)
            return new

        monkeypatch.setattr(cls, "__init__", init)
        monkeypatch.setattr(masks, "finish", finish)
    _run_node(pack_nodes, sd15_checkpoint[0], conds, "euler", None, "rabbit, basketball", "dynamic", steps=8)
    last = tracks[-1]
    assert last.history is not None and last.host_index is not None and len(tracks) >= 5
    priorities = made[-1].record.priorities
    changed = 0
    for i in range(1, last.history.shape[1]):  # state i is reached with history[:, i] (state 0: the start)
        assert torch.equal(priorities[i - 1], last.history[:, i][last.host_index]), i
        changed += int(not torch.equal(priorities[i - 1], priorities[0]))
    assert changed, "no reading changed the priorities"


def _pixel_steps(monkeypatch, on: bool) -> None:
    for module in _sampler_modules():
        monkeypatch.setattr(module.AsynSampler, "pixel_steps", on)


@pytest.mark.parametrize(("batch", "name", "scheduler", "denoise"), [
    (1, "euler", "normal", 1.0), (2, "euler", "normal", 1.0), (1, "ddim", "normal", 1.0),
    (1, "euler", "karras", 0.6),  # img2img: the run starts below the top
    (1, "euler", "ddim_uniform", 1.0),  # states to sigmas through the model's own table (TimestepTable)
])
def test_pixel_steps_follow_the_tracks_sigmas(sd15_checkpoint, conds, pack_nodes, monkeypatch, batch, name, scheduler,
                                              denoise):
    """Euler with dynamic masks steps every pixel's state on the host (pixel_steps.py) instead of re-partitioning
    tracks: every call has the track route's carrier, sigma map and table values (one row per distinct sigma and
    image), and every step's states and priorities are the track route's."""
    model = sd15_checkpoint[0]
    calls: list[tuple] = []
    records: list = []
    routes: list[str] = []

    def spy(real):
        def call(self, x, sigma_map, carrier, *args, table=None, **kwargs):
            values = None if table is None else torch.sort(table.values).values
            mapped = None if table is None else table.values[table.index]
            calls.append((carrier.clone(), None if sigma_map is None else sigma_map.clone(), values, mapped))
            return real(self, x, sigma_map, carrier, *args, table=table, **kwargs)
        return call

    for module in _pack_modules("track_model"):
        monkeypatch.setattr(module.PixelModel, "__call__", spy(module.PixelModel.__call__))
    for module in _sampler_modules():
        real_init, real_pixels = module.AsynSampler.__init__, module.run_on_pixels

        def init(self, *args, real=real_init, **kwargs):
            real(self, *args, **kwargs)
            records.append(self)

        def pixels(*args, real=real_pixels, **kwargs):
            routes.append("pixels")
            return real(*args, **kwargs)

        monkeypatch.setattr(module.AsynSampler, "__init__", init)
        monkeypatch.setattr(module, "run_on_pixels", pixels)
    _distinct_sigma_calls(monkeypatch, True)
    run = lambda: _run_node(pack_nodes, model, conds, name, 0.0 if name == "ddim" else None,  # noqa: E731
                            "rabbit, basketball", "dynamic", steps=12, batch=batch, scheduler=scheduler,
                            denoise=denoise)
    _pixel_steps(monkeypatch, False)
    on_tracks = run()
    want_calls, want_record = list(calls), records[-1].record
    assert not routes
    calls.clear()
    _pixel_steps(monkeypatch, True)
    on_pixels = run()
    got_record = records[-1].record
    assert routes == ["pixels"]
    assert len(calls) == len(want_calls) >= 12  # (ddim_uniform may give a step more)
    assert sum(table is not None for _, _, table, _ in calls) >= 8, "too few table calls to compare"
    for step, (got, want) in enumerate(zip(calls, want_calls, strict=True)):
        assert torch.equal(got[0], want[0]), step
        assert (got[1] is None) == (want[1] is None), step
        if got[1] is not None:
            assert torch.equal(got[1], want[1]), step
            assert torch.equal(got[2], want[2]), step  # the same rows, in another order
            assert torch.equal(got[3], got[1][:, 0]), step  # the table's entries are the map
    for got_state, want_state in zip(got_record.states, want_record.states, strict=True):
        assert torch.equal(got_state, want_state)
    for got_k, want_k in zip(got_record.priorities, want_record.priorities, strict=True):
        assert torch.equal(got_k, want_k)
    # The rows' order can change the time embedding's rounding (a row's bits can depend on its place in the call)
    assert torch.isfinite(on_pixels).all() and rel_err(on_pixels, on_tracks) < 1e-5, rel_err(on_pixels, on_tracks)
