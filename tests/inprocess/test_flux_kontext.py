"""Flux Kontext: reference latents (ComfyUI's ReferenceLatent node) with per-token timesteps.

Kontext is ComfyUI's Flux class (Flux dev's config) given ``reference_latents`` in the
conditioning: the model appends the reference images' tokens after the image tokens, in every
block, and cuts them off the output. Their modulation is the row's own (the carrier timestep, as
ComfyUI computes it): never a key curve. The models are random-weight instances of ComfyUI's
own Flux classes (tests/model_factory.py build_flux).
"""

from __future__ import annotations

import importlib
import math

import comfy.model_management
import comfy.samplers
import pytest
import torch

from asyndm.comfy_adapter.families.flux import PerTokenTimesteps
from asyndm.comfy_adapter.sampler import AsynSampler, patch_constant
from asyndm.comfy_adapter.tokens import KEY
from asyndm.masks import item_masks
from asyndm.schedule_spec import AsynSchedule
from asyndm.schedules import timestep_maps
from asyndm.sigma_map import state_to_sigma
from tests.inprocess.sampling import SAME_AS_KSAMPLER, TokenTimesteps, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import build_flux, make_flux_conditioning

SIZE = 16  # latent 16x16 -> 8x8 image tokens
REF_HW = (12, 10)  # a reference of another size: 6x5 = 30 reference tokens
PROMPT = "a photo of a rabbit wearing sunglasses, next to a teddy bear"


@pytest.fixture(scope="module")
def model():
    return build_flux(True)


def reference(seed: int, hw: tuple[int, int] = REF_HW) -> torch.Tensor:
    return torch.randn(1, 16, *hw, generator=torch.Generator().manual_seed(seed))


def kontext(cond, *refs: torch.Tensor, method: str | None = None):
    """What a Kontext workflow hands the sampler: ReferenceLatent once per image (and the method node)."""
    nodes = importlib.import_module("comfy_extras.nodes_edit_model")
    for ref in refs:
        cond = nodes.ReferenceLatent.execute(cond, {"samples": ref}).args[0]
    if method is not None:
        flux = importlib.import_module("comfy_extras.nodes_flux")
        cond = flux.FluxKontextMultiReferenceLatentMethod.execute(cond, method).args[0]
    return cond


def conds(tokens: int = 12, method: str | None = None, refs: int = 1):
    pos = kontext(make_flux_conditioning(tokens=tokens, seed=1), *[reference(10 + i) for i in range(refs)],
                  method=method)
    neg = kontext(make_flux_conditioning(tokens=tokens, seed=2), *[reference(10 + i) for i in range(refs)],
                  method=method)
    return pos, neg


def latent(h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.zeros(1, 16, h, w)


class ForwardInputs:
    """The reference tokens really are in the sequence: each forward's total image-stream length."""

    def __init__(self, dm) -> None:
        self.lengths: list[int] = []
        self.handle = dm.double_blocks[0].register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, _module, _args, kwargs) -> None:
        self.lengths.append(int(kwargs["img"].shape[1]))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_kontext_without_key_items_is_the_ksampler_bit_for_bit(model, sampler, cfg, case):
    pos, neg = conds()
    kw = dict(seed=4, cfg=cfg, sampler=sampler, scheduler="simple")
    seen = ForwardInputs(model.model.diffusion_model)
    try:
        a = stock(model, pos, neg, latent(), **kw)
        b = asyn(model, pos, neg, latent(), schedule=SAME_AS_KSAMPLER[case](1, SIZE, SIZE), **kw)
    finally:
        seen.handle.remove()
    assert set(seen.lengths) == {(SIZE // 2) ** 2 + math.prod(s // 2 for s in REF_HW)}  # image + reference tokens
    assert torch.equal(a, b), rel_err(b, a)


def forward_kwargs(batch: int, refs: list[torch.Tensor], method: str | None = None) -> dict:
    pos, _ = conds()
    context, extra = pos[0]
    kwargs = {"context": context.expand(batch, -1, -1), "y": extra["pooled_output"].expand(batch, -1),
              "guidance": torch.full((batch,), 3.5), "ref_latents": [r.expand(batch, -1, -1, -1) for r in refs]}
    if method is not None:
        kwargs["ref_latents_method"] = method
    return kwargs


@pytest.mark.parametrize("method", [None, "index", "uxo"])
def test_a_constant_map_is_the_stock_kontext_forward(model, method):
    """Every image token mapped to the forward's own t, with one or two references: the stock output."""
    dm = model.model.diffusion_model
    x = torch.randn(2, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    refs = [reference(10), reference(11, (8, 16))]
    kwargs = forward_kwargs(2, refs, method)
    t = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        want = dm(x, t, **kwargs)
        with PerTokenTimesteps(dm) as adapter:
            adapter.set_map(None, unique=torch.tensor([0.7]), inverse=torch.zeros(1, SIZE, SIZE, dtype=torch.long),
                            rows=2)
            got = dm(x, t, **kwargs)
            lengths = adapter._lengths
            adapter.set_map(None)
    assert lengths == (kwargs["context"].shape[1], (SIZE // 2) ** 2, 30 + 32)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rel_err(got, want)


class FirstBlockQkvInputs:
    """The input of block 0's image qkv projection: modulate(img_norm1(tokens)) for [image, refs]
    (the tokens come from img_in and do not depend on the timestep), so it shows each token's modulation."""

    def __init__(self, dm) -> None:
        self.layer = dm.double_blocks[0].img_attn.qkv
        self.seen: torch.Tensor | None = None

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(self._keep)
        return self

    def _keep(self, _module, args, _out) -> None:
        self.seen = args[0].detach().clone()

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_image_tokens_take_their_own_timestep_and_references_the_carriers(model):
    dm = model.model.diffusion_model
    x = torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(1, [reference(10)])
    t_left, t_right, carrier = 0.25, 0.9, 0.5
    stock_in = {}
    for t in (t_left, t_right, carrier):
        with FirstBlockQkvInputs(dm) as rec, torch.no_grad():
            dm(x, torch.tensor([t]), **kwargs)
        stock_in[t] = rec.seen
    inverse = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    inverse[..., SIZE // 2:] = 1
    with PerTokenTimesteps(dm) as adapter, FirstBlockQkvInputs(dm) as rec, torch.no_grad():
        adapter.set_map(None, unique=torch.tensor([t_left, t_right]), inverse=inverse, rows=1)
        dm(x, torch.tensor([carrier]), **kwargs)
        adapter.set_map(None)
    image = (SIZE // 2) ** 2
    got = rec.seen
    assert got.shape[1] == image + 30
    left = (torch.arange(image) % (SIZE // 2)) < SIZE // 4
    for mask, t in ((left, t_left), (~left, t_right)):
        assert torch.allclose(got[:, :image][:, mask], stock_in[t][:, :image][:, mask], rtol=1e-5, atol=1e-6), t
        assert not torch.allclose(got[:, :image][:, mask], stock_in[carrier][:, :image][:, mask], rtol=1e-3, atol=1e-4)
    assert torch.equal(got[:, image:], stock_in[carrier][:, image:])  # reference tokens: the carrier's modulation


def test_a_drawn_mask_reaches_kontext_as_the_schedules_token_map(model, monkeypatch):
    pos, neg = conds()
    steps = 5
    schedule = fixed_masks(1, SIZE, SIZE)  # top half, bin, k = 0.8
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimesteps)
    try:
        a = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=2.5, scheduler="simple", schedule=schedule)
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
        want = ms.timestep(sigma.flatten()).view(1, SIZE, SIZE)[:, ::2, ::2].reshape(1, -1)
        assert torch.equal(seen, want.expand(2, -1).float()), f"step {i}"
        distinct = max(distinct, len(seen[0].unique()))
    assert distinct == 2, "the transformer never saw two timesteps"
    sync = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=2.5, scheduler="simple")
    assert torch.isfinite(a).all() and rel_err(a, sync) > 1e-3


def test_nothing_outlives_a_failed_kontext_run(model):
    pos, neg = conds()
    before = stock(model, pos, neg, latent(), seed=6, cfg=2.5, scheduler="simple")
    hooks_before = hook_state(model.model)

    def interrupt(step, x0, x, total):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        asyn(model, pos, neg, latent(), seed=6, cfg=2.5, scheduler="simple", schedule=fixed_masks(1, SIZE, SIZE),
             callback=interrupt)
    comfy.model_management.interrupt_current_processing(False)
    assert hook_state(model.model) == hooks_before
    assert torch.equal(stock(model, pos, neg, latent(), seed=6, cfg=2.5, scheduler="simple"), before)


class AttentionCalls:
    """An attention override (chained after the pack's observer) that keeps every call's q and k."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, func, *args, **kwargs):
        self.calls.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **kwargs)


def test_kontext_key_words_follow_the_image_to_text_attention(model, monkeypatch):
    """Sequence [text, image, references]: the masks of step 1 are the step-0 attention of the image
    queries (not the references') to the word's T5 keys, recomputed here from the model's own q, k."""
    import comfy.text_encoders.flux

    from asyndm.comfy_adapter.tokens import prompt_tokens
    from tests.model_factory import TokenizerOnly

    tokens = prompt_tokens(TokenizerOnly(comfy.text_encoders.flux.FluxTokenizer(), ("l", "t5xxl")), PROMPT)
    text = tokens.context_length(["t5xxl"])
    pos, _ = conds(tokens=text)
    pos[0][1][KEY] = tokens
    calls = AttentionCalls()
    spy = model.clone()
    spy.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = calls
    made = []
    init = AsynSampler.__init__
    monkeypatch.setattr(AsynSampler, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimesteps)
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",), threshold=1.0)
    try:
        out = asyn(spy, pos, pos, latent(), seed=3, steps=4, cfg=1.0, scheduler="simple", schedule=schedule)
    finally:
        rec.handle.remove()
    dm = model.model.diffusion_model
    per_forward = len(dm.double_blocks) + len(dm.single_blocks)
    assert len(calls.calls) == 4 * per_forward
    image, refs = (SIZE // 2) ** 2, 30
    assert {q.shape[2] for q, _ in calls.calls} == {text + image + refs}  # [text, image, references]
    cols = tokens.columns("rabbit", ["t5xxl"])
    maps = []
    for q, k in calls.calls[:per_forward]:
        logits = q[:, :, text:text + image].double() @ k[:, :, :text].double().transpose(-1, -2)
        probs = torch.softmax(logits / math.sqrt(q.shape[-1]), dim=-1).mean(dim=1)
        maps.append(probs[..., cols].mean(-1))
    attn = torch.stack(maps).mean(0)[..., None].float()
    masks = item_masks(attn, [0.7], threshold=1.0, size=(SIZE, SIZE), grid=(SIZE // 2, SIZE // 2))
    want = patch_constant(masks[:, 0] * 0.7, 2)
    assert 0 < int((want > 0).sum()) < SIZE * SIZE
    assert torch.equal(made[-1].record.priorities[1], want)
    assert max(len(step.unique()) for step in rec.steps) == 2
    sync = asyn(model, pos, pos, latent(), seed=3, steps=4, cfg=1.0, scheduler="simple")
    assert torch.isfinite(out).all() and rel_err(out, sync) > 1e-3
