"""HunyuanImage 2.1: per-token timesteps through the HunyuanImage adapter (the Flux adapter's hooks).

The models are random-weight instances of ComfyUI's own HunyuanImage21 config and HunyuanVideo class
(tests/factory_flux_family.py build_hunyuan_image: 1 double and 1 single block, width 64, 64-channel
latents in 1x1 patches, the TokenRefiner and the ByT5 mapper), so everything the adapter hooks is
ComfyUI's code. Key words use ComfyUI's own HunyuanImageTokenizer (Qwen2.5-VL + ByT5 files in the tree).
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.samplers
import comfy.sd1_clip
import comfy.text_encoders.hunyuan_image
import pytest
import torch

from asyndm.comfy_adapter.errors import UnsupportedModelError
from asyndm.comfy_adapter.families import time_adapter
from asyndm.comfy_adapter.families.hunyuan_image import PerTokenTimestepsHunyuanImage, _qwen_tokenizer, template_end
from asyndm.comfy_adapter.sampler import AsynSampler, patch_constant
from asyndm.comfy_adapter.tokens import KEY, UnknownWordError, prompt_tokens
from asyndm.masks import item_masks
from asyndm.schedule_spec import AsynSchedule
from asyndm.schedules import timestep_maps
from asyndm.sigma_map import state_to_sigma
from tests.factory_flux_family import build_hunyuan_image, make_hunyuan_image_conditioning
from tests.inprocess.sampling import SAME_AS_KSAMPLER, TokenTimesteps, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import TokenizerOnly

SIZE = 8  # latent 8x8 (a 256x256 image at /32) -> 64 image tokens
GLYPHS = 5  # ByT5 tokens of quoted text, after the Qwen tokens
PROMPT = 'A photo of a rabbit wearing sunglasses, next to a teddy bear holding a sign "Hello"'


@pytest.fixture(scope="module")
def model():
    return build_hunyuan_image()


def conds(tokens: int = 12):
    return (make_hunyuan_image_conditioning(tokens=tokens, seed=1, glyphs=GLYPHS),
            make_hunyuan_image_conditioning(tokens=tokens, seed=2, glyphs=GLYPHS))


def latent() -> torch.Tensor:
    return torch.zeros(1, 64, SIZE, SIZE)


def test_the_family_and_what_it_refuses(model):
    adapter = time_adapter(model.model.diffusion_model)
    assert isinstance(adapter, PerTokenTimestepsHunyuanImage) and adapter.family == "HunyuanImage 2.1"
    assert adapter.patch_size == 1
    with pytest.raises(UnsupportedModelError, match=r"HunyuanImage 2\.1 distilled \(meanflow.*Supported: .*Flux"):
        time_adapter(build_hunyuan_image(meanflow=True).model.diffusion_model)


def test_the_distilled_model_is_refused_before_any_step():
    """What a user of HunyuanImage 2.1 distilled is told, with or without key items: the model by name
    and the supported families, before the first step."""
    distilled = build_hunyuan_image(meanflow=True)
    pos, neg = conds()
    steps = []
    for schedule in (None, fixed_masks(1, SIZE, SIZE)):
        with pytest.raises(UnsupportedModelError) as info:
            asyn(distilled, pos, neg, latent(), schedule=schedule, cfg=1.0, scheduler="simple",
                 callback=lambda *a: steps.append(a))
        msg = str(info.value)
        assert "HunyuanImage 2.1 distilled" in msg and "not supported" in msg and "Flux" in msg and "SDXL" in msg
    assert steps == []


@pytest.mark.parametrize("sampler, cfg", [("euler", 1.0), ("euler", 3.5), ("dpmpp_2m", 1.0), ("dpmpp_2m", 3.5)])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_no_key_pixels_is_the_ksampler_bit_for_bit(model, sampler, cfg, case):
    pos, neg = conds()
    kw = dict(seed=4, steps=3, cfg=cfg, sampler=sampler, scheduler="simple")
    a = stock(model, pos, neg, latent(), **kw)
    b = asyn(model, pos, neg, latent(), schedule=SAME_AS_KSAMPLER[case](1, SIZE, SIZE), **kw)
    assert torch.equal(a, b), rel_err(b, a)


def forward_kwargs(batch: int, guidance: bool = False) -> dict:
    pos, _ = conds()
    context, extra = pos[0]
    kwargs = {"context": context.expand(batch, -1, -1),
              "txt_byt5": extra["conditioning_byt5small"].expand(batch, -1, -1)}
    if guidance:
        kwargs["guidance"] = torch.full((batch,), 6.0)
    return kwargs


@pytest.mark.parametrize("guidance", [False, True])
def test_a_constant_map_is_the_stock_forward(guidance):
    dm = build_hunyuan_image(guidance=guidance).model.diffusion_model
    x = torch.randn(2, 64, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(2, guidance)
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        want = dm(x, t, **kwargs)
        with PerTokenTimestepsHunyuanImage(dm) as adapter:
            adapter.set_map(None, unique=torch.tensor([700.0]), inverse=torch.zeros(1, SIZE, SIZE, dtype=torch.long),
                            rows=2)
            got = dm(x, t, **kwargs)
            fired, lengths, tokens = list(adapter._fired), adapter._lengths, adapter.forward_tokens
            adapter.set_map(None)
            plain = dm(x, t, **kwargs)
    assert fired == [1] * (len(dm.double_blocks) + len(dm.single_blocks) + 1) and adapter.table_builds == 1
    assert lengths == (12 + GLYPHS, SIZE * SIZE, 0) and tokens == (12 + GLYPHS, SIZE * SIZE, (SIZE, SIZE))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rel_err(got, want)
    assert torch.equal(plain, want)


class Recorded:
    """Block 0's image qkv input (only its modulation depends on t), the single blocks' modulation
    [image, text], and the TokenRefiner's timestep and output."""

    def __init__(self, dm) -> None:
        self.dm = dm
        self.single: list[torch.Tensor] = []

    def __enter__(self):
        dm = self.dm
        self.handles = [dm.double_blocks[0].img_attn.qkv.register_forward_hook(self._qkv),
                        dm.txt_in.register_forward_hook(self._refiner)]
        self.handles += [b.modulation.register_forward_hook(self._single) for b in dm.single_blocks]
        return self

    def _qkv(self, _m, args, _out) -> None:
        self.qkv = args[0].detach().clone()

    def _refiner(self, _m, args, out) -> None:
        self.refiner_t, self.refined = args[1].detach().clone(), out.detach().clone()

    def _single(self, _m, _args, out) -> None:
        self.single.append(torch.cat([out[0].shift, out[0].scale, out[0].gate], dim=-1).detach().clone())

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def test_each_image_token_is_modulated_at_its_own_timestep(model):
    """Left-half tokens as the stock model at t_left, right-half at t_right; the text (Qwen and ByT5
    tokens, after the image in the single blocks) keeps the carrier's; the TokenRefiner gets the scalar carrier."""
    dm = model.model.diffusion_model
    x = torch.randn(1, 64, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(1)
    t_left, t_right, carrier = 250.0, 900.0, 500.0
    stock_rec = {}
    for t in (t_left, t_right, carrier):
        with Recorded(dm) as rec, torch.no_grad():
            dm(x, torch.tensor([t]), **kwargs)
        stock_rec[t] = rec
    inverse = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    inverse[..., SIZE // 2:] = 1
    with PerTokenTimestepsHunyuanImage(dm) as adapter, Recorded(dm) as rec, torch.no_grad():
        adapter.set_map(None, unique=torch.tensor([t_left, t_right]), inverse=inverse, rows=1)
        dm(x, torch.tensor([carrier]), **kwargs)
        adapter.set_map(None)
    image, text = SIZE * SIZE, 12 + GLYPHS
    left = (torch.arange(image) % SIZE) < SIZE // 2
    for mask, t in ((left, t_left), (~left, t_right)):
        assert torch.allclose(rec.qkv[:, mask], stock_rec[t].qkv[:, mask], rtol=1e-5, atol=1e-6), t
        assert not torch.allclose(rec.qkv[:, mask], stock_rec[carrier].qkv[:, mask], rtol=1e-3, atol=1e-4), t
        for got, want in zip(rec.single, stock_rec[t].single, strict=True):
            assert got.shape[1] == image + text
            assert torch.allclose(got[:, :image][:, mask], want.expand(-1, image, -1)[:, mask], rtol=1e-5, atol=1e-6)
    for got, want in zip(rec.single, stock_rec[carrier].single, strict=True):
        assert torch.equal(got[:, image:], want.expand(-1, text, -1))
    assert torch.equal(rec.refiner_t, torch.tensor([carrier])) and torch.equal(rec.refined, stock_rec[carrier].refined)


def test_a_drawn_mask_reaches_hunyuan_image_as_the_schedules_token_map(model, monkeypatch):
    pos, neg = conds()
    steps = 4
    schedule = fixed_masks(1, SIZE, SIZE)  # top half, bin, k = 0.8
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsHunyuanImage, patch=1)
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
        assert seen[0, -1] == ms.timestep(sigmas[i:i + 1])[0]
    assert distinct == 2, "the transformer never saw two timesteps"
    sync = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=3.5, scheduler="simple")
    assert torch.isfinite(a).all() and rel_err(a, sync) > 1e-3


def test_nothing_outlives_a_failed_hunyuan_image_run(model):
    pos, neg = conds()
    before = stock(model, pos, neg, latent(), seed=6, steps=3, cfg=3.5, scheduler="simple")
    hooks_before = hook_state(model.model)

    def interrupt(step, x0, x, total):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        asyn(model, pos, neg, latent(), seed=6, steps=3, cfg=3.5, scheduler="simple",
             schedule=fixed_masks(1, SIZE, SIZE), callback=interrupt)
    comfy.model_management.interrupt_current_processing(False)
    assert hook_state(model.model) == hooks_before
    assert torch.equal(stock(model, pos, neg, latent(), seed=6, steps=3, cfg=3.5, scheduler="simple"), before)


# ----------------------------------------------------------------------------------------- key words
@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerOnly(comfy.text_encoders.hunyuan_image.HunyuanImageTokenizer(), ())


@pytest.mark.parametrize("text", [PROMPT, "", "rabbit", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                  "a rabbit<|im_end|>"])
def test_the_template_cut_is_what_comfyuis_text_encoder_keeps(tokenizer, text, monkeypatch):
    """ComfyUI's own HunyuanImageTEModel.encode_token_weights, with the Qwen model replaced by one that
    returns each token's position: the first kept position is template_end."""
    def positions(self, token_weight_pairs):
        n = len(token_weight_pairs["qwen25_7b"][0])
        return torch.arange(n, dtype=torch.float32).view(1, n, 1), None, {"attention_mask": torch.ones(1, n)}

    monkeypatch.setattr(comfy.sd1_clip.SD1ClipModel, "encode_token_weights", positions)
    te = object.__new__(comfy.text_encoders.hunyuan_image.HunyuanImageTEModel)
    te.byt5_small = None
    pairs = tokenizer.tokenize(text)
    kept, _, _ = te.encode_token_weights(pairs)
    ids = [t[0] for t in pairs["qwen25_7b"][0]]
    assert int(kept[0, 0, 0]) == template_end(ids) and kept.shape[1] == len(ids) - template_end(ids)


def test_key_words_are_the_prompts_own_qwen_tokens(tokenizer):
    """A word's columns hold the tokens it has inside the prompt (" rabbit", not "rabbit" alone),
    counted from the first token the encoder keeps; decoded, they spell the word."""
    tokens = prompt_tokens(tokenizer, PROMPT)
    adapter = PerTokenTimestepsHunyuanImage(build_hunyuan_image().model.diffusion_model)
    layout = adapter.text_layout(tokens)
    ids = tokens.streams["qwen25_7b"].chunks[0]
    drop = template_end(ids)
    assert tokens.context_length(layout) == len(ids) - drop  # the context the encoder hands the model
    decode = _qwen_tokenizer().decode
    for phrase in ("a", "photo", "rabbit", "sunglasses", "teddy bear", "hello"):
        cols = tokens.columns(phrase, layout)
        assert cols == list(range(cols[0], cols[0] + len(cols)))
        assert decode([ids[drop + c] for c in cols]).strip(' "').lower() == phrase, phrase
    assert tokens.columns("a", layout) == [0]  # "A", the first word of the prompt
    assert tokens.columns("rabbit", layout) == [4]  # A, ▁photo, ▁of, ▁a, ▁rabbit
    assert adapter.text_layout(tokens) == layout  # the in-prompt stream is added once
    with pytest.raises(UnknownWordError, match="giraffe"):
        tokens.columns("giraffe", layout)


class AttentionCalls:
    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, func, *args, **kwargs):
        self.calls.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **kwargs)


def test_hunyuan_image_dynamic_masks_follow_the_image_to_text_attention(model, tokenizer, monkeypatch):
    """Sequence [image, Qwen text, ByT5 glyphs]: the key pixels of step 1 are the threshold of the step-0
    attention of the image queries to the word's Qwen keys, softmaxed over all text keys, recomputed here
    from the model's own q and k (the TokenRefiner's text-only attention calls are not joint)."""
    tokens = prompt_tokens(tokenizer, PROMPT)
    adapter_layout = PerTokenTimestepsHunyuanImage(model.model.diffusion_model).text_layout(tokens)
    text = tokens.context_length(adapter_layout)
    pos = make_hunyuan_image_conditioning(tokens=text, seed=1, glyphs=GLYPHS)
    pos[0][1][KEY] = tokens
    calls = AttentionCalls()
    spy = model.clone()
    spy.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = calls
    made = []
    init = AsynSampler.__init__
    monkeypatch.setattr(AsynSampler, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsHunyuanImage, patch=1)
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",), threshold=1.0)
    try:
        out = asyn(spy, pos, pos, latent(), seed=3, steps=4, cfg=1.0, scheduler="simple", schedule=schedule)
    finally:
        rec.handle.remove()
    image, all_text = SIZE * SIZE, text + GLYPHS
    joint = [(q, k) for q, k in calls.calls if q.shape[2] == image + all_text]
    dm = model.model.diffusion_model
    per_forward = len(dm.double_blocks) + len(dm.single_blocks)
    assert len(joint) == 4 * per_forward
    cols = tokens.columns("rabbit", adapter_layout)
    maps = []
    for q, k in joint[:per_forward]:
        logits = q[:, :, :image].double() @ k[:, :, image:].double().transpose(-1, -2)
        probs = torch.softmax(logits / math.sqrt(q.shape[-1]), dim=-1).mean(dim=1)
        maps.append(probs[..., cols].mean(-1))
    attn = torch.stack(maps).mean(0)[..., None].float()
    masks = item_masks(attn, [0.7], threshold=1.0, size=(SIZE, SIZE), grid=(SIZE, SIZE))
    want = patch_constant(masks[:, 0] * 0.7, 1)
    assert 0 < int((want > 0).sum()) < SIZE * SIZE
    assert torch.equal(made[-1].record.priorities[1], want)
    assert max(len(step.unique()) for step in rec.steps) == 2
    sync = asyn(model, pos, pos, latent(), seed=3, steps=4, cfg=1.0, scheduler="simple")
    assert torch.isfinite(out).all() and rel_err(out, sync) > 1e-3
