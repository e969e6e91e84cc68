"""Chroma and Chroma Radiance: per-token timesteps through the Chroma family adapter.

The models are random-weight instances of ComfyUI's own Chroma / ChromaRadiance configs and
classes (tests/factory_flux_family.py: 2 double and 2 single blocks (Radiance: 1), width 64, a
2-layer approximator), so everything the adapter hooks is ComfyUI's code.
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.samplers
import comfy.text_encoders.pixart_t5
import pytest
import torch

from asyndm.comfy_adapter.families import time_adapter
from asyndm.comfy_adapter.families.chroma import MOD_INDEX_LENGTH, PerTokenTimestepsChroma, image_positions
from asyndm.comfy_adapter.sampler import AsynSampler, patch_constant
from asyndm.comfy_adapter.tokens import KEY, prompt_tokens
from asyndm.masks import item_masks
from asyndm.schedule_spec import AsynSchedule
from asyndm.schedules import timestep_maps
from asyndm.sigma_map import state_to_sigma
from tests.factory_flux_family import build_chroma, build_chroma_radiance, make_chroma_conditioning
from tests.inprocess.sampling import SAME_AS_KSAMPLER, TokenTimesteps, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import TokenizerOnly

PROMPT = "a photo of a rabbit wearing sunglasses, next to a teddy bear"
# variant -> (latent channels, latent side, patch): Chroma 16x16 latent in 2x2 patches; Radiance 48x48 px in 16x16
SHAPES = {"chroma": (16, 16, 2), "radiance": (3, 48, 16)}


@pytest.fixture(scope="module")
def models():
    return {"chroma": build_chroma(), "radiance": build_chroma_radiance()}


def conds(tokens: int = 12):
    return make_chroma_conditioning(tokens=tokens, seed=1), make_chroma_conditioning(tokens=tokens, seed=2)


def latent(variant: str) -> torch.Tensor:
    channels, side, _ = SHAPES[variant]
    return torch.zeros(1, channels, side, side)


def test_the_family_is_chroma_and_its_patch(models):
    for variant, (_, _, patch) in SHAPES.items():
        adapter = time_adapter(models[variant].model.diffusion_model)
        assert isinstance(adapter, PerTokenTimestepsChroma) and adapter.patch_size == patch
        assert adapter.family == {"chroma": "Chroma", "radiance": "Chroma Radiance"}[variant]


@pytest.mark.parametrize("variant", list(SHAPES))
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("cfg", [1.0, 3.5])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_no_key_pixels_is_the_ksampler_bit_for_bit(models, variant, sampler, cfg, case):
    model = models[variant]
    pos, neg = conds()
    side = SHAPES[variant][1]
    kw = dict(seed=4, cfg=cfg, sampler=sampler, scheduler="simple")
    a = stock(model, pos, neg, latent(variant), **kw)
    b = asyn(model, pos, neg, latent(variant), schedule=SAME_AS_KSAMPLER[case](1, side, side), **kw)
    assert torch.equal(a, b), rel_err(b, a)


def forward_kwargs(batch: int, guidance: list[float]) -> dict:
    pos, _ = conds()
    return {"context": pos[0][0].expand(batch, -1, -1), "guidance": torch.tensor(guidance)}


def test_image_positions_are_what_get_modulations_slices(models):
    """The table's columns are the approximator positions of the single blocks, the double blocks'
    image streams and the final layer, in get_modulations' own layout."""
    dm = models["chroma"].model.diffusion_model
    mods = torch.arange(MOD_INDEX_LENGTH, dtype=torch.float32).view(1, -1, 1)
    pos = image_positions(dm.params.depth, dm.params.depth_single_blocks)
    seen = []
    for i in range(dm.params.depth_single_blocks):
        m = dm.get_modulations(mods, "single", idx=i)
        seen += [m.shift, m.scale, m.gate]
    for i in range(dm.params.depth):
        m1, m2 = dm.get_modulations(mods, "double_img", idx=i)
        seen += [m1.shift, m1.scale, m1.gate, m2.shift, m2.scale, m2.gate]
    seen += list(dm.get_modulations(mods, "final"))
    assert [int(s.item()) for s in seen] == pos


@pytest.mark.parametrize("variant", list(SHAPES))
def test_a_constant_map_is_the_stock_forward(models, variant):
    """Every image token mapped to the forward's own t (rows with two guidance values): the hooked
    blocks and the recomputed final layer give the stock output; with the map cleared nothing changes."""
    dm = models[variant].model.diffusion_model
    channels, side, _ = SHAPES[variant]
    x = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(2, [0.0, 3.0])
    t = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        want = dm(x, t, **kwargs)
        with PerTokenTimestepsChroma(dm) as adapter:
            adapter.set_map(None, unique=torch.tensor([0.7]), inverse=torch.zeros(1, side, side, dtype=torch.long),
                            rows=2)
            got = dm(x, t, **kwargs)
            fired = list(adapter._fired)
            adapter.set_map(None)
            plain = dm(x, t, **kwargs)
    assert fired == [1] * len(fired) and len(fired) == len(dm.double_blocks) + len(dm.single_blocks) + 1
    assert adapter.table_builds == 1
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rel_err(got, want)
    assert torch.equal(plain, want)


class BlockInputs:
    """What every block is given as ``vec`` (after the adapter's pre-hooks) and the final layer's input."""

    def __init__(self, dm) -> None:
        self.dm = dm
        self.vec: dict[tuple[str, int], object] = {}
        self.final_x: torch.Tensor | None = None

    def __enter__(self):
        self.handles = [b.register_forward_pre_hook(self._keep(("double", i)), with_kwargs=True)
                        for i, b in enumerate(self.dm.double_blocks)]
        self.handles += [b.register_forward_pre_hook(self._keep(("single", i)), with_kwargs=True)
                         for i, b in enumerate(self.dm.single_blocks)]
        if getattr(self.dm, "final_layer", None) is not None:
            self.handles.append(self.dm.final_layer.register_forward_pre_hook(self._final))
        return self

    def _keep(self, key):
        def hook(_module, _args, kwargs):
            vec = kwargs["vec"]
            if key[0] == "double":
                (m1, m2), _txt = vec
                self.vec[key] = torch.cat([m1.shift, m1.scale, m1.gate, m2.shift, m2.scale, m2.gate], dim=-1).clone()
            else:
                self.vec[key] = torch.cat([vec.shift, vec.scale, vec.gate], dim=-1).clone()
        return hook

    def _final(self, _module, args):
        self.final_x = args[0].detach().clone()

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("variant", list(SHAPES))
def test_each_image_token_is_modulated_at_its_own_timestep(models, variant):
    """Left-half tokens get exactly the stock model's vectors at t_left, right-half tokens at
    t_right, text tokens (single blocks) the stock row at the carrier; block 0's image qkv input
    shows it; the final layer is the stock final layer at each token's own t."""
    dm = models[variant].model.diffusion_model
    channels, side, patch = SHAPES[variant]
    grid = side // patch
    x = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(0))
    kwargs = forward_kwargs(1, [0.0])
    t_left, t_right, carrier = 0.25, 0.9, 0.5
    stock_vec, stock_qkv = {}, {}
    qkv = dm.double_blocks[0].img_attn.qkv

    def keep_qkv(store, t):
        return qkv.register_forward_hook(lambda _m, args, _o: store.__setitem__(t, args[0].detach().clone()))

    for t in (t_left, t_right, carrier):
        handle = keep_qkv(stock_qkv, t)
        with BlockInputs(dm) as rec, torch.no_grad():
            dm(x, torch.tensor([t]), **kwargs)
        handle.remove()
        stock_vec[t] = rec.vec
    inverse = torch.zeros(1, side, side, dtype=torch.long)
    inverse[..., side // 2:] = 1
    got_qkv: dict = {}
    handle = keep_qkv(got_qkv, "split")
    with PerTokenTimestepsChroma(dm) as adapter, BlockInputs(dm) as rec, torch.no_grad():
        adapter.set_map(None, unique=torch.tensor([t_left, t_right]), inverse=inverse, rows=1)
        out = dm(x, torch.tensor([carrier]), **kwargs)
        adapter.set_map(None)
    handle.remove()
    tokens = grid * grid
    left = (torch.arange(tokens) % grid) * patch < side // 2  # the token's top-left pixel is in the left half
    text = kwargs["context"].shape[1]
    for key, got in rec.vec.items():
        image = got[:, text:] if key[0] == "single" else got
        assert image.shape[1] == tokens, key
        for mask, t in ((left, t_left), (~left, t_right)):
            want = stock_vec[t][key].expand(-1, tokens, -1)
            assert torch.allclose(image[:, mask], want[:, mask], rtol=1e-5, atol=1e-6), (key, t)
        if key[0] == "single":
            assert torch.equal(got[:, :text], stock_vec[carrier][key].expand(-1, text, -1)), key
    for mask, t in ((left, t_left), (~left, t_right)):
        assert torch.allclose(got_qkv["split"][:, mask], stock_qkv[t][:, mask], rtol=1e-5, atol=1e-6), t
        assert not torch.allclose(got_qkv["split"][:, mask], stock_qkv[carrier][:, mask], rtol=1e-3, atol=1e-4)
    if variant == "chroma":  # the final layer: ComfyUI's own LastLayer at each token's timestep
        final = dm.final_layer
        with torch.no_grad():
            for mask, t in ((left, t_left), (~left, t_right)):
                mods = dm.distilled_guidance_layer(stock_input(dm, t, 0.0))
                want = final(rec.final_x, vec=dm.get_modulations(mods, "final"))
                got = out.view(1, 16, grid, 2, grid, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, tokens, -1)
                assert torch.allclose(got[:, mask], want[:, mask], rtol=1e-5, atol=1e-5), t


def stock_input(dm, t: float, guidance: float) -> torch.Tensor:
    """The approximator's input as Chroma's forward_orig builds it for one row at t (independent of the adapter)."""
    from comfy.ldm.flux.layers import timestep_embedding

    steps = timestep_embedding(torch.tensor([t]), 16)
    guide = timestep_embedding(torch.tensor([guidance]), 16)
    index = timestep_embedding(torch.arange(MOD_INDEX_LENGTH), 32)[None]
    return torch.cat([torch.cat([steps, guide], dim=1)[:, None].repeat(1, MOD_INDEX_LENGTH, 1), index], dim=-1)


def test_a_drawn_mask_reaches_chroma_as_the_schedules_token_map(models, monkeypatch):
    model = models["chroma"]
    pos, neg = conds()
    steps = 5
    schedule = fixed_masks(1, 16, 16)  # top half, bin, k = 0.8
    rec = TokenTimesteps(monkeypatch, model, PerTokenTimestepsChroma)
    try:
        a = asyn(model, pos, neg, latent("chroma"), seed=4, steps=steps, cfg=3.5, scheduler="simple",
                 schedule=schedule)
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
        want = ms.timestep(sigma.flatten()).view(1, 16, 16)[:, ::2, ::2].reshape(1, -1)
        assert torch.equal(seen, want.expand(2, -1).float()), f"step {i}"
        distinct = max(distinct, len(seen[0].unique()))
        assert seen[0, -1] == ms.timestep(sigmas[i:i + 1])[0]  # background tokens: the scheduler's own timestep
    assert distinct == 2, "the transformer never saw two timesteps"
    sync = asyn(model, pos, neg, latent("chroma"), seed=4, steps=steps, cfg=3.5, scheduler="simple")
    assert torch.isfinite(a).all() and rel_err(a, sync) > 1e-3


def test_radiance_keeps_each_16px_patch_on_one_track(models, monkeypatch):
    """Chroma Radiance on 40x56 pixels (padded to 48x64: 3x4 patches): a drawn mask whose edges cut
    through patches becomes patch-constant, the transformer sees two timesteps, the result differs."""
    model = models["radiance"]
    pos, neg = conds()
    h, w = 40, 56
    masks = torch.zeros(1, 1, h, w)
    masks[..., :20, :10] = 1.0
    made = []
    init = AsynSampler.__init__
    monkeypatch.setattr(AsynSampler, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    seen = []
    original = PerTokenTimestepsChroma.set_map

    def spy(adapter, *args, **kwargs):
        original(adapter, *args, **kwargs)
        if adapter.token_timesteps() is not None:
            seen.append(adapter.token_timesteps())

    monkeypatch.setattr(PerTokenTimestepsChroma, "set_map", spy)
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="masks", masks=masks)
    lat = torch.zeros(1, 3, h, w)
    out = asyn(model, pos, neg, lat, seed=2, steps=4, cfg=3.5, scheduler="simple", schedule=schedule)
    want = torch.zeros(h, w)
    want[:32, :16] = 0.7
    assert torch.equal(made[-1].record.priorities[0][0], want)
    assert seen and all(s.shape == (2, 12) for s in seen) and max(len(s.unique()) for s in seen) == 2
    sync = asyn(model, pos, neg, lat, seed=2, steps=4, cfg=3.5, scheduler="simple")
    assert torch.isfinite(out).all() and out.shape == (1, 3, h, w) and rel_err(out, sync) > 1e-3


@pytest.mark.parametrize("variant", list(SHAPES))
def test_nothing_outlives_a_failed_chroma_run(models, variant):
    model = models[variant]
    pos, neg = conds()
    side = SHAPES[variant][1]
    before = stock(model, pos, neg, latent(variant), seed=6, cfg=3.5, scheduler="simple")
    hooks_before = hook_state(model.model)

    def interrupt(step, x0, x, total):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        asyn(model, pos, neg, latent(variant), seed=6, cfg=3.5, scheduler="simple",
             schedule=fixed_masks(1, side, side), callback=interrupt)
    comfy.model_management.interrupt_current_processing(False)
    assert hook_state(model.model) == hooks_before
    assert torch.equal(stock(model, pos, neg, latent(variant), seed=6, cfg=3.5, scheduler="simple"), before)


@pytest.fixture(scope="module")
def chroma_tokens():
    return prompt_tokens(TokenizerOnly(comfy.text_encoders.pixart_t5.PixArtTokenizer(), ("t5xxl",)), PROMPT)


def test_chroma_key_words_are_unpadded_t5_columns(chroma_tokens):
    """PixArt's tokenizer (Chroma's): SentencePiece, no start token, the end token kept, no padding."""
    t5 = chroma_tokens.streams["t5xxl"]
    assert chroma_tokens.context_length(["t5xxl"]) == len(t5.chunks[0]) == 20 and t5.chunks[0][-1] == 1
    assert chroma_tokens.columns("rabbit", ["t5xxl"]) == [6]  # ▁, a, ▁photo, ▁of, ▁, a, ▁rabbit
    cols = chroma_tokens.columns("teddy bear", ["t5xxl"])
    assert [t5.chunks[0][c] for c in cols] == t5.word_ids["teddy"] + t5.word_ids["bear"]


class AttentionCalls:
    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, func, *args, **kwargs):
        self.calls.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **kwargs)


@pytest.mark.parametrize("variant", list(SHAPES))
def test_chroma_dynamic_masks_follow_the_joint_attention(models, chroma_tokens, variant, monkeypatch):
    """The key pixels of step 1 are the threshold of the step-0 attention of the image tokens to the
    word's T5 tokens, recomputed here from the model's own q and k; the transformer then sees two
    timesteps, and the result differs from synchronous sampling."""
    model = models[variant]
    dm = model.model.diffusion_model
    channels, side, patch = SHAPES[variant]
    text = chroma_tokens.context_length(["t5xxl"])
    pos = make_chroma_conditioning(tokens=text, seed=1)
    pos[0][1][KEY] = chroma_tokens
    calls = AttentionCalls()
    spy = model.clone()
    spy.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = calls
    made = []
    init = AsynSampler.__init__
    monkeypatch.setattr(AsynSampler, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    seen = []
    original = PerTokenTimestepsChroma.set_map

    def record(adapter, *args, **kwargs):
        original(adapter, *args, **kwargs)
        if adapter.token_timesteps() is not None:
            seen.append(adapter.token_timesteps())

    monkeypatch.setattr(PerTokenTimestepsChroma, "set_map", record)
    schedule = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",), threshold=1.0)
    lat = latent(variant)
    out = asyn(spy, pos, pos, lat, seed=3, steps=4, cfg=1.0, scheduler="simple", schedule=schedule)
    per_forward = len(dm.double_blocks) + len(dm.single_blocks)
    assert len(calls.calls) == 4 * per_forward
    grid = side // patch
    image = grid * grid
    cols = chroma_tokens.columns("rabbit", ["t5xxl"])
    maps = []
    for q, k in calls.calls[:per_forward]:
        logits = q[:, :, text:text + image].double() @ k[:, :, :text].double().transpose(-1, -2)
        probs = torch.softmax(logits / math.sqrt(q.shape[-1]), dim=-1).mean(dim=1)
        maps.append(probs[..., cols].mean(-1))
    attn = torch.stack(maps).mean(0)[..., None].float()
    masks = item_masks(attn, [0.7], threshold=1.0, size=(side, side), grid=(grid, grid))
    want = patch_constant(masks[:, 0] * 0.7, patch)
    assert 0 < int((want > 0).sum()) < side * side
    assert torch.equal(made[-1].record.priorities[1], want)
    assert seen and max(len(s.unique()) for s in seen) == 2
    sync = asyn(model, pos, pos, lat, seed=3, steps=4, cfg=1.0, scheduler="simple")
    assert torch.isfinite(out).all() and rel_err(out, sync) > 1e-3
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
