#!/usr/bin/env python3
"""Write random-weight Flux and SD3 (MMDiT) model files that ComfyUI's own model detection recognises.

The diffusion transformers users run (Flux dev and schnell, SD3.5 large and medium) cannot be
downloaded on the machines this project runs on, so the test server loads files of the same
layouts with deterministic random weights (fixed seed), through ComfyUI's real loaders:

    diffusion_models/asyndm-random-flux-dev.safetensors   Flux dev, diffusion model only (UNETLoader);
                                                         guidance_in present, so guidance_embed
    checkpoints/asyndm-random-flux-schnell.safetensors   Flux schnell (no guidance_in) with a VAE
                                                         (CheckpointLoaderSimple; no text encoders)
    vae/asyndm-random-flux-vae.safetensors               the same 16-channel VAE alone (VAELoader)
    checkpoints/asyndm-random-sd35-large.safetensors     MMDiT with RMS q/k norms (SD3.5 large layout)
    checkpoints/asyndm-random-sd35-medium.safetensors    MMDiT with RMS q/k norms and a second,
                                                         self-attention x-block in layer 0 (SD3.5
                                                         medium layout), both with a 16-channel VAE

    python scripts/make_dit_models.py --out DIR [--seed 0] [--force] [--check] [--comfyui PATH]
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

Each file is checked against ComfyUI's detection before it is written (the detected config must be
the one built, and the detected model class Flux, FluxSchnell or SD3); ``--check`` then loads every
file with ComfyUI's own loaders (comfy.sd.load_diffusion_model, load_checkpoint_guess_config,
comfy.sd.VAE) and prints what they report. Values come from make_models.py's init rule: one
generator per tensor, seeded from (seed, component, key), so the dev and schnell files share
every tensor they both have. scripts/setup.sh builds the folder once into the cache
(~/.cache/asyndm-comfyui/dit-models-<hash of this builder and of the ComfyUI files that define
these layouts>) and links it as .dev/dit-models.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
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
DIT_CONTENT_VERSION = "dit-v2"

FLUX_DEV_UNET = "diffusion_models/asyndm-random-flux-dev.safetensors"
FLUX_SCHNELL_CKPT = "checkpoints/asyndm-random-flux-schnell.safetensors"
FLUX_VAE = "vae/asyndm-random-flux-vae.safetensors"
SD35_LARGE_CKPT = "checkpoints/asyndm-random-sd35-large.safetensors"
SD35_MEDIUM_CKPT = "checkpoints/asyndm-random-sd35-medium.safetensors"
FILES = (FLUX_DEV_UNET, FLUX_SCHNELL_CKPT, FLUX_VAE, SD35_LARGE_CKPT, SD35_MEDIUM_CKPT)

# ComfyUI's source files that define these layouts and their detection: a change in any of them
# may change the files, so scripts/setup.sh keys its cache on them too.
LAYOUT_SOURCES = (
    "comfy/ldm/flux/model.py",
    "comfy/ldm/flux/layers.py",
    "comfy/ldm/modules/diffusionmodules/mmdit.py",
    "comfy/taesd/taesd.py",
    "comfy/model_detection.py",
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


def check_files(out: str | os.PathLike[str], comfyui: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """Load every file with ComfyUI's own loaders; raise unless each is the family it should be.

    Returns {file: what ComfyUI reports} (model class, model type, the config keys that tell the
    variants apart, the VAE's latent channels, whether a text encoder came with it).
    """
    mm.setup_comfyui(comfyui)
    import logging

    import comfy.sd
    import comfy.utils

    # ComfyUI warns that these files hold no text encoder (by design) and that torchaudio is missing.
    logging.getLogger().setLevel(logging.ERROR)

    out = Path(out)
    report: dict[str, dict[str, Any]] = {}

    def model_facts(patcher: Any) -> dict[str, Any]:
        cfg = patcher.model.model_config.unet_config
        keep = ("image_model", "guidance_embed", "hidden_size", "depth", "depth_single_blocks", "qk_norm",
                "x_block_self_attn_layers", "pos_embed_max_size", "adm_in_channels", "context_in_dim")
        return {"config_class": type(patcher.model.model_config).__name__,
                "model_class": type(patcher.model).__name__,
                "model_type": patcher.model.model_type.name,
                "diffusion_model": type(patcher.model.diffusion_model).__name__,
                **{k: cfg[k] for k in keep if k in cfg}}

    def vae_facts(vae: Any) -> dict[str, Any]:
        first = vae.first_stage_model
        return {"vae": type(first).__name__, "latent_channels": vae.latent_channels,
                "vae_scale": round(first.vae_scale.item(), 6), "vae_shift": round(first.vae_shift.item(), 6)}

    t0 = time.perf_counter()
    report[FLUX_DEV_UNET] = model_facts(comfy.sd.load_diffusion_model(str(out / FLUX_DEV_UNET)))
    for rel in (FLUX_SCHNELL_CKPT, SD35_LARGE_CKPT, SD35_MEDIUM_CKPT):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(out / rel), output_vae=True, output_clip=True)
        report[rel] = {**model_facts(model), **vae_facts(vae), "clip": clip is not None}
        del model, clip, vae
    report[FLUX_VAE] = vae_facts(comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(out / FLUX_VAE))))

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
    }
    wrong = {rel: {k: (v, report[rel].get(k)) for k, v in facts.items() if report[rel].get(k) != v}
             for rel, facts in want.items()}
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
        for rel, facts in check_files(args.out, comfyui=args.comfyui).items():
            print(f"make_dit_models: ComfyUI loads {rel} as {json.dumps(facts, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
