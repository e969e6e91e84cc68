"""The Flux rows (dev with the guidance embedding, schnell without): sampling and the forward alone.

    ksampler  comfy.sample.sample, ComfyUI's KSampler path (the baseline)
    fixed     comfy.sample.sample_custom with the pack's AsynSampler and two fixed key items as
              masks (what Attention Mask to Timestep Map gives it; key words are not supported on
              Flux yet), the same masks and priorities as the UNet rows

The per-token modulation's own cost is measured on the transformer forward alone (bench/dit.py):
the stock forward, the pack's hooks installed without a map, the hooks with a two-timestep map,
and the naive per-token hooks (bench/naive.py); then instrumented forwards give each hook piece's
time per forward (the time-vector table build among them).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from . import dit
from .fixtures import Case, model_factory, patched
from .measure import PieceTimer
from .naive import naive_flux_hooks_class

FAMILY = "flux"
VARIANTS = dit.VARIANTS
VARIANT_TITLES = dit.VARIANT_TITLES
FORWARD_VARIANTS = dit.FORWARD_VARIANTS
FORWARD_TITLE = "Flux transformer forward alone"
NAIVE_NOTE = "the naive hooks run the time MLP and every modulation layer on every image token"
GUIDANCE = 3.5  # FluxGuidance's default; schnell has no guidance embedding
TIMESTEPS = (0.5, 0.7)  # Flux's model timestep is sigma; the key quarter sits at the second


class FluxBench(dit.TokenBench):
    """A Flux case: T5-like context and CLIP-like pooled vector (model_factory widths), guidance on dev."""

    family = sys.modules[__name__]

    def __init__(self, patcher: Any, case: Case, **kwargs: Any) -> None:
        self.guidance = GUIDANCE if has_guidance(patcher) else None
        super().__init__(patcher, case, **kwargs)


def conditioning(bench: FluxBench, batch: int, seed: int) -> Any:
    return model_factory().make_flux_conditioning(batch, bench.text_tokens, seed=seed, guidance=bench.guidance)


def forward_kwargs(bench: FluxBench, cond: Any, rows: int, device: Any, dtype: Any) -> dict[str, Any]:
    import torch

    context, extra = cond[0]
    kwargs: dict[str, Any] = {"context": context.to(device, dtype), "y": extra["pooled_output"].to(device, dtype)}
    if bench.guidance is not None:
        kwargs["guidance"] = torch.full((rows,), float(bench.guidance), device=device)
    return kwargs


def hook_classes() -> tuple[type, type]:
    from asyndm.comfy_adapter.families.flux import PerTokenTimesteps

    return PerTokenTimesteps, naive_flux_hooks_class()


def make_bench(patcher: Any, case: Case, *, model: str = "", **kwargs: Any) -> FluxBench:
    return FluxBench(patcher, case, **kwargs)


def has_guidance(patcher: Any) -> bool:
    return bool(getattr(patcher.model.diffusion_model.params, "guidance_embed", False))


def describe(patcher: Any, **_: Any) -> dict[str, Any]:
    dm = patcher.model.diffusion_model
    p = dm.params
    return {
        "family": FAMILY,
        "class": f"{type(patcher.model).__name__} ({type(dm).__module__}.{type(dm).__name__})",
        "config": type(patcher.model.model_config).__name__,
        "params_m": round(sum(q.numel() for q in dm.parameters()) / 1e6, 1),
        "hidden_size": p.hidden_size,
        "num_heads": p.num_heads,
        "head_dim": p.hidden_size // p.num_heads,
        "mlp_ratio": p.mlp_ratio,
        "double_blocks": p.depth,
        "single_blocks": p.depth_single_blocks,
        "context_in_dim": p.context_in_dim,
        "vec_in_dim": p.vec_in_dim,
        "guidance_embed": bool(p.guidance_embed),
        "patch_size": p.patch_size,
        "shift": float(getattr(patcher.model.model_sampling, "shift", float("nan"))),
    }


def model_line(name: str, info: dict[str, Any]) -> str:
    guidance = f"guidance embedding (guidance {GUIDANCE})" if info["guidance_embed"] else "no guidance embedding"
    return (f"Model `{name}`: {info['class']}, config {info['config']} (shift {info['shift']:g}), "
            f"{info['params_m']}M transformer parameters, hidden {info['hidden_size']} ({info['num_heads']} heads of "
            f"{info['head_dim']}), MLP ratio {info['mlp_ratio']:g}, {info['double_blocks']} double + "
            f"{info['single_blocks']} single blocks, text context {info['context_in_dim']} wide, pooled "
            f"{info['vec_in_dim']}, {guidance}, {info['patch_size']}x{info['patch_size']} patches.")


# ------------------------------------------------------------------------------------------------
# Profile


FLUX_LABEL = "Flux compute (without the pack's hooks)"
MODEL_LABEL = FLUX_LABEL
NOT_PACK = (FLUX_LABEL,)
STOCK_MODULE_LABEL = None
HOOKS_PRE_POST = "hooks: forward pre/post, capture"
TABLE_LABEL = "hooks: time-vector table (U rows)"
MODULATION_LABEL = "hooks: block modulation, SiLU + Linear (pack: on the U rows; naive: on every token)"
GATHER_LABEL = "hooks: per-token gather"
POST_LABEL = "hooks: modulation hooks (final layer on the U rows, concat, split)"
NAIVE_TABLE_LABEL = "naive: time MLP on every token"
PIECES = dit.pieces(  # (label, what) in report order; the pieces are exclusive of each other
    (FLUX_LABEL, "diffusion_model.forward minus the hooks that run inside it (stock modulation included)"),
    [
        (HOOKS_PRE_POST, "PerTokenTimesteps._model_pre/_model_post/_first_block_pre and the time/guidance/vector captures"),
        (TABLE_LABEL, "PerTokenTimesteps._table: time_in on the U distinct timesteps, plus guidance and pooled terms"),
        (MODULATION_LABEL, "PerTokenTimesteps._modulated minus the table and the gather: every block's Linear on U rows"),
        (GATHER_LABEL, "PerTokenTimesteps._per_token: one (B', L, C) gather per modulation layer"),
        (POST_LABEL, "the rest of the img_mod / modulation / final-layer hooks"),
        (NAIVE_TABLE_LABEL, "naive baseline only: time_in on B' x L rows"),
    ],
)
HOOK_PIECES = (HOOKS_PRE_POST, TABLE_LABEL, MODULATION_LABEL, GATHER_LABEL, POST_LABEL, NAIVE_TABLE_LABEL)
PACK_SUM_TITLE = ("**sum of the pack's pieces** (rows between the Flux compute and ComfyUI's own pieces, plus the "
                  "sampler's set-up and loop over the KSampler's; % of the KSampler total)")


def install_hook_timers(stack: contextlib.ExitStack, timer: PieceTimer) -> None:
    """Time the Flux hooks' pieces (the pack's class and the naive one) while stack is open."""
    from asyndm.comfy_adapter.families import flux as flux_time

    for cls in (flux_time.PerTokenTimesteps, naive_flux_hooks_class()):
        for attr, label in (("_model_pre", HOOKS_PRE_POST), ("_model_post", HOOKS_PRE_POST),
                            ("_first_block_pre", HOOKS_PRE_POST), ("_modulated", MODULATION_LABEL),
                            ("_per_token", GATHER_LABEL),
                            ("_table", NAIVE_TABLE_LABEL if cls is not flux_time.PerTokenTimesteps else TABLE_LABEL)):
            if attr in cls.__dict__:
                stack.enter_context(patched(cls, attr, timer.wrap(label, cls.__dict__[attr])))
        for attr, label in (("_capture", HOOKS_PRE_POST), ("_double_post", POST_LABEL), ("_single_post", POST_LABEL),
                            ("_final_post", POST_LABEL)):
            if attr in cls.__dict__:
                stack.enter_context(patched(cls, attr, timer.wrap_factory(label, cls.__dict__[attr])))


profile_variant = dit.profile_variant


# ------------------------------------------------------------------------------------------------
# The transformer forward alone (bench/dit.py)

forward_inputs = dit.forward_inputs
forward_overhead = dit.forward_overhead
