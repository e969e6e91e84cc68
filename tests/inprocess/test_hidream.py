"""HiDream (comfy.ldm.hidream.model): per-token timesteps and key words through its family adapter.

The models are random-weight instances of ComfyUI's own HiDream config and transformer class
(tests/factory_hidream.py: 2 heads of 32 channels, dual-stream then single-stream blocks with the
MoE feed-forward), so every block forward the adapter swaps and every layer it hooks is ComfyUI's
code. Key-word columns come from ComfyUI's own HiDreamTokenizer (CLIP-L, CLIP-G, T5-XXL and
Llama-3.1); its encoders are too large to build here, so the T5 context and the Llama hidden states
are random, of the exact lengths that tokenizer gives.
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.samplers
import comfy.text_encoders.hidream
import pytest
import torch

from asyndm.comfy_adapter.families import time_adapter
from asyndm.comfy_adapter.families.hidream import PerTokenTimestepsHiDream
from asyndm.comfy_adapter.sampler import AsynSampler, patch_constant
from asyndm.comfy_adapter.tokens import KEY, prompt_tokens
from asyndm.masks import item_masks
from asyndm.schedule_spec import AsynSchedule
from asyndm.schedules import timestep_maps
from asyndm.sigma_map import state_to_sigma
from tests.factory_hidream import build_hidream, make_hidream_conditioning
from tests.inprocess.sampling import SAME_AS_KSAMPLER, TokenTimesteps, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import TokenizerOnly

SIZE = 16  # latent 16x16 -> 8x8 tokens
PROMPT = "rabbit wearing sunglasses, next to a teddy bear"  # the key word first: see the Llama test below


@pytest.fixture(scope="module")
def model():
    return build_hidream()


@pytest.fixture(scope="module")
def hd_tokens():
    return prompt_tokens(TokenizerOnly(comfy.text_encoders.hidream.HiDreamTokenizer(), ("l", "g", "t5xxl", "llama")), PROMPT)


def conds(**kw):
    return make_hidream_conditioning(seed=1, **kw), make_hidream_conditioning(seed=2, **kw)


def latent(h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.zeros(1, 16, h, w)


def forward_kwargs(cond, batch: int = 1) -> dict:
    context, extra = cond[0]
    return {"context": context.expand(batch, -1, -1), "y": extra["pooled_output"].expand(batch, -1),
            "encoder_hidden_states_llama3": extra["conditioning_llama3"].expand(batch, -1, -1, -1)}


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("cfg", [1.0, 3.5])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_no_key_pixels_is_the_ksampler_bit_for_bit(model, sampler, cfg, case):
    pos, neg = conds()
    kw = dict(seed=4, cfg=cfg, sampler=sampler, scheduler="simple", steps=3)
    a = stock(model, pos, neg, latent(), **kw)
    b = asyn(model, pos, neg, latent(), schedule=SAME_AS_KSAMPLER[case](1, SIZE, SIZE), **kw)
    assert torch.equal(a, b), rel_err(b, a)


def test_the_registry_picks_the_hidream_adapter(model):
    adapter = time_adapter(model.model.diffusion_model)
    assert isinstance(adapter, PerTokenTimestepsHiDream) and adapter.family == "HiDream" and adapter.patch_size == 2


def test_the_per_token_blocks_compute_what_the_stock_blocks_do(model):
    """Every image token mapped to the forward's own t: the swapped block forwards and the final
    layer's per-token modulation give the stock forward; with the map cleared the originals run."""
    dm = model.model.diffusion_model
    x = torch.randn(2, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(conds()[0], 2)
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        want = dm(x, t, **kwargs)
        with PerTokenTimestepsHiDream(dm) as adapter:
            adapter.set_map(None, torch.tensor([700.0]), torch.zeros(1, SIZE, SIZE, dtype=torch.long), rows=2)
            got = dm(x, t, **kwargs)
            fired = list(adapter._fired)
            adapter.set_map(None)
            plain = dm(x, t, **kwargs)
    assert fired == [1] * (len(dm.double_stream_blocks) + len(dm.single_stream_blocks) + 1)
    assert adapter.table_builds == 1
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rel_err(got, want)
    assert torch.equal(plain, want)


class Inputs:
    """The first input of some layers at one forward, by name."""

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


T_LEFT, T_RIGHT, CARRIER = 250.0, 900.0, 500.0


def modulated(dm, layers, kwargs, x, *, per_token: bool):
    """The layers' inputs at the stock timesteps (dict by t) or with the split map at CARRIER."""
    if not per_token:
        out = {}
        for t in (T_LEFT, T_RIGHT, CARRIER):
            with Inputs(layers) as rec, torch.no_grad():
                dm(x, torch.tensor([t]), **kwargs)
            out[t] = rec.seen
        return out
    with PerTokenTimestepsHiDream(dm) as adapter, Inputs(layers) as rec, torch.no_grad():
        adapter.set_map(None, unique=torch.tensor([T_LEFT, T_RIGHT]), inverse=split_map(), rows=1)
        dm(x, torch.tensor([CARRIER]), **kwargs)
        adapter.set_map(None)
    return rec.seen


def check_split(image, want_image, cols: int = SIZE // 2) -> None:
    """Left-half latent tokens at T_LEFT, right-half at T_RIGHT (token rows of ``cols`` tokens)."""
    left = (torch.arange(image.shape[1]) % cols) < SIZE // 4
    for mask, t in ((left, T_LEFT), (~left, T_RIGHT)):
        assert torch.allclose(image[:, mask], want_image[t][:, mask], rtol=1e-5, atol=1e-6), t
        assert not torch.allclose(image[:, mask], want_image[CARRIER][:, mask], rtol=1e-3, atol=1e-4), t


@pytest.mark.parametrize("first", ["dual", "single"])
def test_each_image_token_is_modulated_at_its_own_timestep(first):
    """At the first block's attention input (the tokens there do not depend on the timestep):
    left-half tokens modulated exactly as the stock model at t_left, right-half at t_right, the
    text (T5 and Llama) as the stock model at the carrier timestep. A dual-stream block's image and
    text query projections, or, in a model with single-stream blocks only, [image, T5, Llama, Llama]."""
    model = build_hidream(n_double=2 if first == "dual" else 0)
    dm = model.model.diffusion_model
    attn = (dm.double_stream_blocks if first == "dual" else dm.single_stream_blocks)[0].block.attn1
    layers = {"image": attn.to_q, "text": attn.to_q_t} if first == "dual" else {"all": attn.to_q}
    x = torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(conds()[0])
    want = modulated(dm, layers, kwargs, x, per_token=False)
    got = modulated(dm, layers, kwargs, x, per_token=True)
    image_tokens = (SIZE // 2) ** 2
    text = kwargs["context"].shape[1] + 2 * kwargs["encoder_hidden_states_llama3"].shape[2]
    if first == "dual":
        assert got["text"].shape[1] == text and torch.equal(got["text"], want[CARRIER]["text"])
        check_split(got["image"], {t: w["image"] for t, w in want.items()})
    else:
        assert got["all"].shape[1] == image_tokens + text
        assert torch.equal(got["all"][:, image_tokens:], want[CARRIER]["all"][:, image_tokens:])
        check_split(got["all"][:, :image_tokens], {t: w["all"][:, :image_tokens] for t, w in want.items()})


def test_the_edit_image_of_hidream_e1_keeps_the_background(model):
    """HiDream E1 puts an edit image to the right of the latent (image_cond): in every token row the
    latent's tokens follow the map, the edit image's take the carrier (stock) modulation."""
    dm = model.model.diffusion_model
    x = torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(conds()[0])
    kwargs["image_cond"] = torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    layers = {"image": dm.double_stream_blocks[0].block.attn1.to_q}
    want = {t: w["image"] for t, w in modulated(dm, layers, kwargs, x, per_token=False).items()}
    got = modulated(dm, layers, kwargs, x, per_token=True)["image"]
    cols = SIZE  # 8 latent tokens, then 8 edit-image tokens per row
    assert got.shape[1] == (SIZE // 2) * cols
    edit = (torch.arange(got.shape[1]) % cols) >= SIZE // 2
    assert torch.equal(got[:, edit], want[CARRIER][:, edit])
    check_split(got[:, ~edit], {t: w[:, ~edit] for t, w in want.items()})


def test_the_final_modulation_is_per_token(model):
    """The final layer's linear gets norm_final(x) modulated per token by the stock adaLN at each
    token's own timestep (x: what the blocks hand on, whatever the timesteps before)."""
    dm = model.model.diffusion_model
    x = torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    kwargs = forward_kwargs(conds()[0])
    pooled = dm.p_embedder(kwargs["y"])
    with PerTokenTimestepsHiDream(dm) as adapter, torch.no_grad(), \
            Inputs({"x": dm.final_layer, "linear": dm.final_layer.linear}) as rec:
        adapter.set_map(None, unique=torch.tensor([T_LEFT, T_RIGHT]), inverse=split_map(), rows=1)
        dm(x, torch.tensor([CARRIER]), **kwargs)
        adapter.set_map(None)
    want = {}
    with torch.no_grad():
        for t in (T_LEFT, T_RIGHT, CARRIER):
            vec = dm.t_embedder(torch.tensor([t]), torch.float32) + pooled
            shift, scale = dm.final_layer.adaLN_modulation(vec[:, None]).chunk(2, dim=-1)
            want[t] = dm.final_layer.norm_final(rec.seen["x"]) * (1 + scale) + shift
    check_split(rec.seen["linear"], want)


def test_a_drawn_mask_reaches_the_transformer_as_the_schedules_token_map(model, monkeypatch):
    pos, neg = conds()
    steps = 3
    schedule = fixed_masks(1, SIZE, SIZE)  # top half, bin, k = 0.8
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsHiDream)
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
        assert seen.shape[0] == 2
        sigma = state_to_sigma(states[i].float(), sigmas, sigma_top=float(ms.sigma_max))
        want = ms.timestep(sigma.flatten()).view(1, SIZE, SIZE)
        assert torch.equal(seen, want[:, ::2, ::2].reshape(1, -1).expand(2, -1).float()), f"step {i}"
        distinct = max(distinct, len(seen[0].unique()))
        assert seen[0, -1] == ms.timestep(sigmas[i:i + 1])[0]  # background tokens: the scheduler's own timestep
    assert distinct == 2, "the transformer never saw two timesteps"
    sync = asyn(model, pos, neg, latent(), seed=4, steps=steps, cfg=3.5, scheduler="simple")
    assert torch.isfinite(a).all() and rel_err(a, sync) > 1e-3


def test_nothing_outlives_a_failed_hidream_run(model):
    dm = model.model.diffusion_model
    pos, neg = conds()
    kw = dict(seed=6, cfg=3.5, scheduler="simple", steps=3)
    before = stock(model, pos, neg, latent(), **kw)
    hooks_before = hook_state(model.model)

    def interrupt(step, x0, x, total):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        asyn(model, pos, neg, latent(), schedule=fixed_masks(1, SIZE, SIZE), callback=interrupt, **kw)
    comfy.model_management.interrupt_current_processing(False)
    assert hook_state(model.model) == hooks_before
    blocks = [b.block for b in [*dm.double_stream_blocks, *dm.single_stream_blocks]]
    assert not any("forward" in vars(block) for block in blocks)
    assert torch.equal(stock(model, pos, neg, latent(), **kw), before)


def test_e1_and_odd_sizes_sample_through_the_node(model, pack_nodes):
    """A 9x11 latent through the Asynchronous KSampler node with a drawn mask; an E1-style edit image
    (concat_latent_image): KSampler's result with no key pixels, a different finite one with a mask."""
    pos, neg = conds()
    out = pack_nodes.AsynDMKSampler.execute(model, pos, neg, {"samples": latent(9, 11)}, 3, 3, 3.5, "euler",
                                            "simple", 1.0, "", 0.7, "bin", 1.0, "dynamic", 0.0, False,
                                            fixed_masks(1, 9, 11))
    samples, strip = out.args[0]["samples"], out.args[1]
    assert samples.shape == (1, 16, 9, 11) and torch.isfinite(samples).all() and float(strip.std()) > 0
    edit = torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    pos_e, neg_e = ([[c, {**extra, "concat_latent_image": edit}]] for [[c, extra]] in (pos, neg))
    kw = dict(seed=2, cfg=3.5, scheduler="simple", steps=3)
    plain = stock(model, pos_e, neg_e, latent(), **kw)
    assert rel_err(plain, stock(model, pos, neg, latent(), **kw)) > 1e-4  # the edit image is read
    assert torch.equal(asyn(model, pos_e, neg_e, latent(), schedule=SAME_AS_KSAMPLER["empty mask"](1, SIZE, SIZE),
                            **kw), plain)
    masked = asyn(model, pos_e, neg_e, latent(), schedule=fixed_masks(1, SIZE, SIZE), **kw)
    assert torch.isfinite(masked).all() and rel_err(masked, plain) > 1e-3


def test_hidream_key_words_are_t5_then_llama_columns(model, hd_tokens):
    """The joint sequence's text is [T5 (the 128-token context), Llama (start token dropped), the same
    Llama again (each block's own layer)]; the layout keeps the context's width (128)."""
    adapter = PerTokenTimestepsHiDream(model.model.diffusion_model)
    layout = adapter.text_layout(hd_tokens)
    t5, llama = hd_tokens.streams["t5xxl"], hd_tokens.streams["llama"]
    assert len(t5.chunks[0]) == 128 and hd_tokens.context_length(layout) == 128
    assert llama.chunks[0][0] == 128000 and len(llama.chunks[0]) >= 128
    per_copy = llama.length - 1
    # "rabbit" opens the prompt: T5 column 0 (no start token); Llama column 1 of the stream, 0 after
    # the dropped start token, in both copies after the 128 T5 columns
    assert hd_tokens.columns("rabbit", layout) == [0, 128, 128 + per_copy]
    assert [t5.chunks[0][0]] == t5.word_ids["rabbit"] and [llama.chunks[0][1]] == llama.word_ids["rabbit"]
    # Later words: T5 finds them; Llama's BPE spells a word inside the prompt with its leading space,
    # unlike the word alone, so the recorded word ids do not match there (T5 columns only).
    sunglasses = hd_tokens.columns("sunglasses", layout)
    assert sunglasses and max(sunglasses) < 128
    # without a T5 encoder its 128 columns are zeros: the words come from the Llama copies only
    no_t5 = prompt_tokens(TokenizerOnly(comfy.text_encoders.hidream.HiDreamTokenizer(), ("l", "g", "llama")), PROMPT)
    layout = adapter.text_layout(no_t5)
    assert no_t5.context_length(layout) == 128 and no_t5.columns("rabbit", layout) == [128, 128 + per_copy]


class AttentionCalls:
    """An attention override (chained after the pack's observer) that keeps every call's q, k and heads."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, func, *args, **kwargs):
        self.calls.append((args[0].detach().clone(), args[1].detach().clone(), args[3]))
        return func(*args, **kwargs)


def test_hidream_dynamic_masks_follow_the_joint_attention(model, hd_tokens, monkeypatch):
    """The key pixels of step 1 are the threshold of the step-0 attention of the image tokens (first
    in HiDream's sequence) to the word's T5 and Llama tokens, recomputed here from the model's own q
    and k; the transformer then sees two timesteps, and the result differs from synchronous sampling."""
    llama_len = hd_tokens.streams["llama"].length - 1
    pos = make_hidream_conditioning(t5=128, llama=llama_len, seed=1)
    pos[0][1][KEY] = hd_tokens
    calls = AttentionCalls()
    spy = model.clone()
    spy.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = calls
    made = []
    init = AsynSampler.__init__
    monkeypatch.setattr(AsynSampler, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsHiDream)
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",), threshold=1.0)
    steps = 4  # step 0: the initial masks; step 1: the first attention masks; two tracks from step 2
    try:
        out = asyn(spy, pos, pos, latent(), seed=3, steps=steps, cfg=1.0, scheduler="simple", schedule=schedule)
    finally:
        rec.handle.remove()
    dm = model.model.diffusion_model
    per_forward = len(dm.double_stream_blocks) + len(dm.single_stream_blocks)
    assert len(calls.calls) == steps * per_forward  # cfg 1: one forward per step
    image, text = (SIZE // 2) ** 2, 128 + 2 * llama_len
    cols = hd_tokens.columns("rabbit", PerTokenTimestepsHiDream(dm).text_layout(hd_tokens))
    assert cols == [0, 128, 128 + llama_len]
    maps = []
    for q, k, heads in calls.calls[:per_forward]:
        assert q.shape[1] == image + text
        q4 = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2).double()
        k4 = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2).double()
        logits = q4[:, :, :image] @ k4[:, :, image:].transpose(-1, -2)
        probs = torch.softmax(logits / math.sqrt(q4.shape[-1]), dim=-1).mean(dim=1)
        maps.append(probs[..., cols].mean(-1))
    attn = torch.stack(maps).mean(0)[..., None].float()
    masks = item_masks(attn, [0.7], threshold=1.0, size=(SIZE, SIZE), grid=(SIZE // 2, SIZE // 2))
    want = patch_constant(masks[:, 0] * 0.7, 2)
    got = made[-1].record.priorities[1]
    assert 0 < int((want > 0).sum()) < SIZE * SIZE
    assert torch.equal(got, want)
    assert max(len(step.unique()) for step in rec.steps) == 2
    sync = asyn(model, pos, pos, latent(), seed=3, steps=steps, cfg=1.0, scheduler="simple")
    assert torch.isfinite(out).all() and rel_err(out, sync) > 1e-3
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


def test_key_words_on_hidream_e1_are_refused_by_name(model, hd_tokens):
    llama_len = hd_tokens.streams["llama"].length - 1
    pos = make_hidream_conditioning(t5=128, llama=llama_len, seed=1)
    pos[0][1][KEY] = hd_tokens
    pos[0][1]["concat_latent_image"] = torch.zeros(1, 16, SIZE, SIZE)
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",))
    with pytest.raises(ValueError, match="key words are not supported on HiDream E1.*masks"):
        asyn(model, pos, pos, latent(), seed=3, steps=2, cfg=1.0, scheduler="simple", schedule=schedule)
