"""Flux (dev and schnell): per-token timesteps through the Flux family adapter.

The models are random-weight instances of ComfyUI's own Flux classes (tests/model_factory.py,
2 double and 2 single blocks, width 64), so everything the adapter hooks is ComfyUI's code.
"""

from __future__ import annotations

import importlib

import comfy.model_management
import comfy.sample
import comfy.samplers
import pytest
import torch

from asyndm.comfy_adapter.errors import UnsupportedModelError
from asyndm.comfy_adapter.families.flux import PerTokenTimesteps, token_index
from asyndm.comfy_adapter.sampler import AsynSampler
from asyndm.schedule_spec import AsynSchedule
from asyndm.schedules import timestep_maps
from asyndm.sigma_map import state_to_sigma
from tests.inprocess.sampling import SAME_AS_KSAMPLER, TokenTimesteps, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import build_flux, make_flux_conditioning

SIZE = 16  # latent 16x16 -> 8x8 tokens
VARIANTS = {"dev": True, "schnell": False}


@pytest.fixture(scope="module")
def models():
    return {name: build_flux(guidance) for name, guidance in VARIANTS.items()}


def conds(variant: str):
    guidance = 3.5 if variant == "dev" else None
    return make_flux_conditioning(seed=1, guidance=guidance), make_flux_conditioning(seed=2, guidance=guidance)


def latent(h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.zeros(1, 16, h, w)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("cfg", [1.0, 3.5])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_no_key_pixels_is_the_ksampler_bit_for_bit(models, variant, sampler, cfg, case):
    model = models[variant]
    pos, neg = conds(variant)
    kw = dict(seed=4, cfg=cfg, sampler=sampler, scheduler="simple")
    a = stock(model, pos, neg, latent(), **kw)
    b = asyn(model, pos, neg, latent(), schedule=SAME_AS_KSAMPLER[case](1, SIZE, SIZE), **kw)
    assert torch.equal(a, b), rel_err(b, a)


def split_map(rows: int, t_left: float, t_right: float) -> tuple[torch.Tensor, torch.Tensor]:
    """unique (2,), inverse (1, H, W): the left half of the latent at t_left, the right at t_right."""
    inverse = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    inverse[..., SIZE // 2:] = 1
    return torch.tensor([t_left, t_right]), inverse


class ModulationOutputs:
    """The outputs of every per-block modulation layer and of the final layer's, in call order."""

    def __init__(self, dm) -> None:
        layers = [b.img_mod for b in dm.double_blocks] + [b.modulation for b in dm.single_blocks]
        self.layers = [*layers, dm.final_layer.adaLN_modulation]
        self.seen: list[torch.Tensor] = []

    def _keep(self, _module, _args, out) -> None:
        if isinstance(out, tuple):  # (ModulationOut, ModulationOut | None) -> (B, L, 3 or 6 D)
            parts = [p for m in out if m is not None for p in (m.shift, m.scale, m.gate)]
            out = torch.cat(parts, dim=-1)
        self.seen.append(out.detach().clone())

    def __enter__(self):
        self.handles = [layer.register_forward_hook(self._keep) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_image_token_is_modulated_at_its_own_timestep(models, variant):
    """Left-half tokens get exactly what the stock model computes at t_left, right-half tokens at
    t_right, text tokens (in the single blocks) the stock row at the carrier timestep."""
    model = models[variant]
    dm = model.model.diffusion_model
    pos, _ = conds(variant)
    x = torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    context, extra = pos[0]
    kwargs = {"context": context, "y": extra["pooled_output"]}
    if variant == "dev":
        kwargs["guidance"] = torch.tensor([3.5])
    t_left, t_right, carrier = 0.25, 0.9, 0.5
    stock_out = {}
    for t in (t_left, t_right, carrier):
        with ModulationOutputs(dm) as rec, torch.no_grad():
            dm(x, torch.tensor([t]), **kwargs)
        stock_out[t] = rec.seen
    unique, inverse = split_map(1, t_left, t_right)
    with PerTokenTimesteps(dm) as adapter, ModulationOutputs(dm) as rec, torch.no_grad():
        adapter.set_map(None, unique=unique, inverse=inverse, rows=1)
        dm(x, torch.tensor([carrier]), **kwargs)
        adapter.set_map(None)
    tokens = (SIZE // 2) ** 2
    left = (torch.arange(tokens) % (SIZE // 2)) < SIZE // 4
    n_double = len(dm.double_blocks)
    text = context.shape[1]
    assert len(rec.seen) == len(stock_out[carrier])
    for i, got in enumerate(rec.seen):
        is_single = n_double <= i < len(rec.seen) - 1
        image = got[:, text:] if is_single else got
        assert image.shape[1] == tokens, (i, got.shape)
        for mask, t in ((left, t_left), (~left, t_right)):
            want = stock_out[t][i].expand(-1, tokens, -1)
            assert torch.allclose(image[:, mask], want[:, mask], rtol=1e-5, atol=1e-6), (i, t)
        if is_single:
            assert torch.equal(got[:, :text], stock_out[carrier][i].expand(-1, text, -1)), i


def test_a_drawn_mask_reaches_the_transformer_as_the_schedules_token_map(models, monkeypatch):
    model = models["dev"]
    pos, neg = conds("dev")
    steps = 6
    schedule = fixed_masks(1, SIZE, SIZE)  # top half, bin, k = 0.8
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimesteps)
    try:
        a = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=1.0, scheduler="simple", schedule=schedule)
    finally:
        rec.handle.remove()
    sigmas = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler="euler", scheduler="simple",
                                     model_options=model.model_options).sigmas
    ms = model.get_model_object("model_sampling")
    states = timestep_maps(schedule.masks, torch.tensor(schedule.k), curve="bin", num_steps=steps)
    assert len(rec.steps) == steps
    distinct = 0
    for i, seen in enumerate(rec.steps):
        sigma = state_to_sigma(states[i].float(), sigmas, sigma_top=float(ms.sigma_max))
        want = ms.timestep(sigma)[:, None]  # (B, 1, H, W) per latent pixel
        want_tokens = token_index(torch.arange(SIZE * SIZE).view(1, SIZE, SIZE), 2)  # top-left pixel of each patch
        assert torch.equal(seen[0], want.flatten()[want_tokens[0]].float()), f"step {i}"
        distinct = max(distinct, len(seen[0].unique()))
        assert seen[0, -1] == ms.timestep(sigmas[i:i + 1])[0]  # background tokens: the scheduler's own timestep
    assert distinct == 2, "the transformer never saw two timesteps"
    sync = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=1.0, scheduler="simple")
    again = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=1.0, scheduler="simple", schedule=schedule)
    assert torch.isfinite(a).all() and torch.equal(a, again) and rel_err(a, sync) > 1e-3


def test_odd_latent_sizes_keep_each_token_on_one_track(models, monkeypatch):
    """A mask edge through a 2x2 patch: the whole patch takes the patch's largest priority."""
    model = models["schnell"]
    pos, neg = conds("schnell")
    h, w = 9, 11
    masks = torch.zeros(1, 1, h, w)
    masks[..., :3, :5] = 1.0  # 3 rows and 5 columns: edges inside patches
    made = []
    init = AsynSampler.__init__
    monkeypatch.setattr(AsynSampler, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="masks", masks=masks)
    out = asyn(model, pos, neg, latent(h, w), seed=2, steps=4, cfg=1.0, scheduler="simple", schedule=schedule)
    assert torch.isfinite(out).all() and out.shape == (1, 16, h, w)
    k_map = made[-1].record.priorities[0][0]
    want = torch.zeros(h, w)
    want[:4, :6] = 0.7
    assert torch.equal(k_map, want)


def test_what_flux_cannot_do_yet_is_refused_by_name(models):
    model = models["dev"]
    pos, neg = conds("dev")
    words = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",))
    with pytest.raises(ValueError, match="key words need to know the prompt's tokens.*CLIP Text Encode \\(AsynDM\\)"):
        asyn(model, pos, neg, latent(), schedule=words, cfg=1.0, scheduler="simple")
    for sampler in ("euler_ancestral", "ddpm"):  # ComfyUI's own flow variants, per track
        plain = stock(model, pos, neg, latent(), cfg=1.0, scheduler="simple", sampler=sampler)
        out = asyn(model, pos, neg, latent(), schedule=fixed_masks(1, SIZE, SIZE), cfg=1.0, scheduler="simple",
                   sampler=sampler)
        assert torch.isfinite(out).all() and rel_err(out, plain) > 1e-3, sampler
    noise = comfy.sample.prepare_noise(latent(), 0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4)
    with pytest.raises(ValueError, match="reference mode.*turn it off for Flux"):
        comfy.sample.sample_custom(model, noise, 1.0, AsynSampler("ddim", fixed_masks(1, SIZE, SIZE), eta=1.0,
                                                                   reference=True), sigmas, pos, neg, latent())


def test_an_unsupported_flux_layout_family_is_named():
    from tests.factory_flux_family import build_hunyuan_image, make_hunyuan_image_conditioning

    distilled = build_hunyuan_image(meanflow=True)  # Flux layout; meanflow's time_r_in cannot go per token
    pos = make_hunyuan_image_conditioning(seed=1)
    for schedule in (None, fixed_masks(1, 8, 8)):
        with pytest.raises(UnsupportedModelError) as info:
            asyn(distilled, pos, pos, torch.zeros(1, 64, 8, 8), schedule=schedule, cfg=1.0, scheduler="simple")
        msg = str(info.value)
        assert "HunyuanImage 2.1 distilled" in msg and "not supported" in msg and "Flux" in msg and "SDXL" in msg, msg


def test_nothing_outlives_a_failed_flux_run(models):
    model = models["dev"]
    pos, neg = conds("dev")
    before = stock(model, pos, neg, latent(), seed=6, cfg=1.0, scheduler="simple")
    hooks_before = hook_state(model.model)

    def interrupt(step, x0, x, total):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        asyn(model, pos, neg, latent(), seed=6, cfg=1.0, scheduler="simple", schedule=fixed_masks(1, SIZE, SIZE),
             callback=interrupt)
    comfy.model_management.interrupt_current_processing(False)
    assert hook_state(model.model) == hooks_before
    assert torch.equal(stock(model, pos, neg, latent(), seed=6, cfg=1.0, scheduler="simple"), before)


def test_sampler_custom_advanced_with_flux_guidance(models, pack_nodes):
    """FluxGuidance, BasicGuider (cfg 1), a drawn-mask schedule and the Asynchronous Sampler."""
    custom = importlib.import_module("comfy_extras.nodes_custom_sampler")
    flux_nodes = importlib.import_module("comfy_extras.nodes_flux")
    model = models["dev"]
    pos, _ = conds("dev")
    guided = flux_nodes.FluxGuidance.execute(pos, 2.5).args[0]
    sigmas = custom.BasicScheduler.execute(model, "simple", 4, 1.0).args[0]
    noise = custom.RandomNoise.execute(5).args[0]
    guider = custom.BasicGuider.execute(model, guided).args[0]
    lat = {"samples": latent()}
    plain = custom.SamplerCustomAdvanced.execute(noise, guider, custom.KSamplerSelect.execute("euler").args[0], sigmas,
                                                 lat).args[0]["samples"]
    sync = pack_nodes.AsynDMSampler.execute("euler", "", 0.7, "bin", 1.0, "dynamic", 0.0, False).args[0]
    assert torch.equal(custom.SamplerCustomAdvanced.execute(noise, guider, sync, sigmas, lat).args[0]["samples"], plain)
    masked = pack_nodes.AsynDMSampler.execute("euler", "", 0.7, "bin", 1.0, "dynamic", 0.0, False,
                                              fixed_masks(1, SIZE, SIZE)).args[0]
    out = custom.SamplerCustomAdvanced.execute(noise, guider, masked, sigmas, lat).args[0]["samples"]
    assert torch.isfinite(out).all() and rel_err(out, plain) > 1e-3


def test_the_node_samples_flux_with_a_drawn_mask_and_shows_the_strip(models, pack_nodes):
    """The Asynchronous KSampler node on Flux: the schedule input carries the mask; the timestep-map
    strip is drawn for a 16-channel latent."""
    model = models["dev"]
    pos, neg = conds("dev")
    out = pack_nodes.AsynDMKSampler.execute(model, pos, neg, {"samples": latent()}, 3, 4, 1.0, "euler", "simple", 1.0,
                                            "", 0.7, "bin", 1.0, "dynamic", 0.0, False, fixed_masks(1, SIZE, SIZE))
    samples, strip = out.args[0]["samples"], out.args[1]
    assert samples.shape == (1, 16, SIZE, SIZE) and torch.isfinite(samples).all()
    assert strip.ndim == 4 and strip.shape[-1] == 3 and float(strip.std()) > 0
