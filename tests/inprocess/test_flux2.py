"""Flux.2: per-token timesteps on its global modulation (ComfyUI's Flux class, global_modulation).

The models are random-weight instances of ComfyUI's own Flux2 config and Flux class
(tests/factory_flux_family.py build_flux2: 1 double and 1 single block, width 64, 128-channel
latents in 1x1 patches, reference latents by index), so everything the adapter hooks is ComfyUI's
code. Flux2.extra_conds left-pads the text to 512 tokens, so every forward has 512 text tokens.
"""

from __future__ import annotations

import importlib

import comfy.model_management
import comfy.samplers
import comfy.text_encoders.flux
import pytest
import torch

from asyndm.comfy_adapter.families import time_adapter
from asyndm.comfy_adapter.families.flux import PerTokenTimestepsFlux2
from asyndm.comfy_adapter.tokens import KEY, UnknownWordError, prompt_tokens
from asyndm.schedule_spec import AsynSchedule
from asyndm.schedules import timestep_maps
from asyndm.sigma_map import state_to_sigma
from tests.factory_flux_family import build_flux2, flux2_tokenizer, make_flux2_conditioning
from tests.inprocess.sampling import SAME_AS_KSAMPLER, TokenTimesteps, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import TokenizerOnly

SIZE = 8  # latent 8x8 (a 128x128 image) -> 64 image tokens
TEXT = 512  # Flux2.extra_conds pads the context on the left to 512 tokens
REF_HW = (6, 4)  # a reference latent of another size: 24 reference tokens


@pytest.fixture(scope="module")
def model():
    return build_flux2()


def reference(seed: int) -> torch.Tensor:
    return torch.randn(1, 128, *REF_HW, generator=torch.Generator().manual_seed(seed))


def conds(edit: bool = False):
    pos, neg = make_flux2_conditioning(seed=1), make_flux2_conditioning(seed=2)
    if edit:  # Flux.2 editing: ReferenceLatent on both, as ComfyUI's workflows do
        nodes = importlib.import_module("comfy_extras.nodes_edit_model")
        pos = nodes.ReferenceLatent.execute(pos, {"samples": reference(10)}).args[0]
        neg = nodes.ReferenceLatent.execute(neg, {"samples": reference(10)}).args[0]
    return pos, neg


def latent() -> torch.Tensor:
    return torch.zeros(1, 128, SIZE, SIZE)


def test_flux2_is_its_own_family_with_1x1_patches(model):
    adapter = time_adapter(model.model.diffusion_model)
    assert isinstance(adapter, PerTokenTimestepsFlux2) and adapter.family == "Flux.2" and adapter.patch_size == 1


@pytest.mark.parametrize("sampler, cfg, edit", [("euler", 1.0, False), ("euler", 3.5, True), ("dpmpp_2m", 1.0, True),
                                                ("dpmpp_2m", 3.5, False)])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_no_key_pixels_is_the_ksampler_bit_for_bit(model, edit, sampler, cfg, case):
    pos, neg = conds(edit)
    kw = dict(seed=4, steps=3, cfg=cfg, sampler=sampler, scheduler="simple")
    a = stock(model, pos, neg, latent(), **kw)
    b = asyn(model, pos, neg, latent(), schedule=SAME_AS_KSAMPLER[case](1, SIZE, SIZE), **kw)
    assert torch.equal(a, b), rel_err(b, a)


def forward_kwargs(batch: int, refs: bool, guidance: bool = True) -> dict:
    pos, _ = conds()
    context = torch.nn.functional.pad(pos[0][0], (0, 0, TEXT - pos[0][0].shape[1], 0))  # as Flux2.extra_conds
    kwargs = {"context": context.expand(batch, -1, -1)}
    if guidance:
        kwargs["guidance"] = torch.full((batch,), 4.0)
    if refs:
        kwargs["ref_latents"] = [reference(10).expand(batch, -1, -1, -1)]
    return kwargs


@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("refs", [False, True])
def test_a_constant_map_is_the_stock_forward(refs, guidance):
    """Every image token mapped to the forward's own t: the stock output. Each global modulation
    runs once per forward and the time table is built once."""
    dm = build_flux2(guidance=guidance).model.diffusion_model
    x = torch.randn(2, 128, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(2, refs, guidance)
    t = torch.tensor([0.6, 0.6])
    with torch.no_grad():
        want = dm(x, t, **kwargs)
        with PerTokenTimestepsFlux2(dm) as adapter:
            adapter.set_map(None, unique=torch.tensor([0.6]), inverse=torch.zeros(1, SIZE, SIZE, dtype=torch.long),
                            rows=2)
            got = dm(x, t, **kwargs)
            fired, lengths = list(adapter._fired), adapter._lengths
            adapter.set_map(None)
            plain = dm(x, t, **kwargs)
    assert fired == [1, 1, 1] and adapter.table_builds == 1
    assert lengths == (TEXT, SIZE * SIZE, 24 if refs else 0)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rel_err(got, want)
    assert torch.equal(plain, want)


class Recorded:
    """Block 0's image qkv input (modulate(norm(img_in tokens)): only the modulation depends on t) and
    the single-stream modulation's output, [text, image, references]."""

    def __init__(self, dm) -> None:
        self.dm = dm
        self.qkv: torch.Tensor | None = None
        self.single: torch.Tensor | None = None

    def __enter__(self):
        self.handles = [
            self.dm.double_blocks[0].img_attn.qkv.register_forward_hook(self._qkv),
            self.dm.single_stream_modulation.register_forward_hook(self._single),
        ]
        return self

    def _qkv(self, _m, args, _out) -> None:
        self.qkv = args[0].detach().clone()

    def _single(self, _m, _args, out) -> None:
        self.single = torch.cat([out[0].shift, out[0].scale, out[0].gate], dim=-1).detach().clone()

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def test_each_image_token_is_modulated_at_its_own_timestep(model):
    """Left-half tokens as the stock model at t_left, right-half at t_right; text and reference
    tokens keep the carrier's modulation."""
    dm = model.model.diffusion_model
    x = torch.randn(1, 128, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(1, refs=True)
    t_left, t_right, carrier = 0.25, 0.9, 0.5
    stock_rec = {}
    for t in (t_left, t_right, carrier):
        with Recorded(dm) as rec, torch.no_grad():
            dm(x, torch.tensor([t]), **kwargs)
        stock_rec[t] = rec
    inverse = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    inverse[..., SIZE // 2:] = 1
    with PerTokenTimestepsFlux2(dm) as adapter, Recorded(dm) as rec, torch.no_grad():
        adapter.set_map(None, unique=torch.tensor([t_left, t_right]), inverse=inverse, rows=1)
        dm(x, torch.tensor([carrier]), **kwargs)
        adapter.set_map(None)
    image = SIZE * SIZE
    left = (torch.arange(image) % SIZE) < SIZE // 2
    assert rec.qkv.shape[1] == image + 24 and rec.single.shape[1] == TEXT + image + 24
    single_img = rec.single[:, TEXT:TEXT + image]
    for mask, t in ((left, t_left), (~left, t_right)):
        assert torch.allclose(rec.qkv[:, :image][:, mask], stock_rec[t].qkv[:, :image][:, mask], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(rec.qkv[:, :image][:, mask], stock_rec[carrier].qkv[:, :image][:, mask], rtol=1e-3,
                                  atol=1e-4)
        want = stock_rec[t].single.expand(-1, image, -1)
        assert torch.allclose(single_img[:, mask], want[:, mask], rtol=1e-5, atol=1e-6), t
    assert torch.equal(rec.qkv[:, image:], stock_rec[carrier].qkv[:, image:])  # references: the carrier's
    stock_single = stock_rec[carrier].single
    assert torch.equal(rec.single[:, :TEXT], stock_single.expand(-1, TEXT, -1))
    assert torch.equal(rec.single[:, TEXT + image:], stock_single.expand(-1, 24, -1))


def test_a_drawn_mask_reaches_flux2_as_the_schedules_token_map(model, monkeypatch):
    pos, neg = conds(edit=True)
    steps = 4
    schedule = fixed_masks(1, SIZE, SIZE)  # top half, bin, k = 0.8
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsFlux2, patch=1)
    try:
        a = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=3.5, scheduler="simple", schedule=schedule)
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
        want = ms.timestep(sigma.flatten()).view(1, -1)  # 1x1 patches: one token per latent pixel
        assert torch.equal(seen, want.expand(2, -1).float()), f"step {i}"
        distinct = max(distinct, len(seen[0].unique()))
        assert seen[0, -1] == ms.timestep(sigmas[i:i + 1])[0]  # background tokens: the scheduler's own timestep
    assert distinct == 2, "the transformer never saw two timesteps"
    sync = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=3.5, scheduler="simple")
    assert torch.isfinite(a).all() and rel_err(a, sync) > 1e-3


def test_flux2_scheduler_and_the_sampler_node(model, pack_nodes):
    """Flux2Scheduler, BasicGuider (cfg 1, FluxGuidance) and the Asynchronous Sampler through SamplerCustomAdvanced."""
    custom = importlib.import_module("comfy_extras.nodes_custom_sampler")
    flux_nodes = importlib.import_module("comfy_extras.nodes_flux")
    pos, _ = conds(edit=True)
    guided = flux_nodes.FluxGuidance.execute(pos, 2.5).args[0]
    sigmas = flux_nodes.Flux2Scheduler.execute(3, SIZE * 16, SIZE * 16).args[0]
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


def test_nothing_outlives_a_failed_flux2_run(model):
    pos, neg = conds(edit=True)
    before = stock(model, pos, neg, latent(), seed=6, steps=3, cfg=3.5, scheduler="simple")
    hooks_before = hook_state(model.model)

    def interrupt(step, x0, x, total):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        asyn(model, pos, neg, latent(), seed=6, cfg=3.5, scheduler="simple", schedule=fixed_masks(1, SIZE, SIZE),
             callback=interrupt)
    comfy.model_management.interrupt_current_processing(False)
    assert hook_state(model.model) == hooks_before
    assert torch.equal(stock(model, pos, neg, latent(), seed=6, steps=3, cfg=3.5, scheduler="simple"), before)


PROMPT = "a photo of a rabbit next to a teddy bear"


@pytest.fixture()
def flux2_tokens(monkeypatch):
    tokenizer = flux2_tokenizer(monkeypatch)
    return tokenizer, prompt_tokens(TokenizerOnly(tokenizer, ()), PROMPT)


def test_flux2_key_words_are_columns_of_the_left_padded_template(model, flux2_tokens):
    """ComfyUI's Flux2Tokenizer wraps the prompt in its system-prompt template (the encoder keeps all of it) and
    Flux2.extra_conds pads the context on the left to 512: every key word's columns hold its Mistral tokens
    (as the BPE spells it mid-sentence, with the space), at 512 - len(template tokens) + their position."""
    tokenizer, tokens = flux2_tokens
    ids = [t[0] for t in tokenizer.tokenize_with_weights(PROMPT)["mistral3_24b"][0]]
    pad = TEXT - len(ids)
    assert ids[0] == 1 and 3 in ids and pad > 0  # the start token, [INST]; shorter than 512
    layout = PerTokenTimestepsFlux2(model.model.diffusion_model).text_layout(tokens)
    assert tokens.context_length(layout) == TEXT
    hf = tokenizer.mistral3_24b.tokenizer
    for word, text in (("rabbit", " rabbit"), ("teddy bear", " teddy bear"), ("photo", " photo")):
        want = hf(text, add_special_tokens=False)["input_ids"]
        cols = tokens.columns(word, layout)
        assert [ids[c - pad] for c in cols] == want and cols == list(range(cols[0], cols[0] + len(want))), word
        assert cols[0] - pad > ids.index(3), word  # inside [INST] ... [/INST], not the system prompt's
    # the system prompt's own "image" is not in the user's prompt: refused by name
    with pytest.raises(UnknownWordError, match="a, photo, of, rabbit"):
        tokens.columns("image", layout)


@pytest.mark.parametrize("edit", [False, True], ids=["text-to-image", "edit"])
def test_flux2_key_words_sample_asynchronously(model, flux2_tokens, monkeypatch, edit):
    """Key words on Flux.2 (text to image, and edit with reference latents): the masks come from the joint
    attention, the result differs from KSampler's and is finite, and the transformer is given more than one
    distinct timestep over its image tokens."""
    _tokenizer, tokens = flux2_tokens
    pos, neg = conds(edit)
    pos[0][0] = make_flux2_conditioning(tokens=tokens.streams["mistral3_24b"].length, seed=1)[0][0]
    pos[0][1][KEY] = tokens
    kw = dict(seed=7, steps=4, cfg=3.5, scheduler="simple")
    plain = stock(model, pos, neg, latent(), **kw)
    recorded = TokenTimesteps(monkeypatch, model, PerTokenTimestepsFlux2, patch=1)
    try:
        schedule = AsynSchedule(curve="bin", k=(0.7, 0.7), mask_source="attention", words=("rabbit", "teddy bear"))
        got = asyn(model, pos, neg, latent(), schedule=schedule, **kw)
    finally:
        recorded.handle.remove()
    assert torch.isfinite(got).all() and rel_err(got, plain) > 1e-3, rel_err(got, plain)
    assert max(len(step[0].unique()) for step in recorded.steps) > 1
