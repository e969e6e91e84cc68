"""The other transformer families' models for their rows (bench/family_rows.py): what each row builds.

One entry per family the pack samples in-process beyond Flux and SD3: ComfyUI's own classes with
random weights, built through the test factories (tests/factory_*.py, tests/model_factory.py),
with that family's conditioning and latent format. Two sizes:

    bench  wide enough that the transformer's work dominates a step as it does on real models
           (hidden 512 in heads of 128, 2 to 4 blocks, 64 to 256 image tokens, 64 text tokens), small
           enough that a row (3 variants x 4 runs x 8 steps) takes about 20-40 s on one core
    tiny   the factories' own test sizes (width 64, one or two blocks, 16 to 64 image tokens):
           for the smoke test only

Each family's cfg is the one it is used with: 1 where the model is guidance-distilled (Flux
Kontext, Flux.2, Z-Image Turbo, HiDream dev), its usual real CFG elsewhere (two rows per call).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .fixtures import REPO_ROOT, Case, build_flux, model_factory

SIZES = ("bench", "tiny")
WIDTH, HEADS, HEAD_DIM = 512, 4, 128  # the bench size: 4 heads of 128 channels (the real models' head width)
ROPE_3 = [16, 56, 56]  # Flux's rotary axes (index, h, w) for heads of 128
FLUX_BLOCKS = {"depth": 1, "depth_single": 2}  # 1 double-stream + 2 single-stream blocks
CHROMA_WIDE = {"hidden_size": WIDTH, "num_heads": HEADS, "axes_dim": ROPE_3, "mlp_ratio": 4.0, "out_dim": WIDTH,
               "hidden_dim": WIDTH, **FLUX_BLOCKS}
LUMINA_WIDE = {"dim": WIDTH, "n_heads": HEADS, "axes_dims": [32, 48, 48], "n_layers": 2}


def test_factory(name: str) -> ModuleType:
    """tests/<name>.py as ``tests.<name>`` (the repository's tests package, not ComfyUI's, which comes
    first on sys.path once ComfyUI is importable)."""
    pkg = sys.modules.get("tests")
    if pkg is None or str(REPO_ROOT / "tests") not in list(getattr(pkg, "__path__", [])):
        spec = importlib.util.spec_from_file_location("tests", REPO_ROOT / "tests" / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT / "tests")])
        assert spec is not None and spec.loader is not None
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["tests"] = pkg
        spec.loader.exec_module(pkg)
    return importlib.import_module(f"tests.{name}")


@dataclass(frozen=True)
class DitFamily:
    """One family's row: how to build its model and inputs at each size."""

    name: str  # the --model / --families name
    title: str
    cfg: float
    channels: int  # latent channels (Chroma Radiance: RGB pixels)
    patch: int  # latent pixels per token side
    cases: dict[str, Case]  # the default case per size
    layouts: dict[str, str]  # the transformer's shape per size, in words (for the output)
    builder: Callable[[], Callable[..., Any]]  # () -> the factory function (seed=, **kwargs) -> ModelPatcher
    wide: dict[str, Any]  # its keyword arguments at the bench size
    conditioning: Callable[[Any, int, int], Any]  # (bench, batch, seed) -> [[context, extra]]
    frame_axis: bool = False  # a one-frame video latent (B, C, 1, H, W): Qwen-Image's format
    reference: bool = False  # a reference latent of the image's size rides in the conditioning
    tiny: tuple[tuple[str, Any], ...] = ()  # its keyword arguments at the tiny size (default: the factory's)
    text_pad: int = 0  # the model pads the text context to at least this many tokens (Flux.2: 512)

    def build(self, size: str, seed: int) -> Any:
        return self.builder()(seed=seed, **(self.wide if size == "bench" else dict(self.tiny)))

    def latent_shape(self, case: Case) -> tuple[int, ...]:
        if self.frame_axis:
            return (case.batch, self.channels, 1, case.height, case.width)
        return (case.batch, self.channels, case.height, case.width)

    def image_tokens(self, case: Case) -> int:
        return -(-case.height // self.patch) * -(-case.width // self.patch)


def _reference(bench: Any, cond: Any) -> Any:
    """Add a reference latent (the image's size and format, fixed seed) as ComfyUI's ReferenceLatent does."""
    import torch

    shape = bench.spec.latent_shape(Case(bench.case.height, bench.case.width, 1, 1))
    ref = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    for _, extra in cond:
        extra["reference_latents"] = [ref]
    return cond


def _case(side: int, steps: int = 8) -> Case:
    return Case(side, side, 1, steps)


# ------------------------------------------------------------------------------------------------
# The factory functions (resolved when first used: the factories import ComfyUI) and conditioning
# (bench, batch, seed)


def _factory(module: str, function: str) -> Callable[[], Callable[..., Any]]:
    return lambda: getattr(test_factory(module), function)


def _flux_cond(bench: Any, batch: int, seed: int) -> Any:
    return _reference(bench, model_factory().make_flux_conditioning(batch, bench.text_tokens, seed=seed,
                                                                    guidance=2.5))


def _flux2_cond(bench: Any, batch: int, seed: int) -> Any:
    return test_factory("factory_flux_family").make_flux2_conditioning(batch, bench.text_tokens, seed=seed)


def _chroma_cond(bench: Any, batch: int, seed: int) -> Any:
    return test_factory("factory_flux_family").make_chroma_conditioning(batch, bench.text_tokens, seed=seed)


def _hunyuan_cond(bench: Any, batch: int, seed: int) -> Any:
    return test_factory("factory_flux_family").make_hunyuan_image_conditioning(batch, bench.text_tokens, seed=seed)


def _qwen_cond(bench: Any, batch: int, seed: int) -> Any:
    cond = test_factory("factory_qwen_image").make_qwen_conditioning(batch, bench.text_tokens, seed=seed)
    return _reference(bench, cond) if bench.spec.reference else cond


def _lumina_cond(bench: Any, batch: int, seed: int) -> Any:
    return test_factory("factory_lumina").make_lumina_conditioning(batch, bench.text_tokens, seed=seed)


def _hidream_cond(bench: Any, batch: int, seed: int) -> Any:
    dm = bench.patcher.model.diffusion_model
    layers = len(dm.double_stream_blocks) + len(dm.single_stream_blocks)
    return test_factory("factory_hidream").make_hidream_conditioning(batch, t5=bench.text_tokens,
                                                                     llama=bench.text_tokens, layers=layers, seed=seed)


def _auraflow_cond(bench: Any, batch: int, seed: int) -> Any:
    return test_factory("factory_auraflow").make_auraflow_conditioning(batch, bench.text_tokens, seed=seed)


# ------------------------------------------------------------------------------------------------
# The families, in the order the rows are printed

_W = f"hidden {WIDTH} ({HEADS} heads of {HEAD_DIM})"
_TINY = "the test factory's size (width 64, 2 heads of 32)"
FF, FQ, FL = "factory_flux_family", "factory_qwen_image", "factory_lumina"
FAMILIES: tuple[DitFamily, ...] = (
    DitFamily("flux-kontext", "Flux Kontext", 1.0, 16, 2, {"bench": _case(24), "tiny": _case(16, 4)},
              {"bench": f"Flux dev class, {_W}, 1 double + 2 single blocks, a 24x24 reference latent",
               "tiny": "Flux dev class, width 128 (1 head of 128), 1 double + 1 single block, a 16x16 reference latent"},
              lambda: build_flux, {"guidance": True, "hidden": WIDTH, "double": 1, "single": 2}, _flux_cond,
              reference=True, tiny=(("guidance", True), ("hidden", 128), ("double", 1), ("single", 1))),
    DitFamily("flux2", "Flux.2", 1.0, 128, 1, {"bench": _case(12), "tiny": _case(8, 4)},
              {"bench": f"{_W}, 1 double + 1 single block, global modulation, text padded to 512 tokens",
               "tiny": _TINY}, _factory(FF, "build_flux2"),
              {"hidden_size": WIDTH, "num_heads": HEADS, "axes_dim": [32, 32, 32, 32], "depth": 1, "depth_single": 1},
              _flux2_cond, text_pad=512),
    DitFamily("chroma", "Chroma", 4.0, 16, 2, {"bench": _case(24), "tiny": _case(16, 4)},
              {"bench": f"{_W}, 1 double + 2 single blocks, approximator 512 wide", "tiny": _TINY},
              _factory(FF, "build_chroma"), CHROMA_WIDE, _chroma_cond),
    DitFamily("chroma-radiance", "Chroma Radiance", 4.0, 3, 16, {"bench": _case(128), "tiny": _case(64, 4)},
              {"bench": f"{_W}, 1 double + 2 single blocks, 16x16 pixel patches, NeRF head 32 wide",
               "tiny": _TINY + ", 16x16 pixel patches"}, _factory(FF, "build_chroma_radiance"),
              {**CHROMA_WIDE, "nerf_hidden_size": 32}, _chroma_cond),
    DitFamily("hunyuan-image", "HunyuanImage 2.1", 3.5, 64, 1, {"bench": _case(12), "tiny": _case(8, 4)},
              {"bench": f"{_W}, 1 double + 2 single blocks, TokenRefiner, ByT5 mapper", "tiny": _TINY},
              _factory(FF, "build_hunyuan_image"),
              {"hidden_size": WIDTH, "num_heads": HEADS, "axes_dim": [64, 64], **FLUX_BLOCKS}, _hunyuan_cond),
    DitFamily("qwen-image", "Qwen-Image", 2.5, 16, 2, {"bench": _case(32), "tiny": _case(16, 4)},
              {"bench": f"{_W}, 2 dual-stream blocks", "tiny": _TINY + ", 2 blocks"}, _factory(FQ, "build_qwen_image"),
              {"attention_head_dim": HEAD_DIM, "num_attention_heads": HEADS, "axes_dims_rope": ROPE_3, "depth": 2},
              _qwen_cond, frame_axis=True),
    DitFamily("qwen-image-edit", "Qwen-Image-Edit", 2.5, 16, 2, {"bench": _case(24), "tiny": _case(16, 4)},
              {"bench": f"{_W}, 2 dual-stream blocks, a 24x24 reference latent",
               "tiny": _TINY + ", 2 blocks, a 16x16 reference latent"}, _factory(FQ, "build_qwen_image"),
              {"attention_head_dim": HEAD_DIM, "num_attention_heads": HEADS, "axes_dims_rope": ROPE_3, "depth": 2},
              _qwen_cond, frame_axis=True, reference=True),
    DitFamily("lumina2", "Lumina 2", 4.0, 16, 2, {"bench": _case(24), "tiny": _case(16, 4)},
              {"bench": f"{_W}, 2 key/value heads, 1 + 1 refiner and 2 main blocks",
               "tiny": "width 64 (2 query heads, 1 key/value head of 32)"}, _factory(FL, "build_lumina2"),
              {**LUMINA_WIDE, "n_kv_heads": 2}, _lumina_cond),
    DitFamily("z-image", "Z-Image", 1.0, 16, 2, {"bench": _case(32), "tiny": _case(16, 4)},
              {"bench": f"{_W}, 1 + 1 refiner and 2 main blocks", "tiny": "width 256 (2 heads of 128)"},
              _factory(FL, "build_z_image"), {**LUMINA_WIDE, "n_kv_heads": HEADS}, _lumina_cond),
    DitFamily("hidream", "HiDream", 1.0, 16, 2, {"bench": _case(24), "tiny": _case(16, 4)},
              {"bench": f"{_W}, 1 double + 2 single blocks, MoE feed-forward (4 experts, 2 active)",
               "tiny": _TINY + ", MoE 4 experts"}, _factory("factory_hidream", "build_hidream"),
              {"attention_head_dim": HEAD_DIM, "num_attention_heads": HEADS, "axes_dims_rope": [64, 32, 32],
               "n_double": 1, "n_single": 2}, _hidream_cond),
    DitFamily("auraflow", "AuraFlow", 3.5, 4, 2, {"bench": _case(24), "tiny": _case(16, 4)},
              {"bench": f"{_W}, 1 joint + 2 single blocks", "tiny": _TINY}, _factory("factory_auraflow", "build_auraflow"),
              {"dim": WIDTH, "heads": HEADS, "n_double": 1, "n_single": 2}, _auraflow_cond),
)
BY_NAME = {f.name: f for f in FAMILIES}
NAMES = tuple(BY_NAME)


def family(name: str) -> DitFamily:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown DiT family {name!r}: use one of {', '.join(NAMES)}") from None


def parse_families(text: str) -> list[str]:
    """--families: 'all' or comma-separated names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(NAMES)
    for n in names:
        family(n)
    return names
