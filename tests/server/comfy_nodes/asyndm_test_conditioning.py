"""TEST ONLY: a CONDITIONING of the shapes the DiT families take, from a seed instead of text encoders.

Why this node exists: the text encoders of these families cannot be had on the machines the tests
run on. Flux and SD3 read T5-XXL (4.7B parameters, whose size ComfyUI's loader fixes: it cannot be
shrunk the way the diffusion models of scripts/make_dit_models.py are), and SD3 also CLIP-G; the
others read large language models (Qwen2.5-VL-7B, Gemma-2-2B, Qwen3-4B) or T5s (Pile-T5-XL,
T5-XXL); no weights can be downloaded, and writing random ones takes minutes and many GB. The
diffusion models under test are real ComfyUI classes loaded from files by ComfyUI's own loaders;
only their text input comes from here. This node stands in for the text-encoder part of a workflow
(DualCLIPLoader / TripleCLIPLoader / CLIPLoader + CLIP Text Encode): it outputs seeded unit-normal
tensors of the shapes those encoders give, with the extra keys ComfyUI 0.3.75's encoders put next
to them (and that the family's model_base.extra_conds reads),

    flux:          [[context (1, tokens, 4096), {"pooled_output": (1, 768)}]]    T5-XXL, CLIP-L pooled
    sd3:           [[context (1, tokens, 4096), {"pooled_output": (1, 2048)}]]   T5-XXL, CLIP-L + CLIP-G pooled
    qwen_image:    [[context (1, tokens, 3584), {"pooled_output": None}]]        Qwen2.5-VL-7B (its all-ones
                                                                                 attention mask is dropped)
    lumina2:       [[context (1, tokens, 2304), {"pooled_output": None,           Gemma-2-2B; Lumina2.extra_conds
                     "attention_mask": ones (1, tokens) int64}]]                 turns the mask into num_tokens
    z_image:       [[context (1, tokens, 2560), {... the same}]]                 Qwen3-4B
    hunyuan_image: [[context (1, tokens, 3584), {"pooled_output": None,           Qwen2.5-VL-7B + ByT5-small
                     "conditioning_byt5small": (1, 6, 1472)}]]                   (quoted text; -> txt_byt5)
    auraflow:      [[context (1, tokens, 2048), {"pooled_output": None}]]        Pile-T5-XL
    chroma:        [[context (1, tokens, 4096), {"pooled_output": None}]]        T5-XXL (PixArt's T5, built
                                                                                 without attention masks)

and nothing else (it records no tokens, so a sampler fed by it cannot take key words): the model's
output is never touched, and everything downstream (FluxGuidance,
ReferenceLatent, the samplers, the pack's nodes) runs as with real encoders. The values are drawn
in the order listed (context, then pooled or the ByT5 tokens), so a family's tensors depend only
on the seed and the token count. The test servers load it from tests/server/comfy_nodes
(tests/server/conftest.py, running_server); it is never part of the pack.
"""

from __future__ import annotations

from typing import Any

import torch

# family: (context width, pooled width or None, what else its encoder gives)
FAMILIES: dict[str, tuple[int, int | None, str]] = {
    "flux": (4096, 768, ""),  # T5-XXL; CLIP-L pooled
    "sd3": (4096, 2048, ""),  # T5-XXL; CLIP-L + CLIP-G pooled
    "qwen_image": (3584, None, ""),  # Qwen2.5-VL-7B (Qwen-Image and Qwen-Image-Edit)
    "lumina2": (2304, None, "attention_mask"),  # Gemma-2-2B
    "z_image": (2560, None, "attention_mask"),  # Qwen3-4B
    "hunyuan_image": (3584, None, "byt5"),  # Qwen2.5-VL-7B + ByT5-small glyph tokens
    "auraflow": (2048, None, ""),  # Pile-T5-XL
    "chroma": (4096, None, ""),  # T5-XXL, no pooled output
}
BYT5_WIDTH = 1472  # ByT5-small's hidden width (HunyuanVideo's ByT5Mapper reads it)
BYT5_TOKENS = 6  # the glyph tokens of a short quoted text


def make_conditioning(family: str, tokens: int, values_seed: int) -> list[list[Any]]:
    """The CONDITIONING the node outputs (also for tests that call it in-process)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    width, pooled_width, extra = FAMILIES[family]
    gen = torch.Generator().manual_seed(int(values_seed))
    context = torch.randn(1, int(tokens), width, generator=gen)
    options: dict[str, Any] = {"pooled_output": None}
    if pooled_width is not None:
        options["pooled_output"] = torch.randn(1, pooled_width, generator=gen)
    if extra == "attention_mask":  # Gemma / Qwen3 encoders return their mask (all ones: one unpadded prompt)
        options["attention_mask"] = torch.ones(1, int(tokens), dtype=torch.long)
    elif extra == "byt5":
        options["conditioning_byt5small"] = torch.randn(1, BYT5_TOKENS, BYT5_WIDTH, generator=gen)
    return [[context, options]]


class TestOnlyDiTConditioning:
    DESCRIPTION = ("TEST ONLY (AsynDM test servers): seeded random conditioning of the shapes the DiT families' text "
                   "encoders give (flux / sd3: T5-XXL context 4096, pooled 768 / 2048; qwen_image 3584; lumina2 2304 "
                   "and z_image 2560 with their attention masks; hunyuan_image 3584 with ByT5 glyph tokens; auraflow "
                   "2048; chroma 4096, no pooled), standing in for encoders that cannot be loaded on the test machines.")
    CATEGORY = "testing/asyndm"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "family": (list(FAMILIES), {"tooltip": "flux: pooled 768 (CLIP-L); sd3: pooled 2048 (CLIP-L + CLIP-G); "
                                                   "qwen_image, lumina2, z_image, hunyuan_image, auraflow, chroma: "
                                                   "their encoders' widths, no pooled output."}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "Length of the text context."}),
            "values_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                    "tooltip": "Seed of the values (unit normal)."}),
        }}

    def make(self, family: str, tokens: int, values_seed: int) -> tuple[list[list[Any]]]:
        return (make_conditioning(family, tokens, values_seed),)


NODE_CLASS_MAPPINGS = {"TestOnlyDiTConditioning": TestOnlyDiTConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"TestOnlyDiTConditioning": "Test-only DiT Conditioning (AsynDM tests)"}
