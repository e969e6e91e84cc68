#!/usr/bin/env python3
"""Write model files with random weights of real architectures, for tests and the demo.

No model weights can be downloaded on the machines this project runs on, so the dev harness
writes its own: checkpoints that ComfyUI's loaders detect as real model families, filled with
deterministic random values (fixed seed) of sensible scale, so every activation stays finite.

    python scripts/make_models.py --out DIR [--seed 0] [--force] [--sdxl] [--comfyui PATH]

DIR is laid out like ComfyUI's ``models`` folder:

    checkpoints/asyndm-random-sd15.safetensors   SD1.5 (mini 3-level UNet, CLIP-L, TAESD as VAE)
    vae_approx/taesd_decoder.safetensors         TAESD for latent previews (same weights as the
    vae_approx/taesd_encoder.safetensors         checkpoint's VAE)
    checkpoints/asyndm-random-sdxl.safetensors   only with --sdxl (large: CLIP-G is 694M params)

The script is idempotent: a file whose safetensors metadata already carries this content
version and seed is left alone (``--force`` rewrites). Files are written to a temporary name
in the same folder and renamed into place, so a reader never sees half a file.

Every tensor is drawn from its own ``torch.Generator``, seeded from (seed, component, key), so
a tensor's values do not depend on which other tensors exist. ComfyUI's own classes define
the layouts: they are built on the ``meta`` device (no memory) and only their state-dict
shapes are used; the keys are then converted with the model config's own "for saving" rules.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = REPO_ROOT / ".dev" / "ComfyUI"

# Bump when the content of any file changes (architecture, init scheme, key layout).
CONTENT_VERSION = "v1"
META_VERSION_KEY = "asyndm_random_model"

SD15_CHECKPOINT = "checkpoints/asyndm-random-sd15.safetensors"
SDXL_CHECKPOINT = "checkpoints/asyndm-random-sdxl.safetensors"
TAESD_DECODER = "vae_approx/taesd_decoder.safetensors"
TAESD_ENCODER = "vae_approx/taesd_encoder.safetensors"

# The smallest UNet ComfyUI detects as SD1.5 (model_channels 320, context_dim 768) that still
# has cross-attention at latent size 1, 1/2 and 1/4: three levels of 320 channels, one res
# block and one transformer block per level, attention in every input/output block and in the
# middle block, like SD1.5's attention levels. These are exactly the keys ComfyUI's
# model_detection.detect_unet_config() derives from the file (checked before writing).
SD15_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [1, 1, 1],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "channel_mult": [1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

# SDXL family, smallest layout ComfyUI detects (Segmind Vega's transformer depths, which load as
# model_base.SDXL) with every level at 320 channels instead of 320/640/1280.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "channel_mult": [1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

# TAESD's scale for each latent space (as ComfyUI's VAELoader sets it for taesd / taesdxl).
TAESD_SCALE = {"sd15": 0.18215, "sdxl": 0.13025}

# Scalars that are not weights: their real values.
SCALAR_VALUES = {"logit_scale": 4.6055, "vae_shift": 0.0}


# --------------------------------------------------------------------------------------------
# ComfyUI


def setup_comfyui(path: str | os.PathLike[str] | None = None) -> Path:
    """Put a ComfyUI tree on sys.path (idempotent) and return it.

    Order: ``path``, then $COMFYUI_PATH, then .dev/ComfyUI next to this repository. When
    ComfyUI's model management is not imported yet, it is told to use the CPU: writing files
    never needs an accelerator.
    """
    root = Path(path or os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).resolve()
    if not (root / "comfy").is_dir():
        raise SystemExit(
            f"make_models: no ComfyUI tree at {root} "
            "(pass --comfyui, set COMFYUI_PATH, or run scripts/setup.sh)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True
    return root


# --------------------------------------------------------------------------------------------
# Deterministic random values


def tensor_seed(seed: int, component: str, key: str) -> int:
    digest = hashlib.sha256(f"asyndm/{CONTENT_VERSION}/{seed}/{component}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _owner_modules(module: Any) -> dict[str, Any]:
    """Map each parameter/buffer name of ``module`` to the module that holds it."""
    owners = {}
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            owners[prefix + name] = mod
    return owners


def _is_norm(owner: Any) -> bool:
    """GroupNorm, LayerNorm, BatchNorm, and the RMSNorm classes of torch and of ComfyUI's DiTs
    (Flux keeps its weight as ``scale``, MMDiT and ComfyUI's ops as ``weight``)."""
    import torch

    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    return isinstance(owner, norms) or type(owner).__name__.endswith("RMSNorm")


def random_state_dict(module: Any, component: str, seed: int, scalars: dict[str, float] | None = None,
                      values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Values for every entry of ``module``'s state dict (which may live on the meta device).

    Conv/Linear weights: normal, std 1/sqrt(fan_in). Embeddings: normal, std 1/sqrt(2) (token
    and position embeddings are summed). Norm weights (and RMSNorm scales): ones. Biases: zeros.
    Named scalars: their real values. ``values``: given tensors for the keys it names (fixed
    tables such as a sin-cos position embedding). Anything else is an error, so no tensor is
    ever left uninitialised. Returned tensors are float16 on the CPU.
    """
    import torch

    scalars = {**SCALAR_VALUES, **(scalars or {})}
    values = values or {}
    owners = _owner_modules(module)
    out = {}
    for key, ref in module.state_dict().items():
        shape = tuple(ref.shape)
        leaf = key.rsplit(".", 1)[-1]
        owner = owners.get(key)
        if key in values:
            value = torch.as_tensor(values[key], dtype=torch.float32)
            if tuple(value.shape) != shape:
                raise ValueError(f"{component}:{key}: given shape {tuple(value.shape)}, the module has {shape}")
        elif len(shape) == 0:
            if leaf not in scalars:
                raise ValueError(f"no value defined for scalar {component}:{key}")
            value = torch.tensor(float(scalars[leaf]))
        elif leaf == "bias":
            value = torch.zeros(shape)
        elif _is_norm(owner):
            value = torch.ones(shape)
        elif isinstance(owner, torch.nn.Embedding):
            gen = torch.Generator().manual_seed(tensor_seed(seed, component, key))
            value = torch.randn(shape, generator=gen) * (1.0 / math.sqrt(2.0))
        elif isinstance(owner, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and leaf == "weight":
            fan_in = math.prod(shape[1:])
            gen = torch.Generator().manual_seed(tensor_seed(seed, component, key))
            value = torch.randn(shape, generator=gen) * (1.0 / math.sqrt(fan_in))
        else:
            raise ValueError(f"no init rule for {component}:{key} ({type(owner).__name__}, {shape})")
        out[key] = value.to(torch.float16)
    return out


# --------------------------------------------------------------------------------------------
# Model layouts (ComfyUI's own classes, on the meta device)


def _meta_unet(model_config: Any) -> Any:
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return UNetModel(**model_config.unet_config, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)


def _meta_clip(model_config: Any) -> Any:
    import torch

    target = model_config.clip_target()
    with torch.device("meta"):
        return target.clip(device=torch.device("meta"), dtype=torch.float32)


def _meta_taesd() -> Any:
    import torch
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        return TAESD(latent_channels=4)


def build_checkpoint(family: str, seed: int) -> tuple[dict[str, Any], Any]:
    """State dict (checkpoint key layout) and ComfyUI model config for ``family``."""
    import comfy.model_detection
    import comfy.supported_models

    if family == "sd15":
        model_config = comfy.supported_models.SD15(SD15_UNET_CONFIG)
    elif family == "sdxl":
        model_config = comfy.supported_models.Segmind_Vega(SDXL_UNET_CONFIG)
    else:
        raise ValueError(family)

    unet_sd = random_state_dict(_meta_unet(model_config), "unet-" + family, seed)
    # CLIP-L is shared: the same key gets the same values in the SD1.5 and SDXL files.
    clip_sd = random_state_dict(_meta_clip(model_config), "clip", seed)
    vae_sd = random_state_dict(_meta_taesd(), "vae", seed, {"vae_scale": TAESD_SCALE[family]})

    sd = {}
    sd.update(model_config.process_unet_state_dict_for_saving(unet_sd))
    sd.update(model_config.process_clip_state_dict_for_saving(clip_sd))
    sd.update(model_config.process_vae_state_dict_for_saving(vae_sd))
    sd = {k: v.contiguous() for k, v in sd.items()}

    # What ComfyUI will detect from this file must be what was built.
    prefix = "model.diffusion_model."
    detected = comfy.model_detection.detect_unet_config(sd, prefix)
    expected = SD15_UNET_CONFIG if family == "sd15" else SDXL_UNET_CONFIG
    diff = {k: (v, detected.get(k)) for k, v in expected.items() if detected.get(k) != v}
    if diff:
        raise RuntimeError(f"{family}: ComfyUI detects a different UNet config: {diff}")
    found = comfy.model_detection.model_config_from_unet_config(detected, sd)
    if type(found) is not type(model_config):
        raise RuntimeError(f"{family}: ComfyUI detects {type(found).__name__}, not {type(model_config).__name__}")
    return sd, model_config


def build_taesd_approx(seed: int) -> dict[str, dict[str, Any]]:
    """vae_approx files: the checkpoint VAE's encoder/decoder weights, without prefixes."""
    sd = random_state_dict(_meta_taesd(), "vae", seed, {"vae_scale": TAESD_SCALE["sd15"]})
    files = {}
    for part, rel in (("taesd_decoder.", TAESD_DECODER), ("taesd_encoder.", TAESD_ENCODER)):
        files[rel] = {k[len(part):]: v for k, v in sd.items() if k.startswith(part)}
    return files


# --------------------------------------------------------------------------------------------
# Files


def file_metadata(seed: int, kind: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {META_VERSION_KEY: CONTENT_VERSION, "seed": str(seed), "asyndm_kind": kind}
    meta.update(extra or {})
    return meta


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's ``__metadata__``, read from its header alone (no torch import).

    Raises ValueError when the file is not a whole safetensors file (its size must match the
    header's data offsets), so a truncated file is never taken as current.
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file")
        header = json.loads(f.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size != 8 + length + end:
        raise ValueError(f"{path}: truncated or padded")
    return header.get("__metadata__") or {}


def is_current(path: Path, seed: int, kind: str) -> bool:
    """True when ``path`` exists and was written by this content version with this seed."""
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except (OSError, ValueError, struct.error):
        return False
    want = file_metadata(seed, kind)
    return all(meta.get(k) == v for k, v in want.items())


def _sort_header_metadata(path: Path) -> None:
    """Rewrite the safetensors header with its metadata keys sorted, in place.

    safetensors writes the metadata map in hash order, which changes from run to run; sorted,
    the same seed gives byte-identical files. Same keys and values, so the header keeps its
    length (padded with spaces, as safetensors pads it).
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        data = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(data) > length:  # never: same content, same compact form
            return
        f.seek(8)
        f.write(data + b" " * (length - len(data)))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name without the .safetensors suffix: ComfyUI never lists a half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_header_metadata(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; use the usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def count_params(tensors: dict[str, Any], prefix: str = "") -> int:
    return sum(v.numel() for k, v in tensors.items() if k.startswith(prefix))


def make_models(
    out: str | os.PathLike[str],
    seed: int = 0,
    force: bool = False,
    sdxl: bool = False,
    comfyui: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Write (or keep) every model file under ``out``; return {relative name: path}."""
    setup_comfyui(comfyui)
    out = Path(out)
    t_all = time.perf_counter()

    # (kind, files it writes, generator of (file, tensors, extra metadata))
    jobs: list[tuple[str, list[str], Callable[[], Iterable[tuple[str, dict[str, Any], dict[str, str]]]]]] = []

    def checkpoint_job(family: str, rel: str):
        def run():
            sd, _ = build_checkpoint(family, seed)
            parts = {
                "unet": count_params(sd, "model.diffusion_model."),
                "text_encoders": count_params(sd, "cond_stage_model.") + count_params(sd, "conditioner."),
                "vae": count_params(sd, "first_stage_model."),
            }
            cfg = SD15_UNET_CONFIG if family == "sd15" else SDXL_UNET_CONFIG
            extra = {"asyndm_unet_config": json.dumps(cfg, sort_keys=True), "asyndm_params": json.dumps(parts)}
            yield rel, sd, extra

        return run

    def approx_job():
        for rel, sd in build_taesd_approx(seed).items():
            yield rel, sd, {"asyndm_params": json.dumps({"total": count_params(sd)})}

    jobs.append(("sd15", [SD15_CHECKPOINT], checkpoint_job("sd15", SD15_CHECKPOINT)))
    jobs.append(("taesd", [TAESD_DECODER, TAESD_ENCODER], approx_job))
    if sdxl:
        jobs.append(("sdxl", [SDXL_CHECKPOINT], checkpoint_job("sdxl", SDXL_CHECKPOINT)))

    written: dict[str, Path] = {}
    pending = []
    for kind, rels, run in jobs:
        if not force and all(is_current(out / r, seed, kind) for r in rels):
            for r in rels:
                log(f"make_models: up to date {out / r}")
                written[r] = out / r
        else:
            pending.append((kind, run))
    if pending:
        t0 = time.perf_counter()
        import comfy.model_detection  # noqa: F401  (most of a cold run's time: all of ComfyUI's models)

        log(f"make_models: imported ComfyUI in {time.perf_counter() - t0:.1f} s")
    for kind, run in pending:
        t0 = time.perf_counter()
        for rel, tensors, extra in run():
            path = out / rel
            write_atomic(path, tensors, file_metadata(seed, kind, extra))
            size = path.stat().st_size / 2**20
            log(
                f"make_models: wrote {path} ({size:.1f} MiB, {count_params(tensors) / 1e6:.1f}M params, "
                f"{time.perf_counter() - t0:.1f} s)"
            )
            written[rel] = path
    log(f"make_models: done in {time.perf_counter() - t_all:.1f} s")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a ComfyUI models folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rewrite files that are up to date")
    parser.add_argument("--sdxl", action="store_true", help="also write the SDXL checkpoint (large, slow)")
    parser.add_argument("--comfyui", default=None, help="ComfyUI tree (default $COMFYUI_PATH or .dev/ComfyUI)")
    args = parser.parse_args(argv)
    make_models(args.out, seed=args.seed, force=args.force, sdxl=args.sdxl, comfyui=args.comfyui)
    return 0


if __name__ == "__main__":
    sys.exit(main())
