"""Small random-weight models of the Flux layer family's other members, ComfyUI's own classes.

Chroma and Chroma Radiance (``supported_models.Chroma`` / ``ChromaRadiance``, ``model_base``'s
classes, ``comfy.ldm.chroma`` / ``chroma_radiance``), Flux.2 (``supported_models.Flux2``: ComfyUI's
Flux class with global modulation, 128 latent channels in 1x1 patches) and HunyuanImage 2.1
(``supported_models.HunyuanImage21``: the HunyuanVideo class with 2-D 1x1 patches, flipped
[image, text] blocks, the TokenRefiner and ByT5 mapper), narrow and shallow, weights from
tests/model_factory.py's ``_fill`` (a pure function of the seed). Import this only after ComfyUI
is importable (tests/inprocess/conftest.py arranges that).
"""

from __future__ import annotations

from typing import Any

import torch

from tests.model_factory import _patcher

__all__ = ["BYT5_DIM", "CHROMA_TEXT_DIM", "FLUX2_TEXT_DIM", "HUNYUAN_TEXT_DIM", "build_chroma", "build_chroma_radiance",
           "build_flux2", "build_hunyuan_image", "flux2_tokenizer", "make_chroma_conditioning", "make_flux2_conditioning",
           "make_hunyuan_image_conditioning"]

CHROMA_TEXT_DIM = 32  # T5-XXL's 4096, shrunk
FLUX2_TEXT_DIM = 48  # Mistral-Small-3's three stacked layers (3 x 5120), shrunk
HUNYUAN_TEXT_DIM = 40  # Qwen2.5-VL-7B's 3584, shrunk
BYT5_DIM = 1472  # ByT5-small's width: fixed in HunyuanVideo's ByT5 mapper
_HIDDEN, _HEADS = 64, 2  # width 64 in 2 heads of 32 (RoPE axes 8 + 12 + 12)


def _chroma_layout(depth: int, depth_single: int, patch_size: int, in_channels: int) -> dict[str, Any]:
    """The Chroma transformer's shape as model_detection derives it, narrow; the approximator's
    hidden width shrunk too (it must output the transformer's width)."""
    return {"in_channels": in_channels, "out_channels": in_channels, "context_in_dim": CHROMA_TEXT_DIM,
            "hidden_size": _HIDDEN, "mlp_ratio": 2.0, "num_heads": _HEADS, "depth": depth,
            "depth_single_blocks": depth_single, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": patch_size,
            "qkv_bias": True, "in_dim": 64, "out_dim": _HIDDEN, "hidden_dim": 48, "n_layers": 2}


def build_chroma(*, depth: int = 2, depth_single: int = 2, seed: int = 0, **layout: Any) -> Any:
    """A Chroma ModelPatcher: 16-channel latents in 2x2 patches (Chroma's detection feeds img_in 64 = 16 x 2 x 2).
    layout overrides keys of the transformer's shape (a wider model for the benchmark)."""
    import comfy.supported_models

    unet = {"image_model": "chroma", **_chroma_layout(depth, depth_single, 2, 64), **layout}
    config = comfy.supported_models.Chroma(unet)
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config.get_model({}, ""), seed)


def build_chroma_radiance(*, depth: int = 2, depth_single: int = 1, nerf_tile_size: int = 0,
                          head: str = "conv", seed: int = 0, **layout: Any) -> Any:
    """A Chroma Radiance ModelPatcher: RGB pixels in 16x16 patches, then the NeRF head (layout: as build_chroma)."""
    import comfy.supported_models

    unet = {"image_model": "chroma_radiance", **_chroma_layout(depth, depth_single, 16, 3),
            "nerf_hidden_size": 16, "nerf_mlp_ratio": 2, "nerf_depth": 2, "nerf_max_freqs": 4,
            "nerf_tile_size": nerf_tile_size, "nerf_final_head_type": head, "nerf_embedder_dtype": torch.float32, **layout}
    config = comfy.supported_models.ChromaRadiance(unet)
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config.get_model({}, ""), seed)


def make_chroma_conditioning(batch: int = 1, tokens: int = 12, *, seed: int = 0,
                             guidance: float | None = None) -> list[list[Any]]:
    """[[T5-like context, {pooled_output: None}]], as CLIPTextEncode gives for a T5-only CLIP (Chroma reads
    no pooled vector; guidance defaults to 0 in its extra_conds)."""
    gen = torch.Generator().manual_seed(seed)
    extra: dict[str, Any] = {"pooled_output": None}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(batch, tokens, CHROMA_TEXT_DIM, generator=gen), extra]]


def build_flux2(*, guidance: bool = True, depth: int = 1, depth_single: int = 1, seed: int = 0, **layout: Any) -> Any:
    """A Flux.2 ModelPatcher: ComfyUI's Flux class with global modulation, as model_detection configures
    it (4 RoPE axes, SiLU-gated MLPs, no biases, reference latents by index), 128-channel latents in 1x1 patches
    (layout: as build_chroma)."""
    import comfy.supported_models

    unet = {"image_model": "flux2", "axes_dim": [8, 8, 8, 8], "num_heads": _HEADS, "mlp_ratio": 3.0, "theta": 2000,
            "out_channels": 128, "global_modulation": True, "vec_in_dim": None, "mlp_silu_act": True,
            "qkv_bias": False, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0,
            "in_channels": 128, "hidden_size": _HIDDEN, "context_in_dim": FLUX2_TEXT_DIM, "patch_size": 1,
            "depth": depth, "depth_single_blocks": depth_single, "guidance_embed": guidance, **layout}
    config = comfy.supported_models.Flux2(unet)
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config.get_model({}, ""), seed)


def make_flux2_conditioning(batch: int = 1, tokens: int = 20, *, seed: int = 0,
                            guidance: float | None = 4.0) -> list[list[Any]]:
    """[[Mistral-like context, {pooled_output: None, guidance}]] (Flux2.extra_conds left-pads the context to 512)."""
    gen = torch.Generator().manual_seed(seed)
    extra: dict[str, Any] = {"pooled_output": None}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(batch, tokens, FLUX2_TEXT_DIM, generator=gen), extra]]


def build_hunyuan_image(*, guidance: bool = False, byt5: bool = True, meanflow: bool = False, depth: int = 1,
                        depth_single: int = 1, seed: int = 0, **layout: Any) -> Any:
    """A HunyuanImage 2.1 ModelPatcher: ComfyUI's HunyuanVideo class with 2-D 1x1 patches on 64-channel latents,
    configured as model_detection does (RoPE axes [h, w], theta 256, TokenRefiner, the ByT5 mapper; layout: as
    build_chroma)."""
    import comfy.supported_models

    unet = {"image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "patch_size": [1, 1],
            "vec_in_dim": None, "axes_dim": [16, 16], "meanflow": meanflow, "context_in_dim": HUNYUAN_TEXT_DIM,
            "hidden_size": _HIDDEN, "mlp_ratio": 4.0, "num_heads": _HEADS, "depth": depth,
            "depth_single_blocks": depth_single, "theta": 256, "qkv_bias": True, "byt5": byt5,
            "guidance_embed": guidance, "use_cond_type_embedding": False, "vision_in_dim": None, **layout}
    config = comfy.supported_models.HunyuanImage21(unet)
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config.get_model({}, ""), seed)


def make_hunyuan_image_conditioning(batch: int = 1, tokens: int = 12, *, seed: int = 0, glyphs: int = 0,
                                    guidance: float | None = None) -> list[list[Any]]:
    """[[Qwen-like context, {pooled_output: None, conditioning_byt5small (glyphs > 0)}]], as HunyuanImage's
    text encoder gives (the ByT5 tokens of quoted text ride along in the conditioning)."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, HUNYUAN_TEXT_DIM, generator=gen)
    extra: dict[str, Any] = {"pooled_output": None}
    if glyphs:
        extra["conditioning_byt5small"] = torch.randn(batch, glyphs, BYT5_DIM, generator=gen)
    if guidance is not None:
        extra["guidance"] = guidance
    return [[context, extra]]


# Mistral's tekken special tokens in their ranks (pad 11 and start 1 are what ComfyUI's Mistral3Tokenizer
# expects), and the words the Flux.2 tests spell with merged tokens; every other text falls back to bytes.
TEKKEN_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                   "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
TEKKEN_WORDS = (" rabbit", "Rabbit", " Rabbit", " teddy", " bear", " photo", " image")


def flux2_tokenizer(monkeypatch: Any) -> Any:
    """ComfyUI's Flux2Tokenizer (template, left padding, start token: its own code) on a small byte-level
    BPE vocabulary in tekken's layout: 19 special tokens, the 256 bytes, merges for TEKKEN_WORDS.

    Why a stand-in vocabulary: the real one (131k tokens) comes inside the Mistral text-encoder file,
    which cannot be had here. And ComfyUI 0.3.75 converts it with transformers' MistralConverter,
    whose signature transformers 5 changed; newer ComfyUI builds the BPE itself. So the BPE object is
    built here (``tokenizers``), and 0.3.75's two loading hooks are patched to hand it over.
    """
    import comfy.text_encoders.flux
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_char = bytes_to_unicode()

    def spell(raw: bytes) -> str:
        return "".join(to_char[b] for b in raw)

    vocab = {name: rank for rank, name in enumerate(TEKKEN_SPECIALS)}
    vocab.update({spell(bytes([b])): len(TEKKEN_SPECIALS) + b for b in range(256)})
    merges = []
    for word in TEKKEN_WORDS:
        raw = word.encode()
        for end in range(2, len(raw) + 1):
            if spell(raw[:end]) not in vocab:
                vocab[spell(raw[:end])] = len(vocab)
                merges.append((spell(raw[:end - 1]), spell(raw[end - 1:end])))
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(name, special=True) for name in TEKKEN_SPECIALS])
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])

    def wrapped(_path: str, tokenizer_object: Any = None, **_kwargs: Any) -> Any:
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, bos_token="<s>", pad_token="<pad>")

    monkeypatch.setattr(comfy.text_encoders.flux, "load_mistral_tokenizer", lambda _data: {"tokenizer_object": bpe})
    monkeypatch.setattr(comfy.text_encoders.flux.MistralTokenizerClass, "from_pretrained", staticmethod(wrapped))
    return comfy.text_encoders.flux.Flux2Tokenizer(tokenizer_data={"tekken_model": b"{}"})
