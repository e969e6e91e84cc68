"""Small random-weight models of ComfyUI's own UNet classes, built in-process for tests.

Each builder returns a ``comfy.model_patcher.ModelPatcher`` on the CPU, ready for
``comfy.sample.sample``. The models use ComfyUI's real classes (``supported_models`` configs,
``model_base`` wrappers, ``openaimodel.UNetModel``) with a reduced width and depth, so the code
under test sees the same module tree, dtype handling and conditioning path as with a checkpoint.

Why every parameter is refilled: ComfyUI builds its layers with ``ops.disable_weight_init``,
which leaves uninitialised memory. Weights are drawn from one generator seeded per parameter
name, so a model is a pure function of its seed and config.

Why 128 channels by default: with 32 channels GroupNorm(32) has one channel per group and cancels
most of a per-channel time shift, so per-pixel timestep effects are barely visible.

Import this only after ComfyUI is importable (tests/inprocess/conftest.py arranges that).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

__all__ = [
    "build_chroma",
    "build_flux",
    "build_sd15",
    "build_sd2v",
    "build_sd3",
    "build_sdxl",
    "diffusion_kwargs",
    "family_of",
    "make_conditioning",
    "make_flux_conditioning",
    "make_sd3_conditioning",
    "random_context",
]

SDXL_SIZE_EMBEDDINGS = 6 * 256  # height, width, crop_h, crop_w, target_h, target_w, 256 each


def _unet_config(
    model_channels: int,
    context_dim: int,
    use_linear: bool,
    *,
    num_res_blocks: int = 1,
    channel_mult: tuple[int, ...] = (1, 1, 1),
    adm_in_channels: int | None = None,
    transformer_depth: int = 1,
) -> dict[str, Any]:
    """Every key that model_detection.detect_unet_config derives, for a UNet with attention at
    latent/1, /2, /4 (one transformer per res block on every level, and in the middle)."""
    levels = len(channel_mult)
    config: dict[str, Any] = {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": adm_in_channels,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels,
        "transformer_depth": [transformer_depth] * (num_res_blocks * levels),
        "transformer_depth_output": [transformer_depth] * ((num_res_blocks + 1) * levels),
        "channel_mult": list(channel_mult),
        "transformer_depth_middle": transformer_depth,
        "use_linear_in_transformer": use_linear,
        "context_dim": context_dim,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }
    if adm_in_channels is not None:
        config["num_classes"] = "sequential"
    return config


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"asyndm-test-model/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _fill(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter: weights N(0, 1/fan_in), biases N(0, 0.02^2), norms at 1 / 0.

    Unit-variance weights per fan-in keep activations O(1) through the whole UNet (GroupNorm
    re-normalises every block), so outputs stay finite in float16 as well.
    """
    owners = {}
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for name, param in module.named_parameters():
        owner = owners[name]
        leaf = name.rsplit(".", 1)[-1]
        gen = torch.Generator().manual_seed(_param_seed(seed, name))
        if isinstance(owner, norms):
            value = torch.ones(param.shape) if leaf == "weight" else torch.zeros(param.shape)
        elif leaf == "bias":
            value = torch.randn(param.shape, generator=gen) * 0.02
        elif param.ndim >= 2:
            value = torch.randn(param.shape, generator=gen) / math.sqrt(math.prod(param.shape[1:]))
        else:
            value = torch.randn(param.shape, generator=gen)
        param.copy_(value.to(param.dtype))


def _patcher(model: Any, seed: int) -> Any:
    import comfy.model_patcher

    _fill(model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _config(cls: Any, unet_config: dict[str, Any], num_heads: int, overrides: dict[str, Any]) -> Any:
    """A supported_models config; heads (and other UNetModel arguments, e.g. use_scale_shift_norm)
    are set after construction because the class's unet_extra_config overrides the dict."""
    config = cls(unet_config)
    config.unet_config["num_heads"] = num_heads
    config.unet_config["num_head_channels"] = -1
    config.unet_config.update(overrides)
    config.set_inference_dtype(torch.float32, None)
    return config


def build_sd15(model_channels: int = 128, *, seed: int = 0, num_heads: int = 4, num_res_blocks: int = 1,
               channel_mult: tuple[int, ...] = (1, 1, 1), **unet_overrides: Any) -> Any:
    """SD1.x-shaped (eps, context 768, conv proj_in) ModelPatcher on the CPU.

    unet_overrides go to UNetModel as they are (e.g. use_scale_shift_norm=True, resblock_updown=True).
    """
    import comfy.supported_models

    unet = _unet_config(model_channels, 768, False, num_res_blocks=num_res_blocks, channel_mult=channel_mult)
    config = _config(comfy.supported_models.SD15, unet, num_heads, unet_overrides)
    return _patcher(config.get_model({}, ""), seed)


def build_sd2v(model_channels: int = 128, *, seed: int = 0, num_heads: int = 4, num_res_blocks: int = 1,
               channel_mult: tuple[int, ...] = (1, 1, 1), **unet_overrides: Any) -> Any:
    """SD2.x-shaped v-prediction model (context 1024, linear proj_in, ModelSamplingDiscrete + V)."""
    import comfy.model_base
    import comfy.supported_models

    unet = _unet_config(model_channels, 1024, True, num_res_blocks=num_res_blocks, channel_mult=channel_mult)
    config = _config(comfy.supported_models.SD20, unet, num_heads, unet_overrides)
    # SD20.model_type guesses v-prediction from real weights; state it instead (same class it builds).
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    return _patcher(model, seed)


def build_sdxl(model_channels: int = 128, *, seed: int = 0, num_heads: int = 4, num_res_blocks: int = 1,
               channel_mult: tuple[int, ...] = (1, 1, 1), context_dim: int = 2048, pooled_dim: int = 1280,
               **unet_overrides: Any) -> Any:
    """SDXL-shaped model: model_base.SDXL (its encode_adm builds y), label_emb on
    pooled_dim + 6 x 256 size embeddings, context 2048, linear proj_in."""
    import comfy.supported_models

    unet = _unet_config(model_channels, context_dim, True, num_res_blocks=num_res_blocks,
                        channel_mult=channel_mult, adm_in_channels=pooled_dim + SDXL_SIZE_EMBEDDINGS)
    config = _config(comfy.supported_models.SDXL, unet, num_heads, unet_overrides)
    return _patcher(config.get_model({}, ""), seed)


FLUX_TEXT_DIM, FLUX_POOLED_DIM = 32, 24  # T5 and CLIP-L widths, shrunk


def _flux_layout(hidden_size: int, depth: int, depth_single: int) -> dict[str, Any]:
    """The Flux transformer's shape (comfy.ldm.flux.model), narrow: 2 heads of 32 channels."""
    return {"in_channels": 16, "out_channels": 16, "context_in_dim": FLUX_TEXT_DIM, "hidden_size": hidden_size,
            "mlp_ratio": 2.0, "num_heads": 2, "depth": depth, "depth_single_blocks": depth_single,
            "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True}


def build_flux(guidance: bool = True, *, hidden_size: int = 64, depth: int = 2, depth_single: int = 2,
               seed: int = 0) -> Any:
    """A Flux-dev (guidance embedding) or Flux-schnell shaped ModelPatcher, ComfyUI's own classes."""
    import comfy.supported_models

    cls = comfy.supported_models.Flux if guidance else comfy.supported_models.FluxSchnell
    unet = {"image_model": "flux", "guidance_embed": guidance, "vec_in_dim": FLUX_POOLED_DIM,
            **_flux_layout(hidden_size, depth, depth_single)}
    config = cls(unet)
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config.get_model({}, ""), seed)


def build_chroma(*, hidden_size: int = 64, seed: int = 0) -> Any:
    """A Chroma-shaped ModelPatcher (Flux layout, modulation from one approximator): a family the pack refuses."""
    import comfy.supported_models

    unet = {"image_model": "chroma", "in_dim": 64, "out_dim": hidden_size, "hidden_dim": 32, "n_layers": 1,
            **_flux_layout(hidden_size, 1, 1)}
    config = comfy.supported_models.Chroma(unet)
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config.get_model({}, ""), seed)


def make_flux_conditioning(batch: int = 1, tokens: int = 12, *, seed: int = 0,
                           guidance: float | None = 3.5) -> list[list[Any]]:
    """[[T5-like context, {pooled_output (CLIP-L-like), guidance}]] for the models above."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, FLUX_TEXT_DIM, generator=gen)
    extra: dict[str, Any] = {"pooled_output": torch.randn(batch, FLUX_POOLED_DIM, generator=gen)}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[context, extra]]


SD3_TEXT_DIM, SD3_POOLED_DIM = 48, 40  # CLIP-L/G + T5 context width and pooled CLIP-L+G width, shrunk
SD3_VARIANTS = ("large", "medium")  # SD3.5 large: RMS q/k norm; SD3.5 medium: also image self-attention blocks


def build_sd3(variant: str = "large", *, depth: int = 2, pos_embed_max_size: int = 16, seed: int = 0) -> Any:
    """An SD3.5-shaped ModelPatcher (ComfyUI's SD3 config, MMDiT class, width 64 x depth as detection sets it).

    "large" has RMS q/k norm (SD3.5 large); "medium" adds the x-block self-attention of SD3.5 medium
    on its first block; "sd3" is SD3 medium (neither).
    """
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.supported_models

    unet: dict[str, Any] = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
        "adm_in_channels": SD3_POOLED_DIM, "pos_embed_scaling_factor": None,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": SD3_TEXT_DIM, "out_features": 64 * depth}},
        "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size,
        "x_block_self_attn_layers": [0] if variant == "medium" else [],
    }
    if variant in ("large", "medium"):
        unet["qk_norm"] = "rms"
    elif variant != "sd3":
        raise ValueError(f"unknown SD3 variant {variant!r}")
    config = comfy.supported_models.SD3(unet)
    config.set_inference_dtype(torch.float32, None)
    patcher = _patcher(config.get_model({}, ""), seed)
    dm = patcher.model.diffusion_model
    with torch.no_grad():  # a buffer (torch.empty until a checkpoint fills it): SD3's fixed sin-cos table
        table = mmdit.get_2d_sincos_pos_embed(dm.hidden_size, pos_embed_max_size)
        dm.pos_embed.copy_(torch.from_numpy(table).float()[None])
    return patcher


def make_sd3_conditioning(batch: int = 1, tokens: int = 10, *, seed: int = 0) -> list[list[Any]]:
    """[[context (CLIP-L/G then T5 tokens), {pooled_output}]] for build_sd3's models."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, SD3_TEXT_DIM, generator=gen)
    return [[context, {"pooled_output": torch.randn(batch, SD3_POOLED_DIM, generator=gen)}]]


def family_of(patcher: Any) -> str:
    """'sdxl' when the model takes pooled + size conditioning, else 'sd'."""
    return "sdxl" if patcher.model.diffusion_model.num_classes is not None else "sd"


def random_context(patcher: Any, batch: int = 1, tokens: int = 77, *, seed: int = 0) -> torch.Tensor:
    """(batch, tokens, context_dim) random text context, unit scale, of the model's width."""
    unet_config = patcher.model.model_config.unet_config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, unet_config["context_dim"], generator=gen)


def make_conditioning(patcher: Any, batch: int = 1, tokens: int = 77, *, seed: int = 0,
                      width: int = 1024, height: int = 1024) -> list[list[Any]]:
    """ComfyUI conditioning [[context, {...}]] matching the model (pooled_output + sizes for SDXL)."""
    context = random_context(patcher, batch, tokens, seed=seed)
    extra: dict[str, Any] = {}
    adm = patcher.model.model_config.unet_config.get("adm_in_channels")
    if adm:
        gen = torch.Generator().manual_seed(seed + 1_000_003)
        extra["pooled_output"] = torch.randn(batch, adm - SDXL_SIZE_EMBEDDINGS, generator=gen)
        extra.update(width=width, height=height, crop_w=0, crop_h=0, target_width=width, target_height=height)
    return [[context, extra]]


def diffusion_kwargs(patcher: Any, batch: int = 1, tokens: int = 77, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments for calling ``patcher.model.diffusion_model`` directly: context, and for
    SDXL the ``y`` vector the model's own encode_adm builds from make_conditioning."""
    cond = make_conditioning(patcher, batch, tokens, seed=seed)
    out = {"context": cond[0][0]}
    if patcher.model.diffusion_model.num_classes is not None:
        out["y"] = patcher.model.encode_adm(**cond[0][1], device=torch.device("cpu"))
    return out
