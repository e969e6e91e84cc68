"""AuraFlow (comfy.ldm.aura.mmdit.MMDiT): per-token timesteps and key words through its family adapter.

The models are random-weight instances of ComfyUI's own AuraFlow config and MMDiT class
(tests/factory_auraflow.py: width 64, joint blocks then single blocks), so every block forward the
adapter swaps and every layer it hooks is ComfyUI's code. Key-word columns come from ComfyUI's
own AuraT5Tokenizer (Pile-T5-XL SentencePiece); the Pile-T5-XL encoder is too large to build here,
so the text context is random, of the exact length that tokenizer gives.
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.samplers
import comfy.text_encoders.aura_t5
import pytest
import torch

from asyndm.comfy_adapter.errors import UnsupportedModelError
from asyndm.comfy_adapter.families import time_adapter
from asyndm.comfy_adapter.families.auraflow import PerTokenTimestepsAuraFlow
from asyndm.comfy_adapter.sampler import AsynSampler, patch_constant
from asyndm.comfy_adapter.tokens import KEY, prompt_tokens
from asyndm.masks import item_masks
from asyndm.schedule_spec import AsynSchedule
from asyndm.schedules import timestep_maps
from asyndm.sigma_map import state_to_sigma
from tests.factory_auraflow import build_auraflow, make_auraflow_conditioning
from tests.inprocess.sampling import SAME_AS_KSAMPLER, TokenTimesteps, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import TokenizerOnly

SIZE = 16  # latent 16x16 -> 8x8 tokens
PROMPT = "a photo of a rabbit wearing sunglasses, next to a teddy bear"
REGISTERS = 8


@pytest.fixture(scope="module")
def model():
    return build_auraflow()


@pytest.fixture(scope="module")
def aura_tokens():
    return prompt_tokens(TokenizerOnly(comfy.text_encoders.aura_t5.AuraT5Tokenizer(), ()), PROMPT)


def conds():
    return make_auraflow_conditioning(seed=1), make_auraflow_conditioning(seed=2)


def latent(h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.zeros(1, 4, h, w)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("cfg", [1.0, 3.5])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_no_key_pixels_is_the_ksampler_bit_for_bit(model, sampler, cfg, case):
    pos, neg = conds()
    kw = dict(seed=4, cfg=cfg, sampler=sampler, scheduler="simple")
    a = stock(model, pos, neg, latent(), **kw)
    b = asyn(model, pos, neg, latent(), schedule=SAME_AS_KSAMPLER[case](1, SIZE, SIZE), **kw)
    assert torch.equal(a, b), rel_err(b, a)


def test_the_registry_picks_the_auraflow_adapter(model):
    adapter = time_adapter(model.model.diffusion_model)
    assert isinstance(adapter, PerTokenTimestepsAuraFlow) and adapter.family == "AuraFlow"
    assert adapter.patch_size == 2 and adapter.registers == REGISTERS


def one_map(t: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([t]), torch.zeros(1, SIZE, SIZE, dtype=torch.long)


def test_the_per_token_blocks_compute_what_the_stock_blocks_do(model):
    """Every image token mapped to the forward's own t: the swapped block forwards and the final
    modulation (ComfyUI's arithmetic redone with per-token modulation) give the stock forward."""
    dm = model.model.diffusion_model
    x = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    context = conds()[0][0][0].expand(2, -1, -1)
    t = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        want = dm(x, t, context=context)
        with PerTokenTimestepsAuraFlow(dm) as adapter:
            adapter.set_map(None, *one_map(0.7), rows=2)
            got = dm(x, t, context=context)
            fired = list(adapter._fired)
            adapter.set_map(None)
            plain = dm(x, t, context=context)
    assert fired == [1] * (len(dm.double_layers) + len(dm.single_layers) + 1) and adapter.table_builds == 1
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rel_err(got, want)
    assert torch.equal(plain, want)  # no map set: the originals run


class Inputs:
    """The inputs of some layers at one forward (the first of each), by name."""

    def __init__(self, layers: dict[str, torch.nn.Module]) -> None:
        self.layers = layers
        self.seen: dict[str, torch.Tensor] = {}

    def __enter__(self):
        self.handles = [layer.register_forward_pre_hook(self._keep(name)) for name, layer in self.layers.items()]
        return self

    def _keep(self, name):
        def hook(_module, args):
            self.seen.setdefault(name, args[0].detach().clone())
        return hook

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def split_map() -> torch.Tensor:
    inverse = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    inverse[..., SIZE // 2:] = 1
    return inverse


LEFT = (torch.arange((SIZE // 2) ** 2) % (SIZE // 2)) < SIZE // 4  # image tokens of the left half


@pytest.mark.parametrize("first", ["joint", "single"])
def test_each_image_token_is_modulated_at_its_own_timestep(first):
    """Left-half tokens are modulated exactly as the stock model at t_left, right-half tokens at
    t_right; the text and the registers as the stock model at the carrier timestep. Seen at the
    first block's attention input (the tokens there do not depend on the timestep): a joint block's
    image and text projections, or, in a model with single blocks only, [registers, text, image]."""
    model = build_auraflow(n_double=2 if first == "joint" else 0)
    dm = model.model.diffusion_model
    layers = ({"image": dm.double_layers[0].attn.w2q, "text": dm.double_layers[0].attn.w1q} if first == "joint"
              else {"all": dm.single_layers[0].attn.w1q})
    x = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    context = conds()[0][0][0]
    t_left, t_right, carrier = 0.25, 0.9, 0.5
    stock_in = {}
    for t in (t_left, t_right, carrier):
        with Inputs(layers) as rec, torch.no_grad():
            dm(x, torch.tensor([t]), context=context)
        stock_in[t] = rec.seen
    with PerTokenTimestepsAuraFlow(dm) as adapter, Inputs(layers) as rec, torch.no_grad():
        adapter.set_map(None, unique=torch.tensor([t_left, t_right]), inverse=split_map(), rows=1)
        dm(x, torch.tensor([carrier]), context=context)
        adapter.set_map(None)
    text = REGISTERS + context.shape[1]
    if first == "joint":
        image, text_in, want_image = rec.seen["image"], rec.seen["text"], {t: s["image"] for t, s in stock_in.items()}
        assert text_in.shape[1] == text
        assert torch.equal(text_in, stock_in[carrier]["text"])
    else:
        image, want_image = rec.seen["all"][:, text:], {t: s["all"][:, text:] for t, s in stock_in.items()}
        assert torch.equal(rec.seen["all"][:, :text], stock_in[carrier]["all"][:, :text])
    assert image.shape[1] == LEFT.numel()
    for mask, t in ((LEFT, t_left), (~LEFT, t_right)):
        assert torch.allclose(image[:, mask], want_image[t][:, mask], rtol=1e-5, atol=1e-6), t
        assert not torch.allclose(image[:, mask], want_image[carrier][:, mask], rtol=1e-3, atol=1e-4), t


def test_the_final_modulation_is_per_token(model):
    """The final linear's input is x modulated per token by the stock modF at each token's own
    timestep (x: what the last block hands on, whatever the timesteps before)."""
    dm = model.model.diffusion_model
    x = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    context = conds()[0][0][0]
    t_left, t_right, carrier = 0.2, 0.8, 0.5
    kept = {}
    handle = dm.single_layers[-1].register_forward_hook(lambda _m, _a, out: kept.__setitem__("x", out.detach().clone()))
    try:
        with PerTokenTimestepsAuraFlow(dm) as adapter, Inputs({"final": dm.final_linear}) as rec, torch.no_grad():
            adapter.set_map(None, unique=torch.tensor([t_left, t_right]), inverse=split_map(), rows=1)
            dm(x, torch.tensor([carrier]), context=context)
            adapter.set_map(None)
    finally:
        handle.remove()
    image = kept["x"][:, REGISTERS + context.shape[1]:]
    got = rec.seen["final"]
    for mask, t in ((LEFT, t_left), (~LEFT, t_right)):
        with torch.no_grad():
            shift, scale = dm.modF(dm.t_embedder(torch.tensor([t]), torch.float32)).chunk(2, dim=1)
        want = image * (1 + scale[:, None]) + shift[:, None]
        assert torch.allclose(got[:, mask], want[:, mask], rtol=1e-5, atol=1e-6), t


def test_a_drawn_mask_reaches_the_transformer_as_the_schedules_token_map(model, monkeypatch):
    pos, neg = conds()
    steps = 6
    schedule = fixed_masks(1, SIZE, SIZE)  # top half, bin, k = 0.8
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsAuraFlow)
    try:
        a = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=3.5, scheduler="simple", schedule=schedule)
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
    sync = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=3.5, scheduler="simple")
    assert torch.isfinite(a).all() and rel_err(a, sync) > 1e-3


def test_nothing_outlives_a_failed_auraflow_run(model):
    dm = model.model.diffusion_model
    pos, neg = conds()
    before = stock(model, pos, neg, latent(), seed=6, cfg=3.5, scheduler="simple")
    hooks_before = hook_state(model.model)

    def interrupt(step, x0, x, total):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        asyn(model, pos, neg, latent(), seed=6, cfg=3.5, scheduler="simple", schedule=fixed_masks(1, SIZE, SIZE),
             callback=interrupt)
    comfy.model_management.interrupt_current_processing(False)
    assert hook_state(model.model) == hooks_before
    assert not any("forward" in vars(block) for block in [*dm.double_layers, *dm.single_layers])
    assert torch.equal(stock(model, pos, neg, latent(), seed=6, cfg=3.5, scheduler="simple"), before)


def test_a_forward_another_pack_swapped_in_is_restored(model):
    block = model.model.diffusion_model.single_layers[0]
    theirs = block.forward
    block.forward = theirs  # now an instance attribute
    try:
        with PerTokenTimestepsAuraFlow(model.model.diffusion_model):
            assert block.forward is not theirs
        assert vars(block)["forward"] is theirs
    finally:
        del block.forward


def test_odd_sizes_skip_layer_guidance_and_the_node(model, pack_nodes):
    """A 9x11 latent (padded patches) through the Asynchronous KSampler node with a drawn mask, and
    ComfyUI's SkipLayerGuidanceDiT (a joint block replaced by the identity in an extra pass):
    KSampler's result with no key pixels, a different finite one with the mask."""
    import importlib

    pos, neg = conds()
    lat = {"samples": latent(9, 11)}
    out = pack_nodes.AsynDMKSampler.execute(model, pos, neg, lat, 3, 4, 3.5, "dpmpp_2m", "simple", 1.0, "", 0.7,
                                            "bin", 1.0, "dynamic", 0.0, False, fixed_masks(1, 9, 11))
    samples, strip = out.args[0]["samples"], out.args[1]
    assert samples.shape == (1, 4, 9, 11) and torch.isfinite(samples).all() and float(strip.std()) > 0
    slg = importlib.import_module("comfy_extras.nodes_slg").SkipLayerGuidanceDiT
    guided = slg.execute(model, 3.0, 0.0, 1.0, rescaling_scale=0.0, double_layers="1").args[0]
    kw = dict(seed=2, cfg=3.5, scheduler="simple", steps=4)
    plain = stock(guided, pos, neg, latent(), **kw)
    assert rel_err(plain, stock(model, pos, neg, latent(), **kw)) > 1e-4  # the guidance did something
    assert torch.equal(asyn(guided, pos, neg, latent(), schedule=SAME_AS_KSAMPLER["empty mask"](1, SIZE, SIZE), **kw),
                       plain)
    masked = asyn(guided, pos, neg, latent(), schedule=fixed_masks(1, SIZE, SIZE), **kw)
    assert torch.isfinite(masked).all() and rel_err(masked, plain) > 1e-3


def test_what_auraflow_cannot_do_is_refused_by_name(model):
    with pytest.raises(UnsupportedModelError, match="AuraFlow models made of joint blocks only"):
        time_adapter(build_auraflow(n_double=2, n_single=0).model.diffusion_model)
    pos, neg = conds()  # ancestral samplers run on flow models (ComfyUI's own RF variant, per track)
    plain = stock(model, pos, neg, latent(), cfg=1.0, scheduler="simple", sampler="euler_ancestral")
    out = asyn(model, pos, neg, latent(), schedule=fixed_masks(1, SIZE, SIZE), cfg=1.0, scheduler="simple",
               sampler="euler_ancestral")
    assert torch.isfinite(out).all() and rel_err(out, plain) > 1e-3


def test_auraflow_key_words_are_pile_t5_columns_after_the_registers(model, aura_tokens):
    """The Pile-T5-XL stream (SentencePiece, no start token, padded to 256 with 1): the context the
    conditioning holds; in the model's joint sequence the 8 registers come first."""
    stream = aura_tokens.streams["pile_t5xl"]
    adapter = PerTokenTimestepsAuraFlow(model.model.diffusion_model)
    layout = adapter.text_layout(aura_tokens)
    assert aura_tokens.context_length(layout) == len(stream.chunks[0]) == 256
    assert stream.chunks[0][-1] == 1  # padding
    # "a", "photo", "of", "a", then "rabbit" (two pieces): columns 4 and 5
    cols = aura_tokens.columns("rabbit", layout)
    assert cols == [4, 5] and [stream.chunks[0][c] for c in cols] == stream.word_ids["rabbit"]
    bear = aura_tokens.columns("teddy bear", layout)
    assert [stream.chunks[0][c] for c in bear] == stream.word_ids["teddy"] + stream.word_ids["bear"]
    observer = adapter.attention_observer((SIZE, SIZE), 1, {"u": [cols, bear]})
    assert observer.columns_by_uuid == {"u": [[c + REGISTERS for c in cols], [c + REGISTERS for c in bear]]}


class AttentionCalls:
    """An attention override (chained after the pack's observer) that keeps every call's q and k."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, func, *args, **kwargs):
        self.calls.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **kwargs)


def test_auraflow_dynamic_masks_follow_the_joint_attention(model, aura_tokens, monkeypatch):
    """The key pixels of step 1 are the threshold of the step-0 attention of the image tokens to the
    word's Pile-T5 tokens (softmax over [registers, text]), recomputed here from the model's own q
    and k; the transformer then sees two timesteps, and the result differs from synchronous sampling."""
    context_len = aura_tokens.context_length(["pile_t5xl"])
    pos = make_auraflow_conditioning(tokens=context_len, seed=1)
    pos[0][1][KEY] = aura_tokens
    calls = AttentionCalls()
    spy = model.clone()
    spy.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = calls
    made = []
    init = AsynSampler.__init__
    monkeypatch.setattr(AsynSampler, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsAuraFlow)
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",), threshold=1.0)
    try:
        out = asyn(spy, pos, pos, latent(), seed=3, steps=4, cfg=1.0, scheduler="simple", schedule=schedule)
    finally:
        rec.handle.remove()
    dm = model.model.diffusion_model
    per_forward = len(dm.double_layers) + len(dm.single_layers)
    assert len(calls.calls) == 4 * per_forward  # cfg 1: one forward per step
    text = REGISTERS + context_len
    cols = [REGISTERS + c for c in aura_tokens.columns("rabbit", ["pile_t5xl"])]
    image = (SIZE // 2) ** 2
    maps = []
    for q, k in calls.calls[:per_forward]:
        assert q.shape[2] == text + image
        logits = q[:, :, text:].double() @ k[:, :, :text].double().transpose(-1, -2)
        probs = torch.softmax(logits / math.sqrt(q.shape[-1]), dim=-1).mean(dim=1)
        maps.append(probs[..., cols].mean(-1))
    attn = torch.stack(maps).mean(0)[..., None].float()
    masks = item_masks(attn, [0.7], threshold=1.0, size=(SIZE, SIZE), grid=(SIZE // 2, SIZE // 2))
    want = patch_constant(masks[:, 0] * 0.7, 2)
    got = made[-1].record.priorities[1]
    assert 0 < int((want > 0).sum()) < SIZE * SIZE
    assert torch.equal(got, want)
    assert max(len(step.unique()) for step in rec.steps) == 2
    sync = asyn(model, pos, pos, latent(), seed=3, steps=4, cfg=1.0, scheduler="simple")
    assert torch.isfinite(out).all() and rel_err(out, sync) > 1e-3
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
