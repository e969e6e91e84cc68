"""Qwen-Image and Qwen-Image-Edit: per-token timesteps through the Qwen-Image family adapter.

The models are random-weight instances of ComfyUI's own QwenImage config, model_base and
QwenImageTransformer2DModel (tests/factory_qwen_image.py: 2 blocks, width 64), so everything the
adapter hooks and swaps is ComfyUI's code. Qwen-Image-Edit is the same class given reference
latents. Latents are ComfyUI's Wan 2.1 format, (B, 16, 1, H, W). Key words use ComfyUI's own
Qwen-Image tokenizer (Qwen2.5-VL, in ComfyUI's tree); the 7B encoder cannot be built here, so the
text context is random of the length ComfyUI's encoder would give, and that length and the
template trim are checked against ComfyUI's own trimming code.
"""

from __future__ import annotations

import importlib
import math

import comfy.model_management
import comfy.samplers
import comfy.sd1_clip
import comfy.text_encoders.qwen_image
import pytest
import torch

from asyndm.comfy_adapter.families import time_adapter
from asyndm.comfy_adapter.families.base import token_index
from asyndm.comfy_adapter.families.qwen_image import PerTokenTimestepsQwenImage, template_end
from asyndm.comfy_adapter.sampler import AsynSampler, patch_constant
from asyndm.comfy_adapter.tokens import KEY, prompt_tokens
from asyndm.masks import item_masks
from asyndm.schedule_spec import AsynSchedule
from asyndm.schedules import timestep_maps
from asyndm.sigma_map import state_to_sigma
from tests.factory_qwen_image import build_qwen_image, make_qwen_conditioning
from tests.inprocess.conftest import PACK_MODULE, load_pack
from tests.inprocess.sampling import SAME_AS_KSAMPLER, TokenTimesteps, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import TokenizerOnly


def pack_class(name: str) -> type:
    """A class of the pack as ComfyUI loads it (the nodes raise its own copies of the pack's errors)."""
    load_pack()
    module, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"{PACK_MODULE}.asyndm.comfy_adapter.{module}"), cls)


# Qwen-Image relies on the sampler taking one-frame latents (B, C, 1, H, W) (ComfyUI's KSampler node
# makes Qwen-Image's empty latent one), and on a word's tokens being told from the empty prompt's by
# position, not by value (Qwen-Image's system prompt holds "background", "image", "color", ...).

SIZE = 16  # latent 16x16 -> 8x8 tokens
REF = 8  # the Edit reference latent: 8x8 -> 4x4 tokens after the image's
PROMPT = "a photo of a rabbit wearing sunglasses, next to a teddy bear on a grey background"


@pytest.fixture(scope="module")
def model():
    return build_qwen_image()


def reference() -> torch.Tensor:
    return torch.randn(1, 16, 1, REF, REF, generator=torch.Generator().manual_seed(7))


def conds(edit: bool = False):
    ref = reference() if edit else None
    return make_qwen_conditioning(seed=1, reference=ref), make_qwen_conditioning(seed=2, reference=ref)


def latent(h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.zeros(1, 16, 1, h, w)  # an empty latent as ComfyUI's KSampler node passes it on (Wan 2.1 format)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_no_key_pixels_is_the_ksampler_bit_for_bit(model, sampler, cfg, case):
    pos, neg = conds()
    kw = dict(seed=4, cfg=cfg, sampler=sampler, scheduler="simple", steps=3)
    a = stock(model, pos, neg, latent(), **kw)
    b = asyn(model, pos, neg, latent(), schedule=SAME_AS_KSAMPLER[case](1, SIZE, SIZE), **kw)
    assert torch.equal(a, b), rel_err(b, a)


@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_edit_with_no_key_pixels_is_the_ksampler_bit_for_bit(model, case):
    pos, neg = conds(edit=True)
    kw = dict(seed=4, cfg=2.5, sampler="euler", scheduler="simple", steps=3)
    a = stock(model, pos, neg, latent(), **kw)
    b = asyn(model, pos, neg, latent(), schedule=SAME_AS_KSAMPLER[case](1, SIZE, SIZE), **kw)
    assert torch.equal(a, b), rel_err(b, a)


def forward_kwargs(edit: bool, batch: int = 1) -> dict:
    pos, _ = conds(edit)
    kwargs = {"context": pos[0][0].expand(batch, -1, -1)}
    if edit:
        kwargs["ref_latents"] = [reference().expand(batch, -1, -1, -1, -1)]
    return kwargs


def noisy(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("edit", [False, True])
def test_a_constant_map_computes_what_the_stock_model_does(model, edit):
    """Every image token mapped to the forward's own t: the per-token modulation (its table, the
    swapped _modulate and final layer) gives the stock forward. With the map cleared the originals run."""
    dm = model.model.diffusion_model
    x, kwargs, t = noisy(2), forward_kwargs(edit, 2), torch.tensor([0.7, 0.7])
    with torch.no_grad():
        want = dm(x, t, **kwargs)
        with PerTokenTimestepsQwenImage(dm) as adapter:
            adapter.set_map(None, torch.tensor([0.7]), torch.zeros(1, SIZE, SIZE, dtype=torch.long), rows=2)
            got = dm(x, t, **kwargs)
            fired = list(adapter._fired)
            adapter.set_map(None)
            plain = dm(x, t, **kwargs)
    assert fired == [1] * (len(dm.transformer_blocks) + 1) and adapter.table_builds == 1
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rel_err(got, want)
    assert torch.equal(plain, want)  # no map set: the originals run


class Recorder:
    """Block 0's attention inputs (the modulated image stream, image then reference tokens, and the
    modulated text stream: the tokens themselves do not depend on the timestep there), and the
    final layer's input and output."""

    def __init__(self, dm) -> None:
        attn = dm.transformer_blocks[0].attn
        self.layers = {"image": attn.to_q, "text": attn.add_q_proj, "final": dm.norm_out}
        self.seen: dict[str, tuple] = {}

    def __enter__(self):
        self.handles = [layer.register_forward_hook(self._keep(name)) for name, layer in self.layers.items()]
        return self

    def _keep(self, name):
        def hook(_module, args, out):
            self.seen[name] = (args[0].detach().clone(), out.detach().clone())
        return hook

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("edit", [False, True])
def test_each_image_token_is_modulated_at_its_own_timestep(model, edit):
    """Left-half tokens are modulated as the stock model at t_left, right-half tokens at t_right,
    reference and text tokens as the stock model at the forward's (background) timestep; the final
    layer likewise, recomputed with ComfyUI's LastLayer on the same input."""
    dm = model.model.diffusion_model
    x, kwargs = noisy(), forward_kwargs(edit)
    t_left, t_right, carrier = 0.25, 0.9, 0.5
    stock_in = {}
    for t in (t_left, t_right, carrier):
        with Recorder(dm) as rec, torch.no_grad():
            dm(x, torch.tensor([t]), **kwargs)
        stock_in[t] = rec.seen
    inverse = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    inverse[..., SIZE // 2:] = 1
    with PerTokenTimestepsQwenImage(dm) as adapter, Recorder(dm) as rec, torch.no_grad():
        adapter.set_map(None, unique=torch.tensor([t_left, t_right]), inverse=inverse, rows=1)
        dm(x, torch.tensor([carrier]), **kwargs)
        adapter.set_map(None)
    tokens = (SIZE // 2) ** 2
    refs = (REF // 2) ** 2 if edit else 0
    left = (torch.arange(tokens) % (SIZE // 2)) < SIZE // 4
    image = rec.seen["image"][0]
    assert image.shape[1] == tokens + refs
    for mask, t in ((left, t_left), (~left, t_right)):
        assert torch.allclose(image[:, :tokens][:, mask], stock_in[t]["image"][0][:, :tokens][:, mask],
                              rtol=1e-5, atol=1e-6), t
        assert not torch.allclose(image[:, :tokens][:, mask], stock_in[carrier]["image"][0][:, :tokens][:, mask],
                                  rtol=1e-3, atol=1e-4), t
    assert torch.equal(image[:, tokens:], stock_in[carrier]["image"][0][:, tokens:])  # references: background
    assert torch.equal(rec.seen["text"][0], stock_in[carrier]["text"][0])
    # the final layer: ComfyUI's LastLayer on the input it got, at each token's own timestep
    final_in, final_out = rec.seen["final"]
    last_layer = type(dm.norm_out).forward
    with torch.no_grad():
        for t in (t_left, t_right, carrier):
            temb = dm.time_text_embed(torch.tensor([t]), final_in)
            want = last_layer(dm.norm_out, final_in, temb)
            mask = {t_left: left, t_right: ~left, carrier: torch.zeros(tokens, dtype=torch.bool)}[t]
            full = torch.cat([mask, torch.full((refs,), t == carrier)])
            assert torch.allclose(final_out[:, full], want[:, full], rtol=1e-5, atol=1e-6), t


def test_a_drawn_mask_reaches_the_transformer_as_the_schedules_token_map(model, monkeypatch):
    pos, neg = conds()
    steps = 5
    schedule = fixed_masks(1, SIZE, SIZE)  # top half, bin, k = 0.8
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsQwenImage)
    try:
        a = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=2.5, scheduler="simple", schedule=schedule)
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
        assert torch.equal(seen, token_index(want, 2).expand(2, -1).float()), f"step {i}"
        distinct = max(distinct, len(seen[0].unique()))
        assert seen[0, -1] == ms.timestep(sigmas[i:i + 1])[0]  # background tokens: the scheduler's own timestep
    assert distinct == 2, "the transformer never saw two timesteps"
    sync = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=2.5, scheduler="simple")
    assert a.shape == latent().shape and torch.isfinite(a).all() and rel_err(a, sync) > 1e-3


def test_edit_with_a_drawn_mask_differs_and_keeps_the_reference(model):
    """Qwen-Image-Edit with a drawn key mask: the result differs from synchronous sampling, and the
    reference latent still matters (it is read at the background's timestep)."""
    pos, neg = conds(edit=True)
    plain_pos, plain_neg = conds()
    kw = dict(seed=4, steps=3, cfg=2.5, scheduler="simple", schedule=fixed_masks(1, SIZE, SIZE))
    out = asyn(model, pos, neg, latent(), **kw)
    sync = asyn(model, pos, neg, latent(), **{**kw, "schedule": None})
    no_ref = asyn(model, plain_pos, plain_neg, latent(), **kw)
    assert torch.isfinite(out).all() and rel_err(out, sync) > 1e-3 and rel_err(out, no_ref) > 1e-3


def test_what_qwen_image_cannot_do_is_refused_by_name(model):
    """The sampler's family check (run before any step) names Qwen-Image for what it cannot do: the paper's
    reference mode (SD's DDIM). Every sampler runs on it (ComfyUI's own, per track)."""
    adapter = time_adapter(model.model.diffusion_model)
    ms = model.get_model_object("model_sampling")
    assert isinstance(adapter, PerTokenTimestepsQwenImage) and adapter.patch_size == 2
    for sampler in ("euler_ancestral", "ddpm"):
        AsynSampler(sampler, fixed_masks(1, SIZE, SIZE))._check_family(adapter, ms)
    with pytest.raises(ValueError, match="reference mode.*turn it off for Qwen-Image"):
        AsynSampler("ddim", fixed_masks(1, SIZE, SIZE), eta=1.0, reference=True)._check_family(adapter, ms)
    AsynSampler("dpmpp_2m", fixed_masks(1, SIZE, SIZE))._check_family(adapter, ms)


def test_nothing_outlives_a_failed_qwen_image_run(model):
    dm = model.model.diffusion_model
    pos, neg = conds(edit=True)
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
    assert not any("_modulate" in vars(block) for block in dm.transformer_blocks)
    assert "forward" not in vars(dm.norm_out)
    assert torch.equal(stock(model, pos, neg, latent(), seed=6, cfg=2.5, scheduler="simple", steps=3), before)


def test_the_node_samples_qwen_image_from_an_empty_latent(model, pack_nodes):
    """The Asynchronous KSampler node given a 4-D empty latent (EmptySD3LatentImage's): ComfyUI makes it
    one Wan 2.1 frame; a drawn mask, dpmpp_2m, the strip drawn."""
    pos, neg = conds()
    out = pack_nodes.AsynDMKSampler.execute(model, pos, neg, {"samples": torch.zeros(1, 16, 12, 20)}, 3, 3, 2.5,
                                            "dpmpp_2m", "simple", 1.0, "", 0.7, "bin", 1.0, "dynamic", 0.0, False,
                                            fixed_masks(1, 12, 20))
    samples, strip = out.args[0]["samples"], out.args[1]
    assert samples.shape == (1, 16, 1, 12, 20) and torch.isfinite(samples).all()
    assert strip.ndim == 4 and strip.shape[-1] == 3 and float(strip.std()) > 0


# ------------------------------------------------------------------------------------ key words
@pytest.fixture(scope="module")
def qwen_tokenizer():
    return comfy.text_encoders.qwen_image.QwenImageTokenizer()


@pytest.fixture(scope="module")
def qwen_tokens(qwen_tokenizer):
    return prompt_tokens(TokenizerOnly(qwen_tokenizer, ()), PROMPT)


def comfy_kept_positions(tokenized: dict, monkeypatch) -> list[int]:
    """The token positions ComfyUI's Qwen-Image text encoder keeps in its output: its own trimming
    code (QwenImageTEModel.encode_token_weights) run on an encoder output holding each position's index."""
    n = len(tokenized["qwen25_7b"][0])

    def positions(_self, _pairs):
        return torch.arange(n, dtype=torch.float32).view(1, n, 1), None, {"attention_mask": torch.ones(1, n)}

    monkeypatch.setattr(comfy.sd1_clip.SD1ClipModel, "encode_token_weights", positions)
    te = object.__new__(comfy.text_encoders.qwen_image.QwenImageTEModel)
    out, _, _ = comfy.text_encoders.qwen_image.QwenImageTEModel.encode_token_weights(te, tokenized)
    return out[0, :, 0].long().tolist()


def test_qwen_key_words_are_columns_of_the_template_trimmed_context(qwen_tokenizer, qwen_tokens, monkeypatch):
    """The context ComfyUI's encoder gives starts after the template's system prompt: every key word's
    columns are where its tokens (as Qwen2.5's BPE writes them mid-sentence, with the space, or first,
    without) sit among the positions ComfyUI keeps."""
    tokenized = qwen_tokenizer.tokenize_with_weights(PROMPT)
    ids = [t[0] for t in tokenized["qwen25_7b"][0]]
    kept = comfy_kept_positions(tokenized, monkeypatch)
    layout = PerTokenTimestepsQwenImage(build_qwen_image(depth=1).model.diffusion_model).text_layout(qwen_tokens)
    assert kept == list(range(template_end(ids), len(ids)))
    assert qwen_tokens.context_length(layout) == len(kept)
    hf = qwen_tokenizer.qwen25_7b.tokenizer
    for word, text in (("rabbit", " rabbit"), ("teddy bear", " teddy bear"), ("a", "a")):
        want_ids = hf(text)["input_ids"]
        cols = qwen_tokens.columns(word, layout)
        assert [ids[kept[c]] for c in cols] == want_ids, word
        assert cols == list(range(cols[0], cols[0] + len(want_ids))), word
    assert qwen_tokens.columns("a", layout) == [0]  # the first user token: the template's "user\n" is trimmed


def test_a_key_word_the_system_prompt_also_holds(qwen_tokenizer, qwen_tokens, monkeypatch):
    """"background" is in Qwen-Image's system prompt (trimmed from the context) and in the prompt: its
    columns are the prompt's, where ComfyUI's encoder keeps it."""
    tokenized = qwen_tokenizer.tokenize_with_weights(PROMPT)
    ids = [t[0] for t in tokenized["qwen25_7b"][0]]
    kept = comfy_kept_positions(tokenized, monkeypatch)
    layout = PerTokenTimestepsQwenImage(build_qwen_image(depth=1).model.diffusion_model).text_layout(qwen_tokens)
    want = qwen_tokenizer.qwen25_7b.tokenizer(" background")["input_ids"]
    assert set(want) <= set(ids[:template_end(ids)])  # the system prompt has it too
    cols = qwen_tokens.columns("background", layout)
    assert [ids[kept[c]] for c in cols] == want


class AttentionCalls:
    """An attention override (chained after the pack's observer) that keeps every call's q and k."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, func, *args, **kwargs):
        self.calls.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **kwargs)


def test_qwen_dynamic_masks_follow_the_joint_attention(qwen_tokens, monkeypatch):
    """The key pixels of step 1 are the threshold of the step-0 attention of the image tokens to the
    word's Qwen2.5 tokens, recomputed here from the model's own q and k; the transformer then sees
    two timesteps, and the result differs from synchronous sampling."""
    model = build_qwen_image(seed=1)
    layout = PerTokenTimestepsQwenImage(model.model.diffusion_model).text_layout(qwen_tokens)
    text = qwen_tokens.context_length(layout)
    pos = make_qwen_conditioning(tokens=text, seed=1)
    pos[0][1][KEY] = qwen_tokens
    calls = AttentionCalls()
    spy = model.clone()
    spy.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = calls
    made = []
    init = AsynSampler.__init__
    monkeypatch.setattr(AsynSampler, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsQwenImage)
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",), threshold=1.0)
    try:
        out = asyn(spy, pos, pos, latent(), seed=3, steps=4, cfg=1.0, scheduler="simple", schedule=schedule)
    finally:
        rec.handle.remove()
    blocks = len(model.model.diffusion_model.transformer_blocks)
    assert len(calls.calls) == 4 * blocks  # cfg 1: one forward per step, one joint attention per block
    cols = qwen_tokens.columns("rabbit", layout)
    image = (SIZE // 2) ** 2
    maps = []
    for q, k in calls.calls[:blocks]:
        logits = q[:, :, text:text + image].double() @ k[:, :, :text].double().transpose(-1, -2)
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


def test_qwen_key_words_through_the_nodes_static_masks_and_the_mask_node(qwen_tokenizer, pack_nodes):
    """What a Qwen-Image user does with key words: the Asynchronous KSampler node with a static mask
    (the synchronous pre-pass, then the asynchronous pass) and the Cross-Attention Mask node, on an
    empty 4-D latent that ComfyUI turns into one Wan 2.1 frame. The tokens are recorded by the pack as
    ComfyUI loads it, as CLIP Text Encode (AsynDM) records them."""
    schedules = importlib.import_module(f"{PACK_MODULE}.nodes.schedules")
    pack_tokens = importlib.import_module(f"{PACK_MODULE}.asyndm.comfy_adapter.tokens")
    qwen_tokens = pack_tokens.prompt_tokens(TokenizerOnly(qwen_tokenizer, ()), PROMPT)
    model = build_qwen_image(seed=2)
    layout = pack_class("families.qwen_image.PerTokenTimestepsQwenImage")(
        model.model.diffusion_model).text_layout(qwen_tokens)
    pos = make_qwen_conditioning(tokens=qwen_tokens.context_length(layout), seed=1)
    pos[0][1][KEY] = qwen_tokens
    neg = make_qwen_conditioning(seed=2)
    lat = {"samples": torch.zeros(1, 16, SIZE, SIZE)}
    args = (3, 3, 2.5, "euler", "simple", 1.0)
    sync = pack_nodes.AsynDMKSampler.execute(model, pos, neg, lat, *args, "", 0.7, "bin", 1.0, "dynamic", 0.0,
                                             False).args[0]["samples"]
    out = pack_nodes.AsynDMKSampler.execute(model, pos, neg, lat, *args, "rabbit, teddy bear", 0.7, "bin", 1.0,
                                            "static", 0.0, False)
    samples, strip = out.args[0]["samples"], out.args[1]
    assert samples.shape == (1, 16, 1, SIZE, SIZE) and torch.isfinite(samples).all() and rel_err(samples, sync) > 1e-3
    assert float(strip.std()) > 0
    masks, soft = schedules.AsynDMCrossAttentionMask.execute(model, pos, neg, lat, 3, 3, 2.5, "euler", "simple",
                                                             "rabbit, bear", 1.0).args[:2]
    assert masks.shape == (2, SIZE * 8, SIZE * 8) and soft.shape == masks.shape
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and 0 < float(masks.mean()) < 1
