#!/usr/bin/env python3
"""Write random-weight diffusion-transformer files that ComfyUI's own model detection recognises.

The diffusion transformers users run (Flux dev and schnell, SD3.5 large and medium, Qwen-Image,
Lumina 2, Z-Image, HunyuanImage 2.1, AuraFlow, Chroma) cannot be downloaded on the machines this
project runs on, so the test server loads files of the same layouts with deterministic random
weights (fixed seed), through ComfyUI's real loaders:

    diffusion_models/asyndm-random-flux-dev.safetensors   Flux dev, diffusion model only (UNETLoader);
                                                         guidance_in present, so guidance_embed
    checkpoints/asyndm-random-flux-schnell.safetensors   Flux schnell (no guidance_in) with a VAE
                                                         (CheckpointLoaderSimple; no text encoders)
    vae/asyndm-random-flux-vae.safetensors               the same 16-channel VAE alone (VAELoader)
    checkpoints/asyndm-random-sd35-large.safetensors     MMDiT with RMS q/k norms (SD3.5 large layout)
    checkpoints/asyndm-random-sd35-medium.safetensors    MMDiT with RMS q/k norms and a second,
                                                         self-attention x-block in layer 0 (SD3.5
                                                         medium layout), both with a 16-channel VAE
    diffusion_models/asyndm-random-qwen-image.safetensors       Qwen-Image (also Qwen-Image-Edit: the same
                                                                model given reference latents), 1 block
    diffusion_models/asyndm-random-lumina2.safetensors          Lumina 2 (NextDiT, width 2304), 1 layer
    diffusion_models/asyndm-random-z-image.safetensors          Z-Image (NextDiT, width 3840, pad tokens), 1 layer
    diffusion_models/asyndm-random-hunyuan-image21.safetensors  HunyuanImage 2.1 (64-channel latents, ByT5
                                                                mapper), one head of 128, 1 + 1 blocks
    diffusion_models/asyndm-random-auraflow.safetensors         AuraFlow (4-channel SDXL latents), 1 + 1 blocks
    diffusion_models/asyndm-random-chroma.safetensors           Chroma (distilled guidance layer), 1 + 1 blocks

The last six are diffusion models only (UNETLoader), in the dtype of the family's released files
(bfloat16; AuraFlow float16), each detected as its supported_models class (QwenImage, Lumina2,
ZImage, HunyuanImage21, AuraFlow, Chroma); see the *_UNET_CONFIG comments for what detection fixes.

    python scripts/make_dit_models.py --out DIR [--seed 0] [--force] [--check] [--comfyui PATH]
    python scripts/make_dit_models.py --out DIR --check-only [--only FILE_NAME ...]
    python scripts/make_dit_models.py --cache-key [--comfyui PATH]

Sizes are what detection allows:

- Flux: ComfyUI 0.3.75 fixes 24 heads of 128 channels (axes_dim 16+56+56) and an MLP ratio of 4,
  so the width is 3072; the depth is counted from the file, so one double and one single block
  keep the transformer at 545M parameters (1.0 GiB in float16). The text widths are the real ones
  (T5-XXL context 4096, CLIP-L pooled 768), so conditioning shaped like the real encoders' fits.
- MMDiT: the width is 64 x depth (read from x_embedder), heads of 64, depth blocks: depth 2 gives
  a 128-wide, two-block transformer. Context 4096 (T5-XXL) and pooled 2048 (CLIP-L + CLIP-G) as in
  SD3; position tables as large as SD3.5's (192 and 384 patches a side).
- VAE: ComfyUI detects a TAESD (``taesd_decoder.1.weight``) with 16 latent channels, the layout of
  the taef1 / taesd3 preview decoders: 2.4M parameters instead of the 84M of the real autoencoder,
  with the real latent scale and shift of each family (as VAELoader sets them for taef1 / taesd3).
- Qwen-Image: 380M parameters (0.71 GiB), its default width 3072; Lumina 2: 427M (0.80 GiB, the two
  noise- and two context-refiner layers are fixed); Z-Image: 909M (1.69 GiB, width 3840 is what
  selects it); HunyuanImage 2.1: 9.9M (width 128); AuraFlow: 548M (1.02 GiB, width 3072 fixed);
  Chroma: 631M (1.18 GiB, width 3072 and the 5 x 5120 approximator fixed). Learned token tables
  (AuraFlow's position table and registers, Z-Image's pad tokens) get make_models.py's embedding rule.

Each file is checked against ComfyUI's detection before it is written (the detected config must be
the one built, and the detected model class the family's); ``--check`` then loads every
file with ComfyUI's own loaders (comfy.sd.load_diffusion_model, load_checkpoint_guess_config,
comfy.sd.VAE) and prints what they report. Values come from make_models.py's init rule: one
generator per tensor, seeded from (seed, component, key), so the dev and schnell files share
every tensor they both have. scripts/setup.sh builds the folder once into the cache
(~/.cache/asyndm-comfyui/dit-models-<hash of this builder and of the ComfyUI files that define
these layouts>) and links it as .dev/dit-models.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load_make_models() -> Any:
    spec = importlib.util.spec_from_file_location("asyndm_make_models", HERE / "make_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


mm = _load_make_models()

# Bump when the content of any file changes (layout, init scheme, key names).
DIT_CONTENT_VERSION = "dit-v3"

FLUX_DEV_UNET = "diffusion_models/asyndm-random-flux-dev.safetensors"
FLUX_SCHNELL_CKPT = "checkpoints/asyndm-random-flux-schnell.safetensors"
FLUX_VAE = "vae/asyndm-random-flux-vae.safetensors"
SD35_LARGE_CKPT = "checkpoints/asyndm-random-sd35-large.safetensors"
SD35_MEDIUM_CKPT = "checkpoints/asyndm-random-sd35-medium.safetensors"
QWEN_IMAGE_UNET = "diffusion_models/asyndm-random-qwen-image.safetensors"
LUMINA2_UNET = "diffusion_models/asyndm-random-lumina2.safetensors"
Z_IMAGE_UNET = "diffusion_models/asyndm-random-z-image.safetensors"
HUNYUAN_IMAGE_UNET = "diffusion_models/asyndm-random-hunyuan-image21.safetensors"
AURAFLOW_UNET = "diffusion_models/asyndm-random-auraflow.safetensors"
CHROMA_UNET = "diffusion_models/asyndm-random-chroma.safetensors"
NEW_FAMILY_UNETS = (QWEN_IMAGE_UNET, LUMINA2_UNET, Z_IMAGE_UNET, HUNYUAN_IMAGE_UNET, AURAFLOW_UNET, CHROMA_UNET)
FILES = (FLUX_DEV_UNET, FLUX_SCHNELL_CKPT, FLUX_VAE, SD35_LARGE_CKPT, SD35_MEDIUM_CKPT, *NEW_FAMILY_UNETS)

# ComfyUI's source files that define these layouts and their detection: a change in any of them
# may change the files, so scripts/setup.sh keys its cache on them too.
LAYOUT_SOURCES = (
    "comfy/ldm/flux/model.py",
    "comfy/ldm/flux/layers.py",
    "comfy/ldm/modules/diffusionmodules/mmdit.py",
    "comfy/taesd/taesd.py",
    "comfy/ldm/qwen_image/model.py",
    "comfy/ldm/lightricks/model.py",  # Qwen-Image's timestep embedding
    "comfy/ldm/lumina/model.py",  # Lumina 2 and Z-Image (NextDiT)
    "comfy/ldm/hunyuan_video/model.py",  # HunyuanImage 2.1
    "comfy/ldm/aura/mmdit.py",
    "comfy/ldm/chroma/model.py",
    "comfy/ldm/chroma/layers.py",
    "comfy/model_detection.py",
    "comfy/supported_models.py",  # which class claims a detected config (HunyuanImage21, ZImage, ...)
)

T5_XXL_WIDTH = 4096  # context width of both families (T5-XXL)
FLUX_POOLED_WIDTH = 768  # CLIP-L pooled output
SD3_POOLED_WIDTH = 2048  # CLIP-L (768) + CLIP-G (1280) pooled outputs

# What comfy.model_detection.detect_unet_config derives from the Flux files (checked before writing).
FLUX_UNET_CONFIG: dict[str, Any] = {
    "image_model": "flux",
    "axes_dim": [16, 56, 56],
    "num_heads": 24,
    "mlp_ratio": 4.0,
    "theta": 10000,
    "out_channels": 16,
    "qkv_bias": True,
    "in_channels": 16,
    "hidden_size": 3072,
    "context_in_dim": T5_XXL_WIDTH,
    "patch_size": 2,
    "vec_in_dim": FLUX_POOLED_WIDTH,
    "depth": 1,
    "depth_single_blocks": 1,
    "guidance_embed": True,
}
FLUX_SCHNELL_UNET_CONFIG = {**FLUX_UNET_CONFIG, "guidance_embed": False}

MMDIT_DEPTH = 2  # width 128, two heads of 64, two joint blocks


def _mmdit_config(pos_embed_max_size: int, x_block_self_attn_layers: list[int]) -> dict[str, Any]:
    """What detect_unet_config derives from an SD3.5-style MMDiT of depth MMDIT_DEPTH."""
    width = 64 * MMDIT_DEPTH
    return {
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "depth": MMDIT_DEPTH,
        "input_size": None,
        "adm_in_channels": SD3_POOLED_WIDTH,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": T5_XXL_WIDTH, "out_features": width}},
        "num_patches": pos_embed_max_size**2,
        "pos_embed_max_size": pos_embed_max_size,
        "qk_norm": "rms",
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": x_block_self_attn_layers,
    }


SD35_LARGE_UNET_CONFIG = _mmdit_config(192, [])  # SD3.5 large: q/k RMS norms
SD35_MEDIUM_UNET_CONFIG = _mmdit_config(384, [0])  # SD3.5 medium: also self-attention x-blocks (MMDiT-X)

# The other families: diffusion-model-only files (UNETLoader), each what detect_unet_config derives
# from its keys (checked before writing), as shallow as detection lets it be (depth is counted from
# the file); the widths detection fixes, or that the class defaults to, are the real ones.
QWEN25_VL_7B_WIDTH = 3584  # Qwen-Image's and HunyuanImage 2.1's text encoder
GEMMA2_2B_WIDTH = 2304  # Lumina 2's
QWEN3_4B_WIDTH = 2560  # Z-Image's
PILE_T5_XL_WIDTH = 2048  # AuraFlow's (supported_models.AuraFlow matches cond_seq_dim 2048 only)
BYT5_SMALL_WIDTH = 1472  # HunyuanImage 2.1's glyph encoder (fixed in HunyuanVideo's ByT5Mapper)

# Qwen-Image: detection reads in_channels (64 = 16 x 2 x 2) and the block count only, so the class's
# defaults hold the rest: 24 heads of 128 (width 3072), text width 3584, out 16 channels in 2x2 patches.
QWEN_IMAGE_UNET_CONFIG: dict[str, Any] = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1}

# Lumina 2 (NextDiT): width 2304 selects the Lumina 2 options (24 query / 8 key-value heads of 96,
# RoPE axes 32+32+32, theta 10000, FFN x4); cap_feat_dim is Gemma-2-2B's. One main layer; the two noise
# refiner and two context refiner layers are the class's fixed default (detection does not read them).
LUMINA2_UNET_CONFIG: dict[str, Any] = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 2304, "cap_feat_dim": GEMMA2_2B_WIDTH,
    "n_layers": 1, "qk_norm": True, "n_heads": 24, "n_kv_heads": 8, "axes_dims": [32, 32, 32],
    "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0,
}
# Z-Image: width 3840 selects it (30 heads of 128, RoPE 32+48+48, theta 256, FFN x8/3, Z-Image modulation,
# time scale 1000); cap_pad_token (and x_pad_token) present, so caption and image pad to multiples of 32.
Z_IMAGE_UNET_CONFIG: dict[str, Any] = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": QWEN3_4B_WIDTH,
    "n_layers": 1, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
    "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
}
# HunyuanImage 2.1: the HunyuanVideo layout (txt_in.individual_token_refiner...) with a 2-D 1x1 patch
# embedder on 64 channels, no vector_in (vec_in_dim None: supported_models.HunyuanImage21, not
# HunyuanVideo), the ByT5 glyph mapper, no guidance embedding (the base model, cfg above 1), no
# meanflow. Detection sets heads = width / 128, so one head of 128 is the narrowest.
HUNYUAN_IMAGE_UNET_CONFIG: dict[str, Any] = {
    "image_model": "hunyuan_video", "in_channels": 64, "patch_size": [1, 1], "out_channels": 64, "vec_in_dim": None,
    "axes_dim": [64, 64], "meanflow": False, "context_in_dim": QWEN25_VL_7B_WIDTH, "hidden_size": 128,
    "mlp_ratio": 4.0, "num_heads": 1, "depth": 1, "depth_single_blocks": 1, "theta": 256, "qkv_bias": True,
    "byt5": True, "guidance_embed": False, "use_cond_type_embedding": False, "vision_in_dim": None,
}
# AuraFlow: detection reads the position table (max_seq: the class's default 32 x 32 tokens, interpolated
# above), the text width and the block counts; the width is the class's 3072 (12 heads of 256).
AURAFLOW_UNET_CONFIG: dict[str, Any] = {"max_seq": 32 * 32, "cond_seq_dim": PILE_T5_XL_WIDTH, "n_double_layers": 1,
                                        "n_layers": 2}
# Chroma: Flux's layout without modulation layers, with the distilled guidance layer (Approximator,
# fixed at 5 layers of 5120); 24 heads of 128 fix the width at 3072; T5-XXL context, no pooled input.
CHROMA_UNET_CONFIG: dict[str, Any] = {
    "image_model": "chroma", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 64, "qkv_bias": True, "in_channels": 64, "hidden_size": 3072, "context_in_dim": T5_XXL_WIDTH,
    "patch_size": 2, "depth": 1, "depth_single_blocks": 1, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120,
    "n_layers": 5,
}


# The latent scale and shift of each family's VAE (latent_formats.Flux / SD3; VAELoader's taef1 / taesd3).
VAE_SCALE_SHIFT = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}


# --------------------------------------------------------------------------------------------
# Layouts: ComfyUI's own classes on the meta device


def _meta_flux(config: dict[str, Any]) -> Any:
    import comfy.ops
    import torch
    from comfy.ldm.flux.model import Flux

    with torch.device("meta"):
        return Flux(**config, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)


def _meta_mmdit(config: dict[str, Any]) -> Any:
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    with torch.device("meta"):
        return OpenAISignatureMMDITWrapper(**config, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)


def _meta_dit(module: str, class_name: str, config: dict[str, Any]) -> Any:
    """ComfyUI's class ``module.class_name`` built from ``config`` on the meta device."""
    import importlib

    import comfy.ops
    import torch

    cls = getattr(importlib.import_module(module), class_name)
    with torch.device("meta"):
        return cls(**config, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)


def _token_table(seed: int, component: str, key: str, shape: tuple[int, ...]) -> Any:
    """A learned token or position table (AuraFlow's positional_encoding and register_tokens, Z-Image's pad
    tokens): normal with std 1/sqrt(2), make_models.py's rule for embeddings."""
    import math

    import torch

    gen = torch.Generator().manual_seed(mm.tensor_seed(seed, component, key))
    return torch.randn(shape, generator=gen) * (1.0 / math.sqrt(2.0))


def _meta_taesd16() -> Any:
    import torch
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        return TAESD(latent_channels=16)


def _pos_embed(config: dict[str, Any]) -> Any:
    """SD3's fixed 2-D sin-cos position table, (1, size^2, width)."""
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    size = config["pos_embed_max_size"]
    table = get_2d_sincos_pos_embed(64 * config["depth"], size)
    return torch.from_numpy(table).float().unsqueeze(0)


def _meta_sd3_clip_l() -> Any:
    """ComfyUI's SD3 text-encoder wrapper holding only CLIP-L (full width: ComfyUI fixes CLIP's config)."""
    import comfy.text_encoders.sd3_clip
    import torch

    with torch.device("meta"):
        return comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=False, t5=False)(
            device=torch.device("meta"), dtype=torch.float32)


def taesd16_state_dict(seed: int, family: str) -> dict[str, Any]:
    """A 16-channel TAESD with the family's latent scale and shift (kept in float32: float16 would
    round SD3's 1.5305 to 1.5303)."""
    import torch

    scale, shift = VAE_SCALE_SHIFT[family]
    sd = dict(mm.random_state_dict(_meta_taesd16(), "taesd16", seed, {"vae_scale": scale, "vae_shift": shift}))
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(scale), torch.tensor(shift)
    return sd


def check_detection(unet_sd: dict[str, Any], prefix: str, expected: dict[str, Any], model_class: str) -> None:
    """ComfyUI must detect exactly `expected` from these keys, as supported_models.`model_class`."""
    import comfy.model_detection

    detected = comfy.model_detection.detect_unet_config(unet_sd, prefix)
    diff = {k: (v, detected.get(k)) for k, v in expected.items() if detected.get(k) != v}
    extra = sorted(set(detected) - set(expected))
    if diff or extra:
        raise RuntimeError(f"{model_class}: ComfyUI detects another config: differs {diff}, unexpected keys {extra}")
    found = comfy.model_detection.model_config_from_unet_config(detected, unet_sd)
    if type(found).__name__ != model_class:
        raise RuntimeError(f"ComfyUI detects {type(found).__name__}, not {model_class}")


# --------------------------------------------------------------------------------------------
# The files


def flux_files(seed: int) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    """{file: (tensors, extra metadata)} for the Flux dev transformer, the schnell checkpoint and the VAE."""
    dev = mm.random_state_dict(_meta_flux(FLUX_UNET_CONFIG), "flux", seed)
    check_detection(dev, "", FLUX_UNET_CONFIG, "Flux")
    schnell = {k: v for k, v in dev.items() if not k.startswith("guidance_in.")}
    schnell_ckpt = {"model.diffusion_model." + k: v for k, v in schnell.items()}
    check_detection(schnell_ckpt, "model.diffusion_model.", FLUX_SCHNELL_UNET_CONFIG, "FluxSchnell")
    vae = taesd16_state_dict(seed, "flux")
    schnell_ckpt.update({"vae." + k: v for k, v in vae.items()})  # supported_models.Flux.vae_key_prefix
    return {
        FLUX_DEV_UNET: (dev, {"asyndm_unet_config": json.dumps(FLUX_UNET_CONFIG, sort_keys=True)}),
        FLUX_SCHNELL_CKPT: (schnell_ckpt, {"asyndm_unet_config": json.dumps(FLUX_SCHNELL_UNET_CONFIG, sort_keys=True)}),
        FLUX_VAE: (vae, {}),
    }


def sd35_files(seed: int) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    out = {}
    vae = {"first_stage_model." + k: v for k, v in taesd16_state_dict(seed, "sd3").items()}
    for rel, config, component in ((SD35_LARGE_CKPT, SD35_LARGE_UNET_CONFIG, "mmdit-large"),
                                   (SD35_MEDIUM_CKPT, SD35_MEDIUM_UNET_CONFIG, "mmdit-medium")):
        unet = mm.random_state_dict(_meta_mmdit(config), component, seed, values={"pos_embed": _pos_embed(config)})
        ckpt = {"model.diffusion_model." + k: v for k, v in unet.items()}
        check_detection(ckpt, "model.diffusion_model.", config, "SD3")
        ckpt.update(vae)
        if rel == SD35_LARGE_CKPT:  # a real SD3 CLIP (CLIP-L only), so key words run through the server
            clip = mm.random_state_dict(_meta_sd3_clip_l(), "sd3-clip-l", seed)
            ckpt.update({"text_encoders." + k: v for k, v in clip.items()})  # supported_models.SD3's prefix
        out[rel] = (ckpt, {"asyndm_unet_config": json.dumps(config, sort_keys=True)})
    return out


# (file, ComfyUI module, class, config, supported_models class, dtype of the family's released files)
UNET_FAMILIES: tuple[tuple[str, str, str, dict[str, Any], str, str], ...] = (
    (QWEN_IMAGE_UNET, "comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel", QWEN_IMAGE_UNET_CONFIG,
     "QwenImage", "bfloat16"),
    (LUMINA2_UNET, "comfy.ldm.lumina.model", "NextDiT", LUMINA2_UNET_CONFIG, "Lumina2", "bfloat16"),
    (Z_IMAGE_UNET, "comfy.ldm.lumina.model", "NextDiT", Z_IMAGE_UNET_CONFIG, "ZImage", "bfloat16"),
    (HUNYUAN_IMAGE_UNET, "comfy.ldm.hunyuan_video.model", "HunyuanVideo", HUNYUAN_IMAGE_UNET_CONFIG,
     "HunyuanImage21", "bfloat16"),
    (AURAFLOW_UNET, "comfy.ldm.aura.mmdit", "MMDiT", AURAFLOW_UNET_CONFIG, "AuraFlow", "float16"),
    (CHROMA_UNET, "comfy.ldm.chroma.model", "Chroma", CHROMA_UNET_CONFIG, "Chroma", "bfloat16"),
)
# The learned tables that are no Linear / norm / embedding weights, given values by _token_table.
TOKEN_TABLES = ("positional_encoding", "register_tokens", "x_pad_token", "cap_pad_token")


def unet_family_file(rel: str, seed: int) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    """{rel: (tensors, metadata)} for one of UNET_FAMILIES: a diffusion model only, in its family's dtype."""
    import torch

    (module, class_name, config, model_class, dtype), = [f[1:] for f in UNET_FAMILIES if f[0] == rel]
    component = Path(rel).stem.removeprefix("asyndm-random-")
    meta = _meta_dit(module, class_name, config)
    tables = {k: _token_table(seed, component, k, tuple(v.shape))
              for k, v in meta.state_dict().items() if k in TOKEN_TABLES}
    sd = mm.random_state_dict(meta, component, seed, values=tables)
    del meta
    check_detection(sd, "", config, model_class)
    for k in list(sd):  # one tensor at a time, so the peak stays near one copy
        sd[k] = sd[k].to(getattr(torch, dtype))
    return {rel: (sd, {"asyndm_unet_config": json.dumps(config, sort_keys=True), "asyndm_model_class": model_class})}


def file_metadata(seed: int, kind: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {mm.META_VERSION_KEY: DIT_CONTENT_VERSION, "seed": str(seed), "asyndm_kind": kind}
    meta.update(extra or {})
    return meta


def is_current(path: Path, seed: int, kind: str) -> bool:
    if not path.is_file():
        return False
    try:
        meta = mm.read_metadata(path)
    except (OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in file_metadata(seed, kind).items())


def make_dit_models(out: str | os.PathLike[str], seed: int = 0, force: bool = False,
                    comfyui: str | os.PathLike[str] | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Path]:
    """Write (or keep) every file under ``out``; return {relative name: path}."""
    mm.setup_comfyui(comfyui)
    out = Path(out)
    t_all = time.perf_counter()
    jobs: list[tuple[str, Callable[[int], dict[str, tuple[dict[str, Any], dict[str, str]]]], tuple[str, ...]]] = [
        ("flux", flux_files, (FLUX_DEV_UNET, FLUX_SCHNELL_CKPT, FLUX_VAE)),
        ("sd35", sd35_files, (SD35_LARGE_CKPT, SD35_MEDIUM_CKPT)),
        *((Path(rel).stem.removeprefix("asyndm-random-"), functools.partial(unet_family_file, rel), (rel,))
          for rel, *_ in UNET_FAMILIES),
    ]
    written: dict[str, Path] = {}
    for kind, build, rels in jobs:
        if not force and all(is_current(out / r, seed, kind) for r in rels):
            for r in rels:
                log(f"make_dit_models: up to date {out / r}")
                written[r] = out / r
            continue
        t0 = time.perf_counter()
        files = build(seed)
        log(f"make_dit_models: built {kind} in {time.perf_counter() - t0:.1f} s")
        for rel, (tensors, extra) in files.items():
            t1 = time.perf_counter()
            path = out / rel
            params = {"total": mm.count_params(tensors)}
            mm.write_atomic(path, {k: v.contiguous() for k, v in tensors.items()},
                            file_metadata(seed, kind, {**extra, "asyndm_params": json.dumps(params)}))
            log(f"make_dit_models: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, "
                f"{params['total'] / 1e6:.1f}M params, {time.perf_counter() - t1:.1f} s)")
            written[rel] = path
        del files
    log(f"make_dit_models: done in {time.perf_counter() - t_all:.1f} s")
    return written


# --------------------------------------------------------------------------------------------
# Loading them as ComfyUI does


def check_files(out: str | os.PathLike[str], comfyui: str | os.PathLike[str] | None = None,
                only: Collection[str] | None = None) -> dict[str, dict[str, Any]]:
    """Load every file (or those whose file names are in ``only``) with ComfyUI's own loaders; raise
    unless each is the family it should be.

    Returns {file: what ComfyUI reports} (model class, model type, the config keys that tell the
    variants apart, the VAE's latent channels, whether a text encoder came with it; for the
    diffusion-model-only families also the latent channels, the time shift and the parameter count).
    """
    mm.setup_comfyui(comfyui)
    import logging

    import comfy.sd
    import comfy.utils

    # ComfyUI warns that these files hold no text encoder (by design) and that torchaudio is missing.
    logging.getLogger().setLevel(logging.ERROR)

    out = Path(out)
    report: dict[str, dict[str, Any]] = {}

    def model_facts(patcher: Any, rel: str = "") -> dict[str, Any]:
        cfg = patcher.model.model_config.unet_config
        keep = ("image_model", "guidance_embed", "hidden_size", "depth", "depth_single_blocks", "qk_norm",
                "x_block_self_attn_layers", "pos_embed_max_size", "adm_in_channels", "context_in_dim",
                # the other families
                "in_channels", "num_layers", "dim", "cap_feat_dim", "n_layers", "n_heads", "pad_tokens_multiple",
                "patch_size", "num_heads", "byt5", "meanflow", "vec_in_dim", "max_seq", "cond_seq_dim",
                "n_double_layers", "hidden_dim")
        facts = {"config_class": type(patcher.model.model_config).__name__,
                 "model_class": type(patcher.model).__name__,
                 "model_type": patcher.model.model_type.name,
                 "diffusion_model": type(patcher.model.diffusion_model).__name__,
                 **{k: cfg[k] for k in keep if k in cfg}}
        if rel in NEW_FAMILY_UNETS:  # what the samplers see: the latent space and the time shift
            facts["latent_channels"] = patcher.model.latent_format.latent_channels
            facts["shift"] = round(float(getattr(patcher.model.model_sampling, "shift", 0.0)), 6)
            facts["params"] = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
        return facts

    def vae_facts(vae: Any) -> dict[str, Any]:
        first = vae.first_stage_model
        return {"vae": type(first).__name__, "latent_channels": vae.latent_channels,
                "vae_scale": round(first.vae_scale.item(), 6), "vae_shift": round(first.vae_shift.item(), 6)}

    unknown = sorted(set(only or ()) - {Path(rel).name for rel in FILES})
    if unknown:
        raise ValueError(f"no such file among make_dit_models' files: {unknown}")

    def wanted(rel: str) -> bool:
        return only is None or Path(rel).name in only

    t0 = time.perf_counter()
    if wanted(FLUX_DEV_UNET):
        report[FLUX_DEV_UNET] = model_facts(comfy.sd.load_diffusion_model(str(out / FLUX_DEV_UNET)))
    for rel in filter(wanted, (FLUX_SCHNELL_CKPT, SD35_LARGE_CKPT, SD35_MEDIUM_CKPT)):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(out / rel), output_vae=True, output_clip=True)
        report[rel] = {**model_facts(model), **vae_facts(vae), "clip": clip is not None}
        del model, clip, vae
    if wanted(FLUX_VAE):
        report[FLUX_VAE] = vae_facts(comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(out / FLUX_VAE))))
    for rel in filter(wanted, NEW_FAMILY_UNETS):  # UNETLoader's path, one model in memory at a time
        patcher = comfy.sd.load_diffusion_model(str(out / rel))
        report[rel] = model_facts(patcher, rel)
        del patcher

    want = {
        FLUX_DEV_UNET: {"config_class": "Flux", "model_class": "Flux", "model_type": "FLUX", "guidance_embed": True},
        FLUX_SCHNELL_CKPT: {"config_class": "FluxSchnell", "model_class": "Flux", "model_type": "FLOW",
                            "guidance_embed": False, "vae": "TAESD", "latent_channels": 16,
                            "vae_scale": VAE_SCALE_SHIFT["flux"][0], "vae_shift": VAE_SCALE_SHIFT["flux"][1], "clip": False},
        FLUX_VAE: {"vae": "TAESD", "latent_channels": 16, "vae_scale": VAE_SCALE_SHIFT["flux"][0]},
        SD35_LARGE_CKPT: {"config_class": "SD3", "model_class": "SD3", "model_type": "FLOW", "qk_norm": "rms",
                          "x_block_self_attn_layers": [], "vae": "TAESD", "latent_channels": 16,
                          "vae_scale": VAE_SCALE_SHIFT["sd3"][0], "clip": True},
        SD35_MEDIUM_CKPT: {"config_class": "SD3", "model_class": "SD3", "model_type": "FLOW", "qk_norm": "rms",
                           "x_block_self_attn_layers": [0], "pos_embed_max_size": 384, "vae": "TAESD",
                           "latent_channels": 16, "clip": False},
        QWEN_IMAGE_UNET: {"config_class": "QwenImage", "model_class": "QwenImage", "model_type": "FLUX",
                          "diffusion_model": "QwenImageTransformer2DModel", "num_layers": 1, "latent_channels": 16},
        LUMINA2_UNET: {"config_class": "Lumina2", "model_class": "Lumina2", "model_type": "FLOW", "dim": 2304,
                       "cap_feat_dim": GEMMA2_2B_WIDTH, "n_layers": 1, "latent_channels": 16, "shift": 6.0},
        Z_IMAGE_UNET: {"config_class": "ZImage", "model_class": "Lumina2", "model_type": "FLOW", "dim": 3840,
                       "cap_feat_dim": QWEN3_4B_WIDTH, "pad_tokens_multiple": 32, "latent_channels": 16, "shift": 3.0},
        HUNYUAN_IMAGE_UNET: {"config_class": "HunyuanImage21", "model_class": "HunyuanImage21", "model_type": "FLOW",
                             "diffusion_model": "HunyuanVideo", "patch_size": [1, 1], "byt5": True, "meanflow": False,
                             "guidance_embed": False, "latent_channels": 64, "shift": 5.0},
        AURAFLOW_UNET: {"config_class": "AuraFlow", "model_class": "AuraFlow", "model_type": "FLOW",
                        "cond_seq_dim": PILE_T5_XL_WIDTH, "n_double_layers": 1, "n_layers": 2, "latent_channels": 4},
        CHROMA_UNET: {"config_class": "Chroma", "model_class": "Chroma", "model_type": "FLUX", "image_model": "chroma",
                      "hidden_size": 3072, "depth": 1, "depth_single_blocks": 1, "latent_channels": 16},
    }
    wrong = {rel: {k: (v, report[rel].get(k)) for k, v in facts.items() if report[rel].get(k) != v}
             for rel, facts in want.items() if rel in report}
    wrong = {rel: d for rel, d in wrong.items() if d}
    if wrong:
        raise RuntimeError(f"ComfyUI loads these files as something else (wanted, got): {wrong}")
    print(f"make_dit_models: loaded {len(report)} files with ComfyUI's loaders in {time.perf_counter() - t0:.1f} s")
    return report


def cache_key(comfyui: str | os.PathLike[str] | None = None) -> str:
    """16 hex digits that change when these files could: this builder, make_models.py (the init rule)
    and ComfyUI's LAYOUT_SOURCES (a missing one counts as empty)."""
    import hashlib

    root = Path(comfyui or os.environ.get("COMFYUI_PATH") or mm.DEFAULT_COMFYUI)
    digest = hashlib.sha256()
    for path in (HERE / "make_dit_models.py", HERE / "make_models.py", *(root / rel for rel in LAYOUT_SOURCES)):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", help="a ComfyUI models folder to write into")
    parser.add_argument("--cache-key", action="store_true",
                        help="print the key scripts/setup.sh caches the folder under, and exit")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rewrite files that are up to date")
    parser.add_argument("--check", action="store_true",
                        help="then load every file with ComfyUI's loaders and print what they detect (JSON)")
    parser.add_argument("--check-only", action="store_true", help="only the check, write nothing")
    parser.add_argument("--only", nargs="+", metavar="FILE_NAME",
                        help="check only these files (file names, e.g. asyndm-random-chroma.safetensors)")
    parser.add_argument("--comfyui", default=None, help="ComfyUI tree (default $COMFYUI_PATH or .dev/ComfyUI)")
    args = parser.parse_args(argv)
    if args.cache_key:
        print(cache_key(args.comfyui))
        return 0
    if not args.out:
        parser.error("--out is required")
    if not args.check_only:
        make_dit_models(args.out, seed=args.seed, force=args.force, comfyui=args.comfyui)
    if args.check or args.check_only:
        for rel, facts in check_files(args.out, comfyui=args.comfyui, only=args.only).items():
            print(f"make_dit_models: ComfyUI loads {rel} as {json.dumps(facts, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
