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
from torch.utils._python_dispatch import TorchDispatchMode

from asyndm.comfy_adapter.model_wrapper import WRAPPER_KEY
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
    """The asynchronous sampler through sample_custom, sigmas as the KSampler computes them."""
    latent = torch.zeros(1, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.KSampler(model, steps=STEPS, device=model.load_device, sampler=sampler,
                                     scheduler="normal", denoise=1.0, model_options=model.model_options).sigmas
    return comfy.sample.sample_custom(model, noise, 4.0, AsynSampler(sampler, schedule), sigmas, pos, neg, latent,
                                      seed=seed)


def stock(model, pos, neg, *, seed=3, sampler="euler"):
    """ComfyUI's own KSampler path."""
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


SAMPLERS = ["euler", "ddim", "euler_ancestral", "ddpm", "dpmpp_2m"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=list(DTYPES))
def model_in_dtype(request):
    return build(DTYPES[request.param])


def all_zero_mask() -> AsynSchedule:
    """A key item whose mask covers no pixel: the per-pixel machinery runs, with a single track."""
    return AsynSchedule(curve="bin", k=(0.8,), mask_source="masks", masks=torch.zeros(1, 1, SIZE, SIZE))


class UNetCalls(TorchDispatchMode):
    """Every diffusion-model call of a run: its inputs, every aten op it runs (with the operands'
    shapes and dtypes), and whether the pack's APPLY_MODEL wrapper was on the call."""

    def __init__(self, model) -> None:
        super().__init__()
        self.dm = model.model.diffusion_model
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.ops: list[list[tuple]] = []
        self.wrapped: list[bool] = []
        self._inside = False

    def __enter__(self) -> UNetCalls:
        self.handles = [self.dm.register_forward_pre_hook(self._pre, with_kwargs=True),
                        self.dm.register_forward_hook(self._post)]
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._inside:
            operands = [a for a in (*args, *(kwargs or {}).values()) if torch.is_tensor(a)]
            self.ops[-1].append((str(func), *((tuple(a.shape), a.dtype) for a in operands)))
        return func(*args, **(kwargs or {}))

    def _pre(self, _module, args, kwargs) -> None:
        named = dict(zip(("x", "timesteps"), args, strict=False)) | kwargs
        self.inputs.append({k: v.clone() for k, v in named.items() if torch.is_tensor(v)})
        wrappers = (named.get("transformer_options") or {}).get("wrappers") or {}
        self.wrapped.append(any(WRAPPER_KEY in by_key for by_key in wrappers.values()))
        self.ops.append([])
        self._inside = True

    def _post(self, *_args) -> None:
        self._inside = False


def assert_same_calls(ours: UNetCalls, theirs: UNetCalls) -> None:
    """Same inputs (values, shapes, dtypes) and the same sequence of ops on the same shapes."""
    assert len(ours.inputs) == len(theirs.inputs) > 0
    for i, (a, b) in enumerate(zip(ours.inputs, theirs.inputs, strict=True)):
        assert a.keys() == b.keys(), (i, a.keys(), b.keys())
        for name in a:
            assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, (i, name)
            assert torch.equal(a[name], b[name]), f"call {i}: {name} differs from KSampler's"
        extra = [op for op in ours.ops[i] if op not in theirs.ops[i]][:3]
        assert ours.ops[i] == theirs.ops[i], f"call {i} runs other ops or shapes than KSampler's, e.g. {extra}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_no_key_items_is_the_ksampler_bit_for_bit(model_in_dtype, conds, sampler):
    """No key items: ComfyUI's own sampler runs, with no hook or wrapper of the pack on any call.

    Bit-identical by construction, so on every CPU (any oneDNN ISA) and in every dtype.
    """
    pos, neg = conds
    with UNetCalls(model_in_dtype) as theirs:
        want = stock(model_in_dtype, pos, neg, sampler=sampler)
    with UNetCalls(model_in_dtype) as ours:
        got = asyn(model_in_dtype, pos, neg, None, sampler=sampler)
    assert not any(ours.wrapped), "a synchronous run went through the pack's APPLY_MODEL wrapper"
    assert_same_calls(ours, theirs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_one_shared_track_calls_the_model_as_the_ksampler(model_in_dtype, conds, sampler):
    """The asynchronous machinery with every pixel on one track (a key item whose mask is empty).

    The model must see exactly KSampler's inputs, shapes included: a time embedding built for
    the distinct timesteps (1 row) instead of the CFG batch (2 rows) is the same maths, but GEMM
    kernels choose their blocking by shape (oneDNN's AMX float16 kernels round a 1-row and a 2-row
    product differently), which made this case drift by 1e-4 on AMX CPUs. The per-pixel updates
    repeat the stock samplers' operations, so the whole run is bit-identical.
    """
    pos, neg = conds
    with UNetCalls(model_in_dtype) as theirs:
        want = stock(model_in_dtype, pos, neg, sampler=sampler)
    with UNetCalls(model_in_dtype) as ours:
        got = asyn(model_in_dtype, pos, neg, all_zero_mask(), sampler=sampler)
    assert all(ours.wrapped), "the per-pixel machinery did not run"
    assert_same_calls(ours, theirs)
    assert torch.equal(got, want)


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
