"""TEST ONLY: a CONDITIONING of the shapes Flux and SD3 take, from a seed instead of text encoders.

Why this node exists: the text encoders of these families cannot be had on the machines the tests
run on. Flux and SD3 read T5-XXL (4.7B parameters, whose size ComfyUI's loader fixes: it cannot be
shrunk the way the diffusion models of scripts/make_dit_models.py are), and SD3 also CLIP-G; no
weights can be downloaded, and writing random ones takes minutes and about 10 GB. The diffusion
models under test are real ComfyUI classes loaded from files by ComfyUI's own loaders; only their
text input comes from here. This node stands in for the text-encoder part of a workflow
(DualCLIPLoader / TripleCLIPLoader + CLIP Text Encode): it outputs seeded unit-normal tensors
of the shapes those encoders give,

    flux: [[context (1, tokens, 4096), {"pooled_output": (1, 768)}]]     T5-XXL, CLIP-L pooled
    sd3:  [[context (1, tokens, 4096), {"pooled_output": (1, 2048)}]]    T5-XXL, CLIP-L + CLIP-G pooled

and nothing else: the model's output is never touched, and everything downstream (FluxGuidance,
the samplers, the pack's nodes) runs as with real encoders. The test servers load it from
tests/server/comfy_nodes (tests/server/conftest.py, running_server); it is never part of the pack.
"""

from __future__ import annotations

from typing import Any

import torch

CONTEXT_WIDTH = 4096  # T5-XXL, both families
POOLED_WIDTH = {"flux": 768, "sd3": 2048}


class TestOnlyDiTConditioning:
    DESCRIPTION = ("TEST ONLY (AsynDM test servers): seeded random conditioning of the shapes Flux / SD3 text "
                   "encoders give (T5-XXL context 4096 wide; pooled 768 for Flux, 2048 for SD3), standing in for "
                   "the T5-XXL and CLIP-G encoders that cannot be loaded on the test machines.")
    CATEGORY = "testing/asyndm"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "family": (list(POOLED_WIDTH), {"tooltip": "flux: pooled 768 (CLIP-L); sd3: pooled 2048 (CLIP-L + CLIP-G)."}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "Length of the text context."}),
            "values_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                    "tooltip": "Seed of the values (unit normal)."}),
        }}

    def make(self, family: str, tokens: int, values_seed: int) -> tuple[list[list[Any]]]:
        if family not in POOLED_WIDTH:
            raise ValueError(f"family must be one of {', '.join(POOLED_WIDTH)}, got {family!r}")
        gen = torch.Generator().manual_seed(int(values_seed))
        context = torch.randn(1, int(tokens), CONTEXT_WIDTH, generator=gen)
        pooled = torch.randn(1, POOLED_WIDTH[family], generator=gen)
        return ([[context, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"TestOnlyDiTConditioning": TestOnlyDiTConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"TestOnlyDiTConditioning": "Test-only DiT Conditioning (AsynDM tests)"}
