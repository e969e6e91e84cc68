"""ComfyUI import set-up, the random-weight models, the cases and the shared sampling runner.

Models are random-weight instances of ComfyUI's own classes, built through tests/model_factory.py:

    full      SD1.5's UNet layout (320 channels, mult 1/2/4/4, 2 res blocks, 8 heads, attention
              at latent /1, /2, /4, none at /8): 860M parameters
    reduced   SD1.5 class, 128 channels, 3 levels, 1 res block, attention at /2 and /4 only
    reduced-attn  the same with attention at all three levels (the test suite's default model)
    sdxl      SDXL's layout with --sdxl-depth transformer blocks at /4 and in the middle
    tiny      32 channels, 3 levels: for the CI smoke test only
    flux-dev      ComfyUI's Flux class with the guidance embedding (supported_models.Flux), narrow:
                  --flux-hidden wide (heads of 128 channels, axes 16/56/56 and MLP ratio 4 as in
                  Flux), --flux-double double-stream and --flux-single single-stream blocks
    flux-schnell  the same without the guidance embedding (supported_models.FluxSchnell)
    flux-tiny     tests/model_factory.py build_flux as it is (width 64, 2 + 2 blocks, dev): CI smoke only
    sd3.5-large   ComfyUI's SD3 config (shift 3) and MMDiT class (OpenAISignatureMMDITWrapper), SD3.5
                  large's layout narrowed: --sd3-depth joint blocks, width 64 x depth (heads of 64),
                  RMS q/k norm
    sd3.5-medium  the same with SD3.5 medium's image self-attention in the first half of the blocks
    sd3-tiny      tests/model_factory.py build_sd3 as it is ("large", width 128, 2 blocks): CI smoke only

and the other transformer families (bench/dit_models.py: flux-kontext, flux2, chroma, chroma-radiance,
hunyuan-image, qwen-image, qwen-image-edit, lumina2, z-image, hidream, auraflow), each at a bench
size or the tests' tiny one (--dit-size).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMFYUI = REPO_ROOT / ".dev" / "ComfyUI"
CLI_SCRIPT = REPO_ROOT / "benchmarks" / "bench_sampling.py"

UNET_MODELS = ("full", "reduced", "reduced-attn", "sdxl", "tiny")
FLUX_MODELS = ("flux-dev", "flux-schnell", "flux-tiny")
SD3_MODELS = ("sd3.5-large", "sd3.5-medium", "sd3-tiny")
DIT_MODELS = ("flux-kontext", "flux2", "chroma", "chroma-radiance", "hunyuan-image", "qwen-image", "qwen-image-edit",
              "lumina2", "z-image", "hidream", "auraflow")  # bench/dit_models.py FAMILIES, in order
MODELS = UNET_MODELS + FLUX_MODELS + SD3_MODELS + DIT_MODELS
FLUX_HEAD_DIM = 128  # Flux's: 24 heads of 128 channels at width 3072
FLUX_AXES_DIM = (16, 56, 56)  # Flux's rotary axes (sum = head dim)
FLUX_MLP_RATIO = 4.0

# Two fixed key items (the same on every family): priorities, and the masks of two_item_masks().
PRIORITIES = (0.8, 0.6)


def family_of(model_name: str) -> str:
    """'unet', 'flux', 'mmdit' or 'dit': which rows module serves the named model."""
    if model_name in UNET_MODELS:
        return "unet"
    if model_name in FLUX_MODELS:
        return "flux"
    if model_name in SD3_MODELS:
        return "mmdit"
    if model_name in DIT_MODELS:
        return "dit"
    raise ValueError(f"unknown model {model_name!r}: use one of {', '.join(MODELS)}")


# ------------------------------------------------------------------------------------------------
# ComfyUI and the project's model factory


def setup_comfyui(path: str | os.PathLike[str] | None = None, device: str = "cpu") -> Path:
    """Make ComfyUI and this repository importable (idempotent); CPU unless device is cuda.

    ComfyUI goes first on sys.path, as in tests/inprocess/conftest.py (ComfyUI's own ``nodes``
    module must win over this repository's ``nodes`` package); the repository is appended for
    ``asyndm``. tests/model_factory.py is loaded by file path (ComfyUI also has a ``tests`` package).
    """
    root = Path(path or os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).resolve()
    if not (root / "comfy").is_dir():
        raise SystemExit(f"bench_sampling: no ComfyUI tree at {root} (pass --comfyui or set COMFYUI_PATH)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    if "comfy.model_management" not in sys.modules and device == "cpu":
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True
    return root


def model_factory() -> ModuleType:
    name = "asyndm_bench_model_factory"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tests" / "model_factory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def patched(obj: Any, attr: str, value: Any) -> Iterator[None]:
    """Set obj.attr (a module, class or instance attribute) for the duration; restore it exactly."""
    own = vars(obj)
    had = attr in own
    old = own.get(attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, attr, old)
        else:
            delattr(obj, attr)


# ------------------------------------------------------------------------------------------------
# Models


def build_model(name: str, *, seed: int = 0, sdxl_depth: int = 2, device: str = "cpu", flux_hidden: int = 512,
                flux_double: int = 2, flux_single: int = 4, sd3_depth: int = 6, dit_size: str = "bench") -> Any:
    """A ModelPatcher of the named layout with random weights (see the module docstring)."""
    mf = model_factory()
    if name == "full":
        patcher = mf.build_sd15(320, seed=seed, channel_mult=(1, 2, 4, 4), num_res_blocks=2, num_heads=8,
                                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    elif name == "reduced":
        patcher = mf.build_sd15(128, seed=seed, channel_mult=(1, 1, 1), num_res_blocks=1, num_heads=4,
                                transformer_depth=[0, 1, 1], transformer_depth_output=[0, 0, 1, 1, 1, 1])
    elif name == "reduced-attn":
        patcher = mf.build_sd15(128, seed=seed, channel_mult=(1, 1, 1), num_res_blocks=1, num_heads=4)
    elif name == "sdxl":
        d = int(sdxl_depth)
        patcher = mf.build_sdxl(320, seed=seed, channel_mult=(1, 2, 4), num_res_blocks=2, num_heads=-1,
                                num_head_channels=64, transformer_depth=[0, 0, 2, 2, d, d],
                                transformer_depth_output=[0, 0, 0, 2, 2, 2, d, d, d], transformer_depth_middle=d)
    elif name == "tiny":
        patcher = mf.build_sd15(32, seed=seed, channel_mult=(1, 1, 1), num_res_blocks=1, num_heads=2)
    elif name in ("flux-dev", "flux-schnell"):
        patcher = build_flux(name == "flux-dev", hidden=flux_hidden, double=flux_double, single=flux_single,
                             seed=seed)
    elif name == "flux-tiny":
        patcher = mf.build_flux(True, seed=seed)
    elif name in ("sd3.5-large", "sd3.5-medium"):
        patcher = build_sd3(name == "sd3.5-medium", depth=sd3_depth, seed=seed)
    elif name == "sd3-tiny":
        patcher = mf.build_sd3("large", seed=seed)
    elif name in DIT_MODELS:
        from . import dit_models

        patcher = dit_models.family(name).build(dit_size, seed)
    else:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")
    if device != "cpu":
        import comfy.model_patcher
        import torch

        dev = torch.device(device)
        patcher = comfy.model_patcher.ModelPatcher(patcher.model, load_device=dev, offload_device=torch.device("cpu"))
    return patcher


def build_flux(guidance: bool, *, hidden: int, double: int, single: int, seed: int = 0) -> Any:
    """Flux dev (guidance) or schnell, as tests/model_factory.py builds them but with Flux's own head
    width (128), rotary axes and MLP ratio, so that attention and MLP keep Flux's proportions."""
    import comfy.supported_models
    import torch

    if hidden < FLUX_HEAD_DIM or hidden % FLUX_HEAD_DIM:
        raise ValueError(f"--flux-hidden must be a multiple of {FLUX_HEAD_DIM} (heads of {FLUX_HEAD_DIM} channels)")
    mf = model_factory()
    layout = mf._flux_layout(hidden, double, single)
    layout.update(num_heads=hidden // FLUX_HEAD_DIM, axes_dim=list(FLUX_AXES_DIM), mlp_ratio=FLUX_MLP_RATIO)
    cls = comfy.supported_models.Flux if guidance else comfy.supported_models.FluxSchnell
    config = cls({"image_model": "flux", "guidance_embed": guidance, "vec_in_dim": mf.FLUX_POOLED_DIM, **layout})
    config.set_inference_dtype(torch.float32, None)
    return mf._patcher(config.get_model({}, ""), seed)


def build_sd3(self_attention: bool, *, depth: int, seed: int = 0, pos_embed_max_size: int = 64) -> Any:
    """SD3.5 large (RMS q/k norm) or, with self_attention, SD3.5 medium (also image self-attention in
    the first half of the joint blocks, as medium has in 13 of its 24), as tests/model_factory.py
    builds them: ComfyUI's SD3 config and MMDiT class, width 64 x depth, the fixed sin-cos position
    table filled in. pos_embed_max_size bounds the latent at 2 x that per side."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.supported_models
    import torch

    mf = model_factory()
    hidden = 64 * depth
    unet: dict[str, Any] = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
        "adm_in_channels": mf.SD3_POOLED_DIM, "pos_embed_scaling_factor": None, "qk_norm": "rms",
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": mf.SD3_TEXT_DIM, "out_features": hidden}},
        "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size,
        "x_block_self_attn_layers": list(range((depth + 1) // 2)) if self_attention else [],
    }
    config = comfy.supported_models.SD3(unet)
    config.set_inference_dtype(torch.float32, None)
    patcher = mf._patcher(config.get_model({}, ""), seed)
    dm = patcher.model.diffusion_model
    with torch.no_grad():  # a buffer left empty until a checkpoint fills it: SD3's fixed sin-cos table
        table = mmdit.get_2d_sincos_pos_embed(dm.hidden_size, pos_embed_max_size)
        dm.pos_embed.copy_(torch.from_numpy(table).float()[None])
    return patcher


# ------------------------------------------------------------------------------------------------
# Cases and the sampling runner


@dataclass(frozen=True)
class Case:
    height: int
    width: int
    batch: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width} b{self.batch} s{self.steps}"


def two_item_masks(h: int, w: int) -> Any:
    """(1, 2, h, w): item 0 the middle half of the left side, item 1 the bottom-right quarter."""
    import torch

    masks = torch.zeros(1, 2, h, w)
    masks[:, 0, h // 4 : 3 * h // 4, : w // 2] = 1.0
    masks[:, 1, h // 2 :, w // 2 :] = 1.0
    return masks


class SamplingBench:
    """The inputs of one case and a runner per variant (same model, conditioning, noise and seed).

    A subclass sets ``positive``, ``negative``, ``latent``, ``noise`` and ``schedules`` and says in
    ``_prepare`` which schedule a variant uses (and what it patches for the run).
    """

    variants: tuple[str, ...] = ()

    def __init__(self, patcher: Any, case: Case, *, seed: int = 0, cfg: float = 5.0, sampler: str = "euler",
                 scheduler: str = "normal") -> None:
        self.patcher = patcher
        self.case = case
        self.seed, self.cfg, self.sampler, self.scheduler = seed, cfg, sampler, scheduler
        self.positive: Any = None
        self.negative: Any = None
        self.latent: Any = None
        self.noise: Any = None
        self.schedules: dict[str, Any] = {}
        self.last_sampler: Any = None

    def _prepare(self, variant: str, stack: contextlib.ExitStack) -> Any:
        """The schedule of an asynchronous variant; patches for the run go on stack."""
        raise NotImplementedError

    def run(self, variant: str) -> Any:
        import comfy.sample
        import comfy.samplers

        from asyndm.comfy_adapter import sampler as asyn_sampler

        p = self.patcher
        if variant == "ksampler":
            return comfy.sample.sample(p, self.noise, self.case.steps, self.cfg, self.sampler, self.scheduler,
                                       self.positive, self.negative, self.latent, denoise=1.0, seed=self.seed,
                                       disable_pbar=True)
        with contextlib.ExitStack() as stack:
            schedule = self._prepare(variant, stack)
            # As the Asynchronous KSampler node does: the user's scheduler gives the background sigmas.
            sigmas = comfy.samplers.KSampler(p, steps=self.case.steps, device=p.load_device, sampler=self.sampler,
                                             scheduler=self.scheduler, denoise=1.0,
                                             model_options=p.model_options).sigmas
            sampler = asyn_sampler.AsynSampler(self.sampler, schedule)
            out = comfy.sample.sample_custom(p, self.noise, self.cfg, sampler, sigmas, self.positive, self.negative,
                                             self.latent, seed=self.seed, disable_pbar=True)
        self.last_sampler = sampler
        return out
