"""The other transformer families' rows (bench/dit_models.py builds them): sampling, no key items and a key mask.

    ksampler  comfy.sample.sample, ComfyUI's KSampler path (the baseline)
    nokeys    comfy.sample.sample_custom with the pack's AsynSampler and no key items: what the
              Asynchronous KSampler costs when it has nothing to do (it hands the run to
              ComfyUI's own sampler; the output is the KSampler's, bit for bit)
    half      the same with one key item whose mask is the image's top half (k = 0.8): the
              per-token timesteps through the schedule, every step

The rows share bench/dit.py's bench and profile with Flux and SD3; the pack's per-token hooks run
inside the transformer's forward, so the profile counts them in the transformer compute and times
the sampler-side pieces apart. What they cost shows as the overhead per step over the KSampler.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from . import dit, dit_models
from .fixtures import Case
from .measure import PieceTimer

FAMILY = "dit"
VARIANTS = ("ksampler", "nokeys", "half")
VARIANT_TITLES = {"ksampler": "KSampler", "nokeys": "async, no key items", "half": "async, half-image key mask"}
KEY_PRIORITY = 0.8
TEXT_TOKENS = 64

MODEL_LABEL = "transformer compute (the pack's per-token hooks inside it included)"
NOT_PACK = (MODEL_LABEL,)
STOCK_MODULE_LABEL = None
HOOK_PIECES: tuple[str, ...] = ()
PIECES = dit.pieces((MODEL_LABEL, "diffusion_model.forward, the adapter's hooks and swapped methods included"), [])
PACK_SUM_TITLE = ("**sum of the pack's sampler-side pieces** (rows between the transformer compute and ComfyUI's "
                  "own pieces, plus the sampler's set-up and loop over the KSampler's; % of the KSampler total)")


class FamilyBench(dit.TokenBench):
    """A case of one family: its conditioning and latent format, no key items or the half-image key mask."""

    variants = VARIANTS
    family = sys.modules[__name__]

    def __init__(self, patcher: Any, case: Case, *, model: str, **kwargs: Any) -> None:
        self.spec = dit_models.family(model)
        super().__init__(patcher, case, **kwargs)

    def latent_shape(self) -> tuple[int, ...]:
        return self.spec.latent_shape(self.case)

    def key_schedules(self) -> dict[str, Any]:
        import torch

        from asyndm.schedule_spec import AsynSchedule

        h, w = self.case.height, self.case.width
        masks = torch.zeros(1, 1, h, w)
        masks[:, :, : h // 2] = 1.0
        return {"nokeys": None, "half": AsynSchedule(curve="bin", k=(KEY_PRIORITY,), mask_source="masks", masks=masks)}


def conditioning(bench: FamilyBench, batch: int, seed: int) -> Any:
    return bench.spec.conditioning(bench, batch, seed)


def install_hook_timers(stack: contextlib.ExitStack, timer: PieceTimer) -> None:
    """No hook pieces of their own: the adapters' hooks are timed inside the transformer compute."""


def make_bench(patcher: Any, case: Case, *, model: str = "", cfg: float | None = None, text_tokens: int | None = None,
               **kwargs: Any) -> FamilyBench:
    spec = dit_models.family(model)
    return FamilyBench(patcher, case, model=model, cfg=spec.cfg if cfg is None else cfg,
                       text_tokens=TEXT_TOKENS if text_tokens is None else text_tokens, **kwargs)


def describe(patcher: Any, *, model: str = "", size: str = "bench", **_: Any) -> dict[str, Any]:
    spec = dit_models.family(model)
    dm = patcher.model.diffusion_model
    return {
        "family": FAMILY,
        "title": spec.title,
        "class": f"{type(patcher.model).__name__} ({type(dm).__module__}.{type(dm).__name__})",
        "config": type(patcher.model.model_config).__name__,
        "params_m": round(sum(q.numel() for q in dm.parameters()) / 1e6, 1),
        "size": size,
        "layout": spec.layouts[size],
        "latent_channels": spec.channels,
        "patch_size": spec.patch,
        "frame_axis": spec.frame_axis,
        "reference": spec.reference,
        "text_pad": spec.text_pad,
        "cfg": spec.cfg,
        "shift": float(getattr(patcher.model.model_sampling, "shift", float("nan"))),
    }


def model_line(name: str, info: dict[str, Any]) -> str:
    latent = f"{info['latent_channels']}-channel latent" + (" (B, C, 1, H, W)" if info["frame_axis"] else "")
    if name == "chroma-radiance":
        latent = "RGB pixels"
    return (f"Model `{name}` ({info['title']}, {info['size']} size): {info['class']}, config {info['config']} "
            f"(shift {info['shift']:g}), {info['params_m']}M transformer parameters, {info['layout']}; {latent} in "
            f"{info['patch_size']}x{info['patch_size']} patches; cfg {info['cfg']:g}.")


profile_variant = dit.profile_variant
