"""Key words on Flux and SD3: T5 / CLIP token columns and masks from the joint attention.

Tokenizers are ComfyUI's own (FluxTokenizer: CLIP-L + T5 SentencePiece; SD3Tokenizer: CLIP-L/G +
T5). T5-XXL and CLIP-G cannot be built on these machines, so where their output is needed the text
context is random of the exact length the tokenizer gives; the SD3 test with an encoder uses a
real SD3 CLIP holding only CLIP-L (a layout ComfyUI supports), through the pack's text node.
"""

from __future__ import annotations

import math

import comfy.sd
import comfy.text_encoders.flux
import comfy.text_encoders.sd3_clip
import pytest
import torch

from asyndm.comfy_adapter.families.flux import PerTokenTimesteps
from asyndm.comfy_adapter.families.mmdit import PerTokenTimestepsMMDiT
from asyndm.comfy_adapter.joint_attention import JointAttentionObserver
from asyndm.comfy_adapter.sampler import AsynSampler, patch_constant
from asyndm.comfy_adapter.tokens import KEY, UnknownWordError, prompt_tokens
from asyndm.masks import item_masks
from asyndm.schedule_spec import AsynSchedule
from tests.inprocess.sampling import TokenTimesteps, asyn, rel_err
from tests.model_factory import FLUX_TEXT_DIM, TokenizerOnly, build_flux, build_sd3, make_flux_conditioning

PROMPT = "a photo of a rabbit wearing sunglasses, next to a teddy bear"
SIZE = 16


@pytest.fixture(scope="module")
def flux_tokens():
    return prompt_tokens(TokenizerOnly(comfy.text_encoders.flux.FluxTokenizer(), ("l", "t5xxl")), PROMPT)


def test_flux_key_words_are_t5_columns(flux_tokens):
    t5 = flux_tokens.streams["t5xxl"]
    assert flux_tokens.context_length(["t5xxl"]) == len(t5.chunks[0]) >= 256  # ComfyUI pads Flux's T5 to 256
    for word in ("rabbit", "sunglasses", "teddy bear"):
        cols = flux_tokens.columns(word, ["t5xxl"])
        ids = [i for w in word.split() for i in t5.word_ids[w]]
        assert [t5.chunks[0][c] for c in cols] == ids and cols == list(range(cols[0], cols[0] + len(ids)))
    # SentencePiece, no start token: "a" is "▁", "a"; "photo" is "▁photo", the third token
    assert flux_tokens.columns("photo", ["t5xxl"]) == [2]
    with pytest.raises(UnknownWordError, match="rabbit, wearing, sunglasses"):
        flux_tokens.columns("giraffe", ["t5xxl"])


@pytest.mark.parametrize("encoders, want", [
    (("l", "g", "t5xxl"), "clip and t5"), (("l", "g"), "clip"), (("t5xxl",), "t5"), (("l",), "clip"),
])
def test_sd3_key_words_are_clip_then_t5_columns(encoders, want):
    tokens = prompt_tokens(TokenizerOnly(comfy.text_encoders.sd3_clip.SD3Tokenizer(), encoders), PROMPT)
    adapter = PerTokenTimestepsMMDiT(build_sd3("sd3").model.diffusion_model)
    layout = adapter.text_layout(tokens)
    clip_len, t5_len = len(tokens.streams["l"].chunks[0]), len(tokens.streams["t5xxl"].chunks[0])
    cols = tokens.columns("rabbit", layout)
    # CLIP: start token, a, photo, of, a, rabbit -> 5; T5: ▁, a, ▁photo, ▁of, ▁, a, ▁rabbit -> 6 (after the CLIP part)
    expected = {"clip and t5": ([5, clip_len + 6], clip_len + t5_len), "clip": ([5], clip_len), "t5": ([6], t5_len)}
    assert (cols, tokens.context_length(layout)) == expected[want]


def test_the_observer_computes_image_to_text_attention():
    """Against a float64 computation: softmax over the text keys of every image query, mean over
    heads, mean over each word's columns; only conditional rows; the attention result untouched."""
    gen = torch.Generator().manual_seed(0)
    text, image, heads, dim, batch = 6, 12, 3, 8, 2

    class Lengths:
        forward_tokens = (text, image, (4, 6))

    observer = JointAttentionObserver(Lengths(), (4, 6), 2, batch, {"u": [[1], [3, 4]]})
    observer.enabled = True
    q = torch.randn(2 * batch, heads, text + image, dim, generator=gen)  # rows: uncond chunk, cond chunk
    k = torch.randn(2 * batch, heads, text + image, dim, generator=gen)
    options = {"cond_or_uncond": [1, 0], "uuids": ["n", "u"]}
    seen = []
    out = observer(lambda *a, **kw: seen.append(a) or "attention", q, k, q, heads, skip_reshape=True,
                   transformer_options=options)
    assert out == "attention" and seen[0][0] is q
    cond = slice(batch, 2 * batch)
    logits = q[cond, :, text:].double() @ k[cond, :, :text].double().transpose(-1, -2) / math.sqrt(dim)
    probs = torch.softmax(logits, dim=-1).mean(dim=1)
    want = torch.stack([probs[..., [1]].mean(-1), probs[..., [3, 4]].mean(-1)], dim=-1)
    assert torch.allclose(observer.mean().double(), want, atol=1e-6)
    # the (B, L, H*d) layout of SD3's calls gives the same
    flat = JointAttentionObserver(Lengths(), (4, 6), 2, batch, {"u": [[1], [3, 4]]})
    flat.enabled = True
    flat(lambda *a, **kw: None, q.transpose(1, 2).reshape(2 * batch, text + image, -1),
         k.transpose(1, 2).reshape(2 * batch, text + image, -1), None, heads, transformer_options=options)
    assert torch.allclose(flat.mean().double(), want, atol=1e-6)
    # the same sequence with the image first
    first = JointAttentionObserver(Lengths(), (4, 6), 2, batch, {"u": [[1], [3, 4]]}, image_first=True)
    first.enabled = True
    swap = torch.cat([torch.arange(text, text + image), torch.arange(text)])
    first(lambda *a, **kw: None, q[:, :, swap], k[:, :, swap], None, heads, skip_reshape=True,
          transformer_options=options)
    assert torch.allclose(first.mean().double(), want, atol=1e-6)
    # image-only calls (SD3.5 medium's self-attention) are not joint attention
    flat.reset()
    flat(lambda *a, **kw: None, q[:, :, text:], k[:, :, text:], None, heads, skip_reshape=True,
         transformer_options=options)
    assert flat.mean() is None


class AttentionCalls:
    """An attention override (chained after the pack's observer) that keeps every call's q, k."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, func, *args, **kwargs):
        self.calls.append((args[0].detach().clone(), args[1].detach().clone(), kwargs.get("skip_reshape", False)))
        return func(*args, **kwargs)


def test_flux_dynamic_masks_follow_the_joint_attention(flux_tokens, monkeypatch):
    """The key pixels of step 1 are the threshold of the step-0 attention of the image tokens to the
    word's T5 tokens, recomputed here from the model's own q and k; the transformer then sees two
    timesteps, and the result differs from synchronous sampling."""
    model = build_flux(True)
    text = flux_tokens.context_length(["t5xxl"])
    pos = make_flux_conditioning(tokens=text, seed=1)
    pos[0][1][KEY] = flux_tokens
    calls = AttentionCalls()
    spy = model.clone()
    spy.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = calls
    made = []
    init = AsynSampler.__init__
    monkeypatch.setattr(AsynSampler, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimesteps)
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",), threshold=1.0)
    try:
        out = asyn(spy, pos, pos, torch.zeros(1, 16, SIZE, SIZE), seed=3, steps=4, cfg=1.0, scheduler="simple",
                   schedule=schedule)
    finally:
        rec.handle.remove()
    double, single = len(model.model.diffusion_model.double_blocks), len(model.model.diffusion_model.single_blocks)
    assert len(calls.calls) == 4 * (double + single)  # cfg 1: one forward per step
    cols = flux_tokens.columns("rabbit", ["t5xxl"])
    image = (SIZE // 2) ** 2
    maps = []
    for q, k, _ in calls.calls[: double + single]:
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
    sync = asyn(model, pos, pos, torch.zeros(1, 16, SIZE, SIZE), seed=3, steps=4, cfg=1.0, scheduler="simple")
    assert torch.isfinite(out).all() and rel_err(out, sync) > 1e-3
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


def test_a_conditioning_that_does_not_match_its_tokens_is_refused(flux_tokens):
    model = build_flux(False)
    pos = make_flux_conditioning(tokens=77, seed=1, guidance=None)
    pos[0][1][KEY] = flux_tokens
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",))
    with pytest.raises(ValueError, match=r"has 77 tokens but its recorded tokens fill 256 on Flux.*CLIP Text Encode \(AsynDM\)"):
        asyn(model, pos, pos, torch.zeros(1, 16, SIZE, SIZE), cfg=1.0, scheduler="simple", schedule=schedule)


@pytest.fixture(scope="module")
def sd3_clip_l(sd15_checkpoint):
    """A real SD3 CLIP object holding only CLIP-L (the random SD1.5 checkpoint's text encoder)."""
    sd = sd15_checkpoint[1].get_sd()
    clip_l = {k[len("clip_l.transformer."):]: v for k, v in sd.items() if k.startswith("clip_l.transformer.")}
    return comfy.sd.load_text_encoder_state_dicts([clip_l], clip_type=comfy.sd.CLIPType.SD3)


def test_sd3_key_words_from_the_text_node_dynamic_static_and_the_mask_node(sd3_clip_l, pack_nodes):
    """What an SD3 user does: CLIP Text Encode (AsynDM) on an SD3 CLIP, key words on the
    Asynchronous KSampler (dynamic and static masks), and the Cross-Attention Mask node."""
    import importlib

    from tests.inprocess.conftest import PACK_MODULE

    schedules = importlib.import_module(f"{PACK_MODULE}.nodes.schedules")
    model = build_sd3("large", text_dim=4096, pooled_dim=2048)
    pos = pack_nodes.AsynDMTextEncode.execute(sd3_clip_l, "a photo of a rabbit next to a teddy bear").args[0]
    neg = pack_nodes.AsynDMTextEncode.execute(sd3_clip_l, "").args[0]
    assert pos[0][0].shape == (1, 77, 4096)
    lat = {"samples": torch.zeros(1, 16, SIZE, SIZE)}
    args = (3, 4, 4.5, "euler", "simple", 1.0)
    sync = pack_nodes.AsynDMKSampler.execute(model, pos, neg, lat, *args, "", 0.7, "bin", 1.0, "dynamic", 0.0,
                                             False).args[0]["samples"]
    for mode in ("dynamic", "static"):
        out = pack_nodes.AsynDMKSampler.execute(model, pos, neg, lat, *args, "rabbit, teddy bear", 0.7, "bin", 1.0,
                                                mode, 0.0, False)
        samples, strip = out.args[0]["samples"], out.args[1]
        assert torch.isfinite(samples).all() and rel_err(samples, sync) > 1e-3, mode
        assert float(strip.std()) > 0
    masks, soft = schedules.AsynDMCrossAttentionMask.execute(model, pos, neg, lat, 3, 4, 4.5, "euler", "simple",
                                                             "rabbit, bear", 1.0).args[:2]
    assert masks.shape == (2, SIZE * 8, SIZE * 8) and soft.shape == masks.shape
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and 0 < float(masks.mean()) < 1
    with pytest.raises(ValueError, match="key word 'giraffe' is not in the prompt; its words are: a, photo, of"):
        pack_nodes.AsynDMKSampler.execute(model, pos, neg, lat, *args, "giraffe", 0.7, "bin", 1.0, "dynamic", 0.0,
                                          False)


def test_flux_text_width_is_shrunk_consistently():
    assert FLUX_TEXT_DIM == build_flux(True).model.diffusion_model.txt_in.in_features


def test_segments_drop_a_template_and_pad_in_front(flux_tokens):
    """A stream whose first tokens the encoder trims (a chat template) and that is left-padded: the
    word is searched after the dropped part and its column moves by pad - drop."""
    from asyndm.comfy_adapter.tokens import Segment

    plain = flux_tokens.columns("rabbit", ["t5xxl"])[0]
    length = flux_tokens.context_length(["t5xxl"])
    seg = Segment("t5xxl", drop_front=2, pad_front=5)
    assert flux_tokens.columns("rabbit", [seg]) == [plain - 2 + 5]
    assert flux_tokens.context_length([seg]) == length - 2 + 5
    # "a" is at columns 0-1 and again later: a dropped first occurrence is not used
    assert flux_tokens.columns("a", [Segment("t5xxl", drop_front=1)]) == [3, 4]
    with pytest.raises(UnknownWordError, match="not found as consecutive tokens"):
        flux_tokens.columns("rabbit", [Segment("t5xxl", keep=3)])


def test_a_capitalised_prompt_word_is_found_with_a_case_sensitive_tokenizer():
    """T5 spells "Rabbit" and "rabbit" differently: the word is tokenized as the prompt spells it."""
    tokens = prompt_tokens(TokenizerOnly(comfy.text_encoders.flux.FluxTokenizer(), ("l", "t5xxl")),
                           "A Rabbit wearing Sunglasses")
    t5 = tokens.streams["t5xxl"]
    for word in ("rabbit", "Sunglasses"):
        cols = tokens.columns(word, ["t5xxl"])
        assert [t5.chunks[0][c] for c in cols] == t5.word_ids[word.lower()]
    lower = prompt_tokens(TokenizerOnly(comfy.text_encoders.flux.FluxTokenizer(), ("l", "t5xxl")), "a rabbit")
    assert lower.streams["t5xxl"].word_ids["rabbit"] != t5.word_ids["rabbit"]  # the case mattered
