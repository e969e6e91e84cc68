"""SD3 / SD3.5 (MMDiT): per-token timesteps through the SD3 family adapter.

The models are random-weight instances of ComfyUI's own SD3 config and MMDiT class
(tests/model_factory.py build_sd3: width 128, 2 joint blocks; "large" with RMS q/k norm,
"medium" with SD3.5 medium's extra image self-attention), so everything the adapter swaps and
hooks is ComfyUI's code.
"""

from __future__ import annotations

import importlib

import comfy.model_management
import comfy.samplers
import pytest
import torch

from asyndm.comfy_adapter.families.base import token_index
from asyndm.comfy_adapter.families.mmdit import SWAPPED, PerTokenTimestepsMMDiT
from asyndm.schedules import timestep_maps
from asyndm.sigma_map import state_to_sigma
from tests.inprocess.sampling import SAME_AS_KSAMPLER, TokenTimesteps, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import SD3_VARIANTS, build_sd3, make_sd3_conditioning

SIZE = 16  # latent 16x16 -> 8x8 tokens


@pytest.fixture(scope="module")
def models():
    return {variant: build_sd3(variant) for variant in (*SD3_VARIANTS, "sd3")}


def conds():
    return make_sd3_conditioning(seed=1), make_sd3_conditioning(seed=2)


def latent(h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.zeros(1, 16, h, w)


@pytest.mark.parametrize("variant", [*SD3_VARIANTS, "sd3"])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("cfg", [1.0, 4.5])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_no_key_pixels_is_the_ksampler_bit_for_bit(models, variant, sampler, cfg, case):
    model = models[variant]
    pos, neg = conds()
    kw = dict(seed=4, cfg=cfg, sampler=sampler, scheduler="simple")
    a = stock(model, pos, neg, latent(), **kw)
    b = asyn(model, pos, neg, latent(), schedule=SAME_AS_KSAMPLER[case](1, SIZE, SIZE), **kw)
    assert torch.equal(a, b), rel_err(b, a)


def forward_kwargs(batch: int = 1) -> dict:
    pos, _ = conds()
    context, extra = pos[0]
    return {"context": context.expand(batch, -1, -1), "y": extra["pooled_output"].expand(batch, -1)}


def one_map(t: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([t]), torch.zeros(1, SIZE, SIZE, dtype=torch.long)


@pytest.mark.parametrize("variant", [*SD3_VARIANTS, "sd3"])
def test_the_per_token_blocks_compute_what_the_stock_blocks_do(models, variant):
    """Every image token mapped to the forward's own t: the swapped methods (the blocks' arithmetic
    redone with per-token modulation) give the stock forward. With the map cleared the originals run."""
    dm = models[variant].model.diffusion_model
    x = torch.randn(2, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(2)
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        want = dm(x, t, **kwargs)
        with PerTokenTimestepsMMDiT(dm) as adapter:
            adapter.set_map(None, *one_map(700.0), rows=2)
            got = dm(x, t, **kwargs)
            fired = list(adapter._fired)
            adapter.set_map(None)
            plain = dm(x, t, **kwargs)
    assert fired == [1] * (len(dm.joint_blocks) + 1) and adapter.table_builds == 1
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rel_err(got, want)
    assert torch.equal(plain, want)  # no map set: the originals run


class QkvInputs:
    """The input of block 0's image and text qkv projections: modulate(norm1(tokens)), where the
    tokens themselves do not depend on the timestep, so it shows each token's modulation."""

    def __init__(self, dm) -> None:
        block = dm.joint_blocks[0]
        self.layers = {"image": block.x_block.attn.qkv, "text": block.context_block.attn.qkv}
        self.seen: dict[str, torch.Tensor] = {}

    def __enter__(self):
        self.handles = [layer.register_forward_hook(self._keep(name)) for name, layer in self.layers.items()]
        return self

    def _keep(self, name):
        def hook(_module, args, _out):
            self.seen[name] = args[0].detach().clone()
        return hook

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("variant", ["large", "medium"])
def test_each_image_token_is_modulated_at_its_own_timestep(models, variant):
    """Left-half tokens are modulated exactly as the stock model at t_left, right-half tokens at
    t_right, text tokens as the stock model at the carrier timestep."""
    dm = models[variant].model.diffusion_model
    x = torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs()
    t_left, t_right, carrier = 250.0, 900.0, 500.0
    stock_in = {}
    for t in (t_left, t_right, carrier):
        with QkvInputs(dm) as rec, torch.no_grad():
            dm(x, torch.tensor([t]), **kwargs)
        stock_in[t] = rec.seen
    inverse = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    inverse[..., SIZE // 2:] = 1
    with PerTokenTimestepsMMDiT(dm) as adapter, QkvInputs(dm) as rec, torch.no_grad():
        adapter.set_map(None, unique=torch.tensor([t_left, t_right]), inverse=inverse, rows=1)
        dm(x, torch.tensor([carrier]), **kwargs)
        adapter.set_map(None)
    tokens = (SIZE // 2) ** 2
    left = (torch.arange(tokens) % (SIZE // 2)) < SIZE // 4
    image = rec.seen["image"]
    assert image.shape[1] == tokens
    for mask, t in ((left, t_left), (~left, t_right)):
        assert torch.allclose(image[:, mask], stock_in[t]["image"][:, mask], rtol=1e-5, atol=1e-6), t
        assert not torch.allclose(image[:, mask], stock_in[carrier]["image"][:, mask], rtol=1e-3, atol=1e-4), t
    assert torch.equal(rec.seen["text"], stock_in[carrier]["text"])


def test_a_drawn_mask_reaches_the_transformer_as_the_schedules_token_map(models, monkeypatch):
    model = models["large"]
    pos, neg = conds()
    steps = 6
    schedule = fixed_masks(1, SIZE, SIZE)  # top half, bin, k = 0.8
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsMMDiT)
    try:
        a = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=4.5, scheduler="simple", schedule=schedule)
    finally:
        rec.handle.remove()
    sigmas = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler="euler", scheduler="simple",
                                     model_options=model.model_options).sigmas
    ms = model.get_model_object("model_sampling")
    states = timestep_maps(schedule.masks, torch.tensor(schedule.k), curve="bin", num_steps=steps)
    assert len(rec.steps) == steps  # cond and uncond in one forward (2 rows)
    distinct = 0
    for i, seen in enumerate(rec.steps):
        assert seen.shape[0] == 2
        sigma = state_to_sigma(states[i].float(), sigmas, sigma_top=float(ms.sigma_max))
        want = ms.timestep(sigma.flatten()).view(1, SIZE, SIZE)
        want_tokens = want[:, ::2, ::2].reshape(1, -1)
        assert torch.equal(seen, want_tokens.expand(2, -1).float()), f"step {i}"
        distinct = max(distinct, len(seen[0].unique()))
        assert seen[0, -1] == ms.timestep(sigmas[i:i + 1])[0]  # background tokens: the scheduler's own timestep
    assert distinct == 2, "the transformer never saw two timesteps"
    sync = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=4.5, scheduler="simple")
    assert torch.isfinite(a).all() and rel_err(a, sync) > 1e-3


def test_token_order_is_the_patch_grid_row_by_row():
    """token_index reads the top-left pixel of each 2x2 patch, row by row (odd sizes padded)."""
    pixels = torch.arange(5 * 7).view(1, 5, 7)
    want = torch.tensor([[0, 2, 4, 6, 14, 16, 18, 20, 28, 30, 32, 34]])
    assert torch.equal(token_index(pixels, 2), want)


def test_nothing_outlives_a_failed_sd3_run(models):
    model = models["medium"]
    dm = model.model.diffusion_model
    pos, neg = conds()
    before = stock(model, pos, neg, latent(), seed=6, cfg=4.5, scheduler="simple")
    hooks_before = hook_state(model.model)

    def interrupt(step, x0, x, total):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        asyn(model, pos, neg, latent(), seed=6, cfg=4.5, scheduler="simple", schedule=fixed_masks(1, SIZE, SIZE),
             callback=interrupt)
    comfy.model_management.interrupt_current_processing(False)
    assert hook_state(model.model) == hooks_before
    assert not any(name in vars(block.x_block) for block in dm.joint_blocks for name in SWAPPED)
    assert torch.equal(stock(model, pos, neg, latent(), seed=6, cfg=4.5, scheduler="simple"), before)


def test_a_method_another_pack_swapped_in_is_restored(models):
    """An instance attribute some other code set on a block is put back, not deleted."""
    block = models["sd3"].model.diffusion_model.joint_blocks[1].x_block
    theirs = block.pre_attention
    block.pre_attention = theirs  # now an instance attribute
    try:
        with PerTokenTimestepsMMDiT(models["sd3"].model.diffusion_model):
            assert block.pre_attention is not theirs
        assert vars(block)["pre_attention"] is theirs
    finally:
        del block.pre_attention


def test_sampler_custom_advanced_on_sd3(models, pack_nodes):
    """CFGGuider, a drawn-mask schedule and the Asynchronous Sampler through SamplerCustomAdvanced."""
    custom = importlib.import_module("comfy_extras.nodes_custom_sampler")
    model = models["large"]
    pos, neg = conds()
    sigmas = custom.BasicScheduler.execute(model, "simple", 4, 1.0).args[0]
    noise = custom.RandomNoise.execute(5).args[0]
    guider = custom.CFGGuider.execute(model, pos, neg, 4.5).args[0]
    lat = {"samples": latent()}
    plain = custom.SamplerCustomAdvanced.execute(noise, guider, custom.KSamplerSelect.execute("euler").args[0], sigmas,
                                                 lat).args[0]["samples"]
    sync = pack_nodes.AsynDMSampler.execute("euler", "", 0.7, "bin", 1.0, "dynamic", 0.0, False).args[0]
    assert torch.equal(custom.SamplerCustomAdvanced.execute(noise, guider, sync, sigmas, lat).args[0]["samples"], plain)
    masked = pack_nodes.AsynDMSampler.execute("euler", "", 0.7, "bin", 1.0, "dynamic", 0.0, False,
                                              fixed_masks(1, SIZE, SIZE)).args[0]
    out = custom.SamplerCustomAdvanced.execute(noise, guider, masked, sigmas, lat).args[0]["samples"]
    assert torch.isfinite(out).all() and rel_err(out, plain) > 1e-3


def test_the_node_samples_sd3_with_a_drawn_mask_and_shows_the_strip(models, pack_nodes):
    model = models["medium"]
    pos, neg = conds()
    out = pack_nodes.AsynDMKSampler.execute(model, pos, neg, {"samples": latent(12, 20)}, 3, 4, 4.5, "dpmpp_2m",
                                            "simple", 1.0, "", 0.7, "bin", 1.0, "dynamic", 0.0, False,
                                            fixed_masks(1, 12, 20))
    samples, strip = out.args[0]["samples"], out.args[1]
    assert samples.shape == (1, 16, 12, 20) and torch.isfinite(samples).all()
    assert strip.ndim == 4 and strip.shape[-1] == 3 and float(strip.std()) > 0
