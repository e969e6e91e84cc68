"""TEST ONLY: a CONDITIONING of the shapes Flux, SD3, Qwen-Image and Z-Image take, from a seed instead of text encoders.

Why this node exists: the text encoders of these families cannot be had on the machines the tests
run on. Flux and SD3 read T5-XXL (4.7B parameters, whose size ComfyUI's loader fixes: it cannot be
shrunk the way the diffusion models of scripts/make_dit_models.py are), and SD3 also CLIP-G; no
weights can be downloaded, and writing random ones takes minutes and about 10 GB. The diffusion
models under test are real ComfyUI classes loaded from files by ComfyUI's own loaders; only their
text input comes from here. This node stands in for the text-encoder part of a workflow
(DualCLIPLoader / TripleCLIPLoader + CLIP Text Encode): it outputs seeded unit-normal tensors
of the shapes those encoders give,

    flux:       [[context (1, tokens, 4096), {"pooled_output": (1, 768)}]]     T5-XXL, CLIP-L pooled
    sd3:        [[context (1, tokens, 4096), {"pooled_output": (1, 2048)}]]    T5-XXL, CLIP-L + CLIP-G pooled
    qwen_image: [[context (1, tokens, 3584), {}]]                              Qwen2.5-VL 7B (CLIPLoader qwen_image)
    z_image:    [[context (1, tokens, 2560), {}]]                              Qwen3 4B (CLIPLoader lumina2)

(Qwen2.5-VL 7B and Qwen3 4B cannot be had here either.) It records no tokens, so a sampler fed by
it cannot take key words.

and nothing else: the model's output is never touched, and everything downstream (FluxGuidance,
the samplers, the pack's nodes) runs as with real encoders. The test servers load it from
tests/server/comfy_nodes (tests/server/conftest.py, running_server); it is never part of the pack.
"""

from __future__ import annotations

from typing import Any

import torch

# Text context width and pooled width (0: no pooled output) of each family's encoders.
CONTEXT_WIDTH = {"flux": 4096, "sd3": 4096, "qwen_image": 3584, "z_image": 2560}
POOLED_WIDTH = {"flux": 768, "sd3": 2048, "qwen_image": 0, "z_image": 0}


class TestOnlyDiTConditioning:
    DESCRIPTION = ("TEST ONLY (AsynDM test servers): seeded random conditioning of the shapes Flux / SD3 / Qwen-Image / "
                   "Z-Image text encoders give (T5-XXL context 4096 wide, pooled 768 for Flux, 2048 for SD3; "
                   "Qwen2.5-VL 3584 and Qwen3 2560 wide, no pooled), standing in for the encoders that cannot be "
                   "loaded on the test machines.")
    CATEGORY = "testing/asyndm"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "family": (list(POOLED_WIDTH), {"tooltip": "flux: pooled 768 (CLIP-L); sd3: pooled 2048 (CLIP-L + CLIP-G); qwen_image: "
                                                      "context 3584; z_image: context 2560."}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "Length of the text context."}),
            "values_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                    "tooltip": "Seed of the values (unit normal)."}),
        }}

    def make(self, family: str, tokens: int, values_seed: int) -> tuple[list[list[Any]]]:
        if family not in POOLED_WIDTH:
            raise ValueError(f"family must be one of {', '.join(POOLED_WIDTH)}, got {family!r}")
        gen = torch.Generator().manual_seed(int(values_seed))
        context = torch.randn(1, int(tokens), CONTEXT_WIDTH[family], generator=gen)
        if not POOLED_WIDTH[family]:
            return ([[context, {}]],)
        pooled = torch.randn(1, POOLED_WIDTH[family], generator=gen)
        return ([[context, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"TestOnlyDiTConditioning": TestOnlyDiTConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"TestOnlyDiTConditioning": "Test-only DiT Conditioning (AsynDM tests)"}
