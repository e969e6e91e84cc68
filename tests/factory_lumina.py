"""Small random-weight Lumina 2 and Z-Image models of ComfyUI's own classes, built in-process for tests.

ComfyUI's ``supported_models.Lumina2`` / ``ZImage`` configs, ``model_base.Lumina2`` and the
``lumina.model.NextDiT`` class, with the keys ``model_detection`` sets for each (Lumina 2: SiLU +
Linear modulation, grouped-query attention, time scale 1; Z-Image: a 256-wide time embedding, one
Linear per modulation, time scale 1000, caption and image padded to multiples of 32 tokens),
narrowed: 1 noise refiner, 1 context refiner and 2 main blocks. Z-Image needs a width of at least
256 (its modulation reads min(width, 256) features from a 256-wide embedding).

Import this only after ComfyUI is importable (tests/inprocess/conftest.py arranges that).
"""

from __future__ import annotations

from typing import Any

import torch

from tests.model_factory import _patcher

__all__ = ["GEMMA_CORPUS", "LUMINA_TEXT_DIM", "build_lumina2", "build_z_image", "gemma_tokenizer",
           "make_lumina_conditioning"]

LUMINA_TEXT_DIM = 40  # Gemma-2-2B's (2304) and Qwen3-4B's (2560) hidden widths, shrunk


def _common(dim: int, heads: int, kv_heads: int, axes: list[int]) -> dict[str, Any]:
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim, "cap_feat_dim": LUMINA_TEXT_DIM,
            "n_layers": 2, "n_refiner_layers": 1, "qk_norm": True, "n_heads": heads, "n_kv_heads": kv_heads,
            "axes_dims": axes}


def build_lumina2(*, seed: int = 0, **layout: Any) -> Any:
    """A Lumina 2 shaped ModelPatcher (width 64: 2 query heads, 1 key/value head of 32 channels); layout overrides
    keys of the transformer's shape (a wider model for the benchmark)."""
    import comfy.supported_models

    unet = {**_common(64, 2, 1, [8, 12, 12]), "axes_lens": [300, 512, 512], "rope_theta": 10000.0,
            "ffn_dim_multiplier": 4.0, **layout}
    config = comfy.supported_models.Lumina2(unet)
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config.get_model({}, ""), seed)


def build_z_image(*, seed: int = 0, **layout: Any) -> Any:
    """A Z-Image shaped ModelPatcher (width 256: 2 heads of 128 channels; layout: as build_lumina2)."""
    import comfy.supported_models

    unet = {**_common(256, 2, 2, [32, 48, 48]), "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
            "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
            "pad_tokens_multiple": 32, **layout}
    config = comfy.supported_models.ZImage(unet)
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config.get_model({}, ""), seed)


def make_lumina_conditioning(batch: int = 1, tokens: int = 12, *, seed: int = 0) -> list[list[Any]]:
    """[[Gemma-2 / Qwen3-like context, {}]] for the models above."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, LUMINA_TEXT_DIM, generator=gen), {}]]


# Sentences a stand-in Gemma vocabulary is trained on: the tests' prompts' words and Lumina 2's system prompt.
GEMMA_CORPUS = ("a photo of a rabbit next to a teddy bear", "a rabbit wearing sunglasses", "a teddy bear on a chair",
                "You are an assistant designed to generate superior images with the superior degree of image-text "
                "alignment based on textual prompts or user prompts. <Prompt Start> an image of a cat")


def gemma_tokenizer() -> Any:
    """ComfyUI's Lumina 2 tokenizer (LuminaTokenizer: Gemma-2's SentencePiece through SPieceTokenizer, start
    token 2, no end token) on a small SentencePiece BPE model trained here on GEMMA_CORPUS (Gemma's special
    ids: pad 0, eos 1, bos 2, unk 3; byte fallback). Why trained here: Gemma's 256k-piece model comes
    inside the text-encoder file, not in ComfyUI's tree, and cannot be had on these machines."""
    import io

    import comfy.text_encoders.lumina2
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(GEMMA_CORPUS * 4), model_writer=model, vocab_size=320, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, num_threads=1, character_coverage=1.0,
        minloglevel=2)
    return comfy.text_encoders.lumina2.LuminaTokenizer(tokenizer_data={"spiece_model": model.getvalue()})
