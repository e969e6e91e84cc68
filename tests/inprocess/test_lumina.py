"""Lumina 2 and Z-Image (NextDiT): per-token timesteps through the NextDiT family adapter.

The models are random-weight instances of ComfyUI's own Lumina2 / ZImage configs, model_base and
NextDiT class (tests/factory_lumina.py: 1 noise refiner, 1 context refiner, 2 main blocks; Lumina 2
with grouped-query attention, Z-Image with its 256-wide time embedding and 32-token padding), so
everything the adapter swaps is ComfyUI's code. Z-Image's key words use ComfyUI's own Z-Image
tokenizer (Qwen3, in ComfyUI's tree); Lumina 2's use ComfyUI's LuminaTokenizer on a SentencePiece
model trained in the test (Gemma's own model ships inside the text-encoder file, not in the tree).
"""

from __future__ import annotations

import math

import comfy.ldm.lumina.model as lumina
import comfy.model_management
import comfy.samplers
import comfy.sd1_clip
import comfy.text_encoders.z_image
import pytest
import torch

from asyndm.comfy_adapter.families import time_adapter
from asyndm.comfy_adapter.families.base import token_index
from asyndm.comfy_adapter.families.lumina import PerTokenTimestepsNextDiT
from asyndm.comfy_adapter.sampler import AsynSampler, patch_constant
from asyndm.comfy_adapter.tokens import KEY, prompt_tokens
from asyndm.masks import item_masks
from asyndm.schedule_spec import AsynSchedule
from asyndm.schedules import timestep_maps
from asyndm.sigma_map import state_to_sigma
from tests.factory_lumina import GEMMA_CORPUS, build_lumina2, build_z_image, gemma_tokenizer, make_lumina_conditioning
from tests.inprocess.sampling import SAME_AS_KSAMPLER, TokenTimesteps, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import TokenizerOnly

SIZE = 16  # latent 16x16 -> 8x8 tokens (Z-Image pads the 64 image tokens to 64: no image padding)
ODD = (12, 18)  # 6x9 = 54 tokens: Z-Image appends 10 padding tokens
VARIANTS = ("lumina2", "z_image")
PROMPT = "a photo of a rabbit wearing sunglasses, next to a teddy bear"
# what a Lumina 2 user types: its system prompt, then the prompt (the corpus's system-prompt sentence)
LUMINA_PROMPT = GEMMA_CORPUS[3].replace("an image of a cat", "a photo of a rabbit next to a teddy bear")


@pytest.fixture(scope="module")
def models():
    return {"lumina2": build_lumina2(), "z_image": build_z_image()}


def conds():
    return make_lumina_conditioning(seed=1), make_lumina_conditioning(seed=2, tokens=9)


def latent(h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.zeros(1, 16, h, w)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_no_key_pixels_is_the_ksampler_bit_for_bit(models, variant, sampler, cfg):
    model = models[variant]
    pos, neg = conds()
    kw = dict(seed=4, cfg=cfg, sampler=sampler, scheduler="simple", steps=3)
    a = stock(model, pos, neg, latent(), **kw)
    for case, make in SAME_AS_KSAMPLER.items():
        b = asyn(model, pos, neg, latent(), schedule=make(1, SIZE, SIZE), **kw)
        assert torch.equal(a, b), (case, rel_err(b, a))


def forward_args(batch: int = 1) -> tuple[torch.Tensor, int]:
    context = conds()[0][0][0].expand(batch, -1, -1)
    return context, context.shape[1]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("hw", [(SIZE, SIZE), ODD])
def test_a_constant_map_computes_what_the_stock_model_does(models, variant, hw):
    """Every image token mapped to the forward's own t: the swapped blocks and final layer (their
    arithmetic redone with per-token modulation) give the stock forward. With the map cleared the
    originals run."""
    dm = models[variant].model.diffusion_model
    x = torch.randn(2, 16, *hw, generator=torch.Generator().manual_seed(0))
    context, num_tokens = forward_args(2)
    t = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        want = dm(x, t, context, num_tokens)
        with PerTokenTimestepsNextDiT(dm) as adapter:
            adapter.set_map(None, torch.tensor([0.7]), torch.zeros(1, *hw, dtype=torch.long), rows=2)
            got = dm(x, t, context, num_tokens)
            fired = list(adapter._fired)
            adapter.set_map(None)
            plain = dm(x, t, context, num_tokens)
    assert fired == [1] * (len(dm.noise_refiner) + len(dm.layers) + 1) and adapter.table_builds == 1
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rel_err(got, want)
    assert torch.equal(plain, want)  # no map set: the originals run


class Recorder:
    """The stock time embedding (adaln_input), and for every modulated block its input and the input
    of its attention's qkv projection (modulate(attention_norm1(x), scale_msa)), and the final
    layer's input and output."""

    def __init__(self, dm) -> None:
        self.dm = dm
        self.blocks = [*dm.noise_refiner, *dm.layers]
        self.block_in: list[torch.Tensor] = []
        self.qkv_in: list[torch.Tensor] = []
        self.final: tuple | None = None
        self.adaln: torch.Tensor | None = None

    def __enter__(self):
        self.handles = [self.dm.t_embedder.register_forward_hook(self._time)]
        self.handles += [b.register_forward_pre_hook(self._block_in) for b in self.blocks]
        self.handles += [b.attention.qkv.register_forward_hook(self._qkv_in) for b in self.blocks]
        self.handles.append(self.dm.final_layer.register_forward_hook(self._final))
        return self

    def _time(self, _module, _args, out):
        self.adaln = out.detach().clone()

    def _block_in(self, _module, args):
        self.block_in.append(args[0].detach().clone())

    def _qkv_in(self, _module, args, _out):
        self.qkv_in.append(args[0].detach().clone())

    def _final(self, _module, args, out):
        self.final = (args[0].detach().clone(), out.detach().clone())

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_image_token_is_modulated_at_its_own_timestep(models, variant):
    """In every modulated block (noise refiner and main layers) and in the final layer, given the
    input it got: left-half image tokens are modulated as ComfyUI's own block at t_left, right-half
    ones at t_right, caption and padding tokens at the forward's (background) timestep. The stock
    modulation is recomputed with ComfyUI's adaLN layers, modulate() and FinalLayer.forward, on the
    time embedding of stock forwards at those timesteps (so the reversal t' = 1 - t is the model's)."""
    dm = models[variant].model.diffusion_model
    h, w = ODD
    x = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(0))
    context, num_tokens = forward_args()
    t_left, t_right, carrier = 0.25, 0.9, 0.5
    adaln = {}
    for t in (t_left, t_right, carrier):
        with Recorder(dm) as stock_rec, torch.no_grad():
            dm(x, torch.tensor([t]), context, num_tokens)
        adaln[t] = stock_rec.adaln
    inverse = torch.zeros(1, h, w, dtype=torch.long)
    inverse[..., w // 2 + 1:] = 1  # columns 10.. (token columns 5..8): a patch edge
    with PerTokenTimestepsNextDiT(dm) as adapter, Recorder(dm) as rec, torch.no_grad():
        adapter.set_map(None, unique=torch.tensor([t_left, t_right]), inverse=inverse, rows=1)
        dm(x, torch.tensor([carrier]), context, num_tokens)
        adapter.set_map(None)
    image = (h // 2) * (w // 2)
    caption, _, _ = adapter.forward_tokens
    left = (torch.arange(image) % (w // 2)) < (w // 2 + 1) // 2
    pad = dm.pad_tokens_multiple and (-image) % dm.pad_tokens_multiple or 0
    assert caption == num_tokens + (dm.pad_tokens_multiple and (-num_tokens) % dm.pad_tokens_multiple or 0)
    segments = {}  # timestep -> which tokens of the block's sequence it modulates
    for kind in ("refiner", "layers"):
        front = torch.zeros(caption if kind == "layers" else 0, dtype=torch.bool)
        back = torch.zeros(pad, dtype=torch.bool)
        segments[kind] = {t_left: torch.cat([front, left, back]), t_right: torch.cat([front, ~left, back]),
                          carrier: torch.cat([~front, torch.zeros(image, dtype=torch.bool), ~back])}
    kinds = ["refiner"] * len(dm.noise_refiner) + ["layers"] * len(dm.layers)
    assert len(rec.qkv_in) == len(kinds) and (pad > 0) == (variant == "z_image")
    with torch.no_grad():
        for i, (block, kind) in enumerate(zip(rec.blocks, kinds, strict=True)):
            x_in, got = rec.block_in[i], rec.qkv_in[i]
            for t, tokens in segments[kind].items():
                scale_msa = block.adaLN_modulation(adaln[t]).chunk(4, dim=1)[0]
                want = lumina.modulate(block.attention_norm1(x_in), scale_msa)
                assert torch.allclose(got[:, tokens], want[:, tokens], rtol=1e-5, atol=1e-6), (i, kind, t)
        final_in, final_out = rec.final
        for t, tokens in segments["layers"].items():
            want = lumina.FinalLayer.forward(dm.final_layer, final_in, adaln[t])
            assert torch.allclose(final_out[:, tokens], want[:, tokens], rtol=1e-5, atol=1e-6), ("final", t)
            if t != carrier:
                other = lumina.FinalLayer.forward(dm.final_layer, final_in, adaln[carrier])
                assert not torch.allclose(final_out[:, tokens], other[:, tokens], rtol=1e-3, atol=1e-4), t


def test_a_drawn_mask_reaches_the_transformer_as_the_schedules_token_map(models, monkeypatch):
    model = models["z_image"]
    pos, neg = conds()
    steps = 5
    schedule = fixed_masks(1, SIZE, SIZE)  # top half, bin, k = 0.8
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsNextDiT)
    try:
        a = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=2.5, scheduler="simple", schedule=schedule)
    finally:
        rec.handle.remove()
    sigmas = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler="euler", scheduler="simple",
                                     model_options=model.model_options).sigmas
    ms = model.get_model_object("model_sampling")
    states = timestep_maps(schedule.masks, torch.tensor(schedule.k), curve="bin", num_steps=steps)
    assert len(rec.steps) == 2 * steps  # cond and uncond captions differ in length: two forwards a step
    distinct = 0
    for i, seen in enumerate(rec.steps):
        sigma = state_to_sigma(states[i // 2].float(), sigmas, sigma_top=float(ms.sigma_max))
        want = ms.timestep(sigma.flatten()).view(1, SIZE, SIZE)
        assert torch.equal(seen, token_index(want, 2).float()), f"forward {i}"
        distinct = max(distinct, len(seen[0].unique()))
        assert seen[0, -1] == ms.timestep(sigmas[i // 2:i // 2 + 1])[0]  # background: the scheduler's timestep
    assert distinct == 2, "the transformer never saw two timesteps"
    sync = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=2.5, scheduler="simple")
    assert torch.isfinite(a).all() and rel_err(a, sync) > 1e-3


def test_lumina2_with_a_drawn_mask_differs(models):
    model = models["lumina2"]
    pos, neg = conds()
    kw = dict(seed=4, steps=3, cfg=2.5, scheduler="simple", sampler="dpmpp_2m")
    out = asyn(model, pos, neg, latent(*ODD), schedule=fixed_masks(1, *ODD), **kw)
    assert out.shape == latent(*ODD).shape and torch.isfinite(out).all()
    assert rel_err(out, asyn(model, pos, neg, latent(*ODD), **kw)) > 1e-3


def test_what_nextdit_cannot_do_yet_is_refused_by_name(models):
    """Each model is named as its own family by the sampler's check (run before any step)."""
    for variant, family in (("lumina2", "Lumina 2"), ("z_image", "Z-Image")):
        model = models[variant]
        adapter = time_adapter(model.model.diffusion_model)
        ms = model.get_model_object("model_sampling")
        assert isinstance(adapter, PerTokenTimestepsNextDiT) and adapter.family == family and adapter.patch_size == 2
        for sampler in ("euler_ancestral", "ddpm"):  # every sampler runs (ComfyUI's own, per track)
            AsynSampler(sampler, fixed_masks(1, SIZE, SIZE))._check_family(adapter, ms)
        with pytest.raises(ValueError, match=f"reference mode.*turn it off for {family}"):
            AsynSampler("ddim", fixed_masks(1, SIZE, SIZE), eta=1.0, reference=True)._check_family(adapter, ms)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nothing_outlives_a_failed_run(models, variant):
    model = models[variant]
    dm = model.model.diffusion_model
    pos, neg = conds()
    before = stock(model, pos, neg, latent(), seed=6, cfg=2.5, scheduler="simple", steps=3)
    hooks_before = hook_state(model.model)

    def interrupt(step, x0, x, total):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        asyn(model, pos, neg, latent(), seed=6, cfg=2.5, scheduler="simple", steps=3,
             schedule=fixed_masks(1, SIZE, SIZE), callback=interrupt)
    comfy.model_management.interrupt_current_processing(False)
    assert hook_state(model.model) == hooks_before
    swapped = [*dm.noise_refiner, *dm.context_refiner, *dm.layers, dm.final_layer]
    assert not any("forward" in vars(module) for module in swapped)
    assert torch.equal(stock(model, pos, neg, latent(), seed=6, cfg=2.5, scheduler="simple", steps=3), before)


# ------------------------------------------------------------------------------------ key words
class AttentionCalls:
    """An attention override (chained after the pack's observer) that keeps every call's q and k."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, func, *args, **kwargs):
        self.calls.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **kwargs)


def dynamic_masks_follow_the_joint_attention(model, tokens, word: str, monkeypatch) -> None:
    """The key pixels of step 1 are the threshold of the step-0 attention of the image tokens to the
    word's caption tokens in the main layers (the caption as the model pads it), recomputed here from
    the model's own q and k; the transformer then sees two timesteps and the result differs."""
    dm = model.model.diffusion_model
    layout = PerTokenTimestepsNextDiT(dm).text_layout(tokens)
    text = tokens.context_length(layout)
    pos = make_lumina_conditioning(tokens=text, seed=1)
    pos[0][1][KEY] = tokens
    calls = AttentionCalls()
    spy = model.clone()
    spy.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = calls
    made = []
    init = AsynSampler.__init__
    monkeypatch.setattr(AsynSampler, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsNextDiT)
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=(word,), threshold=1.0)
    try:
        out = asyn(spy, pos, pos, latent(), seed=3, steps=4, cfg=1.0, scheduler="simple", schedule=schedule)
    finally:
        rec.handle.remove()
    multiple = dm.pad_tokens_multiple or 1
    caption = text + (-text) % multiple
    image = (SIZE // 2) ** 2
    per_forward = len(dm.context_refiner) + len(dm.noise_refiner) + len(dm.layers)
    assert len(calls.calls) == 4 * per_forward  # cfg 1: one forward per step
    joint = [(q, k) for q, k in calls.calls[:per_forward] if q.shape[2] == caption + image + (-image) % multiple]
    assert len(joint) == len(dm.layers)  # the caption and noise refiners attend within their own tokens
    cols = tokens.columns(word, layout)
    maps = []
    for q, k in joint:
        logits = q[:, :, caption:caption + image].double() @ k[:, :, :caption].double().transpose(-1, -2)
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
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


@pytest.fixture(scope="module")
def z_image_tokens():
    return prompt_tokens(TokenizerOnly(comfy.text_encoders.z_image.ZImageTokenizer(), ()), PROMPT)


def test_z_image_key_words_are_columns_of_the_chat_template(z_image_tokens, models):
    """Z-Image's encoder keeps the whole chat template (it has no trimming of its own): a word's columns
    are where Qwen3's BPE writes it inside "<|im_start|>user\\n{prompt}<|im_end|>..."."""
    tokenizer = comfy.text_encoders.z_image.ZImageTokenizer()
    assert "encode_token_weights" not in vars(comfy.text_encoders.z_image.ZImageTEModel)  # no trim, no padding
    ids = [t[0] for t in tokenizer.tokenize_with_weights(PROMPT)["qwen3_4b"][0]]
    layout = time_adapter(models["z_image"].model.diffusion_model).text_layout(z_image_tokens)
    assert layout == ["qwen3_4b"] and z_image_tokens.context_length(layout) == len(ids)
    hf = tokenizer.qwen3_4b.tokenizer
    for word, text in (("rabbit", " rabbit"), ("teddy bear", " teddy bear"), ("a", "a")):
        want = hf(text)["input_ids"]
        cols = z_image_tokens.columns(word, layout)
        assert [ids[c] for c in cols] == want and cols == list(range(cols[0], cols[0] + len(want))), word
    assert z_image_tokens.columns("a", layout) == [3]  # after "<|im_start|>", "user", "\n"


def test_z_image_dynamic_masks_follow_the_joint_attention(models, z_image_tokens, monkeypatch):
    dynamic_masks_follow_the_joint_attention(models["z_image"], z_image_tokens, "rabbit", monkeypatch)


@pytest.fixture(scope="module")
def lumina2_tokens():
    tokenizer = gemma_tokenizer()
    return tokenizer, prompt_tokens(TokenizerOnly(tokenizer, ()), LUMINA_PROMPT)


def test_lumina2_key_words_are_columns_of_the_gemma_stream(lumina2_tokens, models):
    """Lumina 2's caption is Gemma-2's output from the start token on, the system prompt the user types
    included: a word's columns are where Gemma's SentencePiece writes it (ComfyUI's LuminaTokenizer on a
    SentencePiece model trained in the test: the real one comes inside the text-encoder file), after the
    system prompt: words are looked for after its "<Prompt Start>" marker, so a word the system prompt
    also has ("of") is the prompt's. Without the marker the whole text is searched."""
    tokenizer, tokens = lumina2_tokens
    ids = [t[0] for t in tokenizer.tokenize_with_weights(LUMINA_PROMPT)["gemma2_2b"][0]]
    layout = time_adapter(models["lumina2"].model.diffusion_model).text_layout(tokens)
    assert tokens.context_length(layout) == len(ids) and ids[0] == 2
    spm = tokenizer.gemma2_2b.tokenizer.tokenizer  # the SentencePieceProcessor (add_bos on)
    prompt_at = len(spm.encode(LUMINA_PROMPT.split("<Prompt Start>")[0] + "<Prompt Start>", add_bos=True))
    for word in ("rabbit", "teddy bear", "of"):
        want = spm.encode(word, add_bos=False)
        cols = tokens.columns(word, layout)
        assert [ids[c] for c in cols] == want and cols == list(range(cols[0], cols[0] + len(want))), word
        assert cols[0] >= prompt_at, word
    plain = prompt_tokens(TokenizerOnly(tokenizer, ()), "a photo of a rabbit")
    assert time_adapter(models["lumina2"].model.diffusion_model).text_layout(plain) == ["gemma2_2b"]
    photo = len(spm.encode("photo", add_bos=False))
    assert plain.columns("photo", ["gemma2_2b"]) == list(range(2, 2 + photo))  # after the start token and "a"


def test_lumina2_dynamic_masks_follow_the_joint_attention(models, lumina2_tokens, monkeypatch):
    dynamic_masks_follow_the_joint_attention(models["lumina2"], lumina2_tokens[1], "rabbit", monkeypatch)
