"""The asynchronous sampler with float16 and bfloat16 models on the CPU.

How the models are made: as ComfyUI does for a checkpoint, the model config's inference dtype is
set (``model_config.set_inference_dtype(dtype, manual_cast_dtype)``) before ``get_model``, so the
UNet is built with that dtype's weights (``unet_config["dtype"]``) and ComfyUI's ops pick plain
or manual-cast layers from it; ``BaseModel.apply_model`` then casts the latent and the context to
``get_dtype()`` and returns float32. Weights come from tests/model_factory.py's seeded filler; the
float32 reference gets the *same* rounded weights (copied from the low-precision model), so the
comparison measures arithmetic precision only, not weight rounding.

Tolerance: the error of a chain of rounded float operations grows with the dtype's machine epsilon
(bfloat16: 2^-7 = 7.8e-3, float16: 2^-10 = 9.8e-4). Measured on these models (4 steps of a
3-level UNet, 16x16 latent), the relative L2 error against float32 is about 2.5-3 x eps in both
dtypes (bfloat16 2.2e-2, float16 2.9e-3), the same multiple, as rounding error should be. The
test allows 8 x eps (bfloat16 6.25e-2, float16 7.8e-3): about 3x headroom for other CPUs' kernels,
and still tight enough to catch a real precision bug (a map or embedding computed in the low
dtype and then compared or mixed in at the wrong scale gives errors of order 1e-1 and more).
Manual cast (float16 weights computed in float32) is only weight rounding, so it must agree to
well below eps. And the precision error must stay small beside what the schedule itself changes
(a fixed-mask schedule moves the result by about 0.28 relative), so the asynchronous effect is
not lost in the noise of the low dtype.
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.supported_models
import pytest
import torch

from asyndm.comfy_adapter.sampler import AsynSampler
from asyndm.comfy_adapter.tokens import KEY as TOKENS_KEY
from asyndm.comfy_adapter.tokens import PromptTokens
from asyndm.schedule_spec import AsynSchedule
from tests import model_factory as mf

EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
SIZE = 16
STEPS = 4


def build(dtype: torch.dtype, manual_cast: torch.dtype | None = None, *, channels: int = 64):
    """An SD1.5-shaped model whose config says `dtype` (and optionally computes in `manual_cast`)."""
    unet = mf._unet_config(channels, 768, False)
    config = comfy.supported_models.SD15(unet)
    config.unet_config["num_heads"] = 4
    config.unet_config["num_head_channels"] = -1
    config.set_inference_dtype(dtype, manual_cast)
    return mf._patcher(config.get_model({}, ""), 0)


def float32_twin(low):
    """A float32 model holding exactly the low-precision model's (rounded) weights."""
    twin = build(torch.float32)
    with torch.no_grad():
        low_params = dict(low.model.named_parameters())
        for name, p in twin.model.named_parameters():
            p.copy_(low_params[name].float())
    return twin


def fixed_mask() -> AsynSchedule:
    masks = torch.zeros(1, 1, SIZE, SIZE)
    masks[..., : SIZE // 2, :] = 1.0
    return AsynSchedule(curve="bin", k=(0.8,), mask_source="masks", masks=masks)


def key_word_schedule() -> AsynSchedule:
    return AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",), dynamic=True)


def with_tokens(cond: list) -> list:
    """Attach a prompt's tokens ("a rabbit": BOS, a, rabbit, EOS...) so key words can be located."""
    tokens = PromptTokens("a rabbit", [[49406, 320, 10274] + [49407] * 74], {"a": [320], "rabbit": [10274]})
    return [[c[0], {**c[1], TOKENS_KEY: tokens}] for c in cond]


def asyn(model, pos, neg, schedule, *, seed=3, sampler="euler"):
    latent = torch.zeros(1, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.KSampler(model, steps=STEPS, device=model.load_device, sampler=sampler,
                                     scheduler="normal", denoise=1.0, model_options=model.model_options).sigmas
    return comfy.sample.sample_custom(model, noise, 4.0, AsynSampler(sampler, schedule), sigmas, pos, neg, latent,
                                      seed=seed)


def stock(model, pos, neg, *, seed=3, sampler="euler"):
    latent = torch.zeros(1, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, STEPS, 4.0, sampler, "normal", pos, neg, latent, seed=seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def pair(request):
    dtype = request.param
    low = build(dtype)
    return dtype, low, float32_twin(low)


@pytest.fixture(scope="module")
def conds():
    model = build(torch.float32, channels=32)  # only its context width matters
    return with_tokens(mf.make_conditioning(model, seed=1)), mf.make_conditioning(model, seed=2)


def test_the_model_really_runs_in_the_low_dtype(pair):
    dtype, low, _ = pair
    assert low.model.get_dtype() == dtype and low.model.manual_cast_dtype is None
    assert {p.dtype for p in low.model.diffusion_model.parameters()} == {dtype}


@pytest.mark.parametrize("which", ["constant map", "fixed mask"])
def test_low_precision_agrees_with_float32(pair, conds, which):
    dtype, low, f32 = pair
    pos, neg = conds
    schedule = None if which == "constant map" else fixed_mask()
    a = asyn(low, pos, neg, schedule)
    b = asyn(f32, pos, neg, schedule)
    assert a.dtype == torch.float32 and torch.isfinite(a).all(), "NaN or infinity in the low-precision result"
    err = rel(a, b)
    assert err < 8 * EPS[dtype], f"{dtype}: relative error {err:.2e} > 8 eps = {8 * EPS[dtype]:.2e}"
    if schedule is not None:  # the asynchronous effect is far above the precision noise
        effect = rel(b, asyn(f32, pos, neg, None))
        assert effect > 0.05 and err < effect / 4, (err, effect)


def test_constant_map_equals_the_ksampler_in_the_low_dtype(pair, conds):
    """Same dtype, same model: the asynchronous path with one timestep per image is ComfyUI's own."""
    _, low, _ = pair
    pos, neg = conds
    assert rel(asyn(low, pos, neg, None), stock(low, pos, neg)) < 1e-5


def test_dpmpp_2m_and_dynamic_key_words_stay_finite(pair, conds):
    """Attention-driven masks can flip at threshold ties between dtypes, so only finiteness is checked
    for them; the fixed mask agrees within the tolerance with the second-order rule too."""
    dtype, low, f32 = pair
    sampler = "dpmpp_2m"
    pos, neg = conds
    dynamic = asyn(low, pos, neg, key_word_schedule(), sampler=sampler)
    assert torch.isfinite(dynamic).all()
    a = asyn(low, pos, neg, fixed_mask(), sampler=sampler)
    b = asyn(f32, pos, neg, fixed_mask(), sampler=sampler)
    assert torch.isfinite(a).all() and rel(a, b) < 8 * EPS[dtype], rel(a, b)


def test_manual_cast_float16_weights_computed_in_float32(conds):
    """ComfyUI's manual cast (weights stored in float16, layers computed in float32)."""
    pos, neg = conds
    low = build(torch.float16, torch.float32)
    assert low.model.manual_cast_dtype == torch.float32
    assert {p.dtype for p in low.model.diffusion_model.parameters()} == {torch.float16}
    f32 = float32_twin(low)
    for schedule in (None, fixed_mask()):
        a, b = asyn(low, pos, neg, schedule), asyn(f32, pos, neg, schedule)
        assert torch.isfinite(a).all() and rel(a, b) < EPS[torch.float16], rel(a, b)
