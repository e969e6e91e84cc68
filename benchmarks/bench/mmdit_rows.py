"""The SD3 rows (SD3.5 large and medium shapes, ComfyUI's MMDiT): sampling and the forward alone.

    ksampler  comfy.sample.sample, ComfyUI's KSampler path (the baseline)
    fixed     comfy.sample.sample_custom with the pack's AsynSampler and two fixed key items as
              masks, the same masks and priorities as the UNet and Flux rows

The per-token adaLN's own cost is measured on the transformer forward alone (bench/dit.py), as
for Flux. The SD3 adapter swaps the image blocks' methods for the run and redoes their arithmetic
with per-token modulation; that arithmetic is the model's own work (the stock methods do the
same), so the profile counts it in the MMDiT compute and times only what the adapter adds: the
c table, the adaLN layers on its U rows, the gathers, and the final layer redone per token.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from . import dit
from .fixtures import Case, model_factory, patched
from .measure import PieceTimer
from .naive import naive_mmdit_hooks_class

FAMILY = "mmdit"
VARIANTS = dit.VARIANTS
VARIANT_TITLES = dit.VARIANT_TITLES
FORWARD_VARIANTS = dit.FORWARD_VARIANTS
FORWARD_TITLE = "SD3 (MMDiT) transformer forward alone"
NAIVE_NOTE = "the naive hooks run t_embedder and every image block's adaLN on every image token"
TIMESTEPS = (500.0, 700.0)  # SD3's model timestep is 1000 x sigma


class SD3Bench(dit.TokenBench):
    """An SD3 case: CLIP-L/G + T5-like context and pooled vector (model_factory widths)."""

    family = sys.modules[__name__]


def conditioning(bench: SD3Bench, batch: int, seed: int) -> Any:
    return model_factory().make_sd3_conditioning(batch, bench.text_tokens, seed=seed)


def forward_kwargs(bench: SD3Bench, cond: Any, rows: int, device: Any, dtype: Any) -> dict[str, Any]:
    context, extra = cond[0]
    return {"context": context.to(device, dtype), "y": extra["pooled_output"].to(device, dtype)}


def hook_classes() -> tuple[type, type]:
    from asyndm.comfy_adapter.families.mmdit import PerTokenTimestepsMMDiT

    return PerTokenTimestepsMMDiT, naive_mmdit_hooks_class()


def make_bench(patcher: Any, case: Case, *, model: str = "", **kwargs: Any) -> SD3Bench:
    return SD3Bench(patcher, case, **kwargs)


def describe(patcher: Any, **_: Any) -> dict[str, Any]:
    dm = patcher.model.diffusion_model
    blocks = list(dm.joint_blocks)
    return {
        "family": FAMILY,
        "class": f"{type(patcher.model).__name__} ({type(dm).__module__}.{type(dm).__name__})",
        "config": type(patcher.model.model_config).__name__,
        "params_m": round(sum(q.numel() for q in dm.parameters()) / 1e6, 1),
        "hidden_size": dm.hidden_size,
        "num_heads": dm.num_heads,
        "head_dim": dm.hidden_size // dm.num_heads,
        "depth": len(blocks),
        "self_attn_blocks": [i for i, b in enumerate(blocks) if getattr(b.x_block, "x_block_self_attn", False)],
        "qk_norm": getattr(blocks[0].x_block.attn, "ln_q", None).__class__.__name__,
        "context_in_dim": dm.context_embedder.in_features,
        "adm_in_channels": dm.y_embedder.mlp[0].in_features if dm.y_embedder is not None else None,
        "patch_size": dm.patch_size,
        "pos_embed_max_size": dm.pos_embed_max_size,
        "shift": float(getattr(patcher.model.model_sampling, "shift", float("nan"))),
    }


def model_line(name: str, info: dict[str, Any]) -> str:
    attn = (f"image self-attention in blocks {info['self_attn_blocks']} (SD3.5 medium's dual attention)"
            if info["self_attn_blocks"] else "no image self-attention blocks")
    return (f"Model `{name}`: {info['class']}, config {info['config']} (shift {info['shift']:g}), "
            f"{info['params_m']}M transformer parameters, hidden {info['hidden_size']} ({info['num_heads']} heads of "
            f"{info['head_dim']}), {info['depth']} joint blocks, q/k norm {info['qk_norm']}, {attn}, text context "
            f"{info['context_in_dim']} wide, pooled {info['adm_in_channels']}, {info['patch_size']}x{info['patch_size']} "
            f"patches, pos_embed_max_size {info['pos_embed_max_size']}.")


# ------------------------------------------------------------------------------------------------
# Profile


MMDIT_LABEL = "MMDiT compute (without the pack's hooks; the swapped image-block methods' own arithmetic included)"
MODEL_LABEL = MMDIT_LABEL
NOT_PACK = (MMDIT_LABEL,)
STOCK_MODULE_LABEL = None
HOOKS_PRE_POST = "hooks: forward pre/post, capture, checks"
TABLE_LABEL = "hooks: c table (U rows)"
MODULATION_LABEL = "hooks: image-block adaLN, SiLU + Linear (pack: on the U rows; naive: on every token)"
GATHER_LABEL = "hooks: per-token gather"
POST_LABEL = "hooks: final layer redone per token (norm, modulate, linear)"
NAIVE_TABLE_LABEL = "naive: t_embedder on every token"
PIECES = dit.pieces(  # (label, what) in report order; the pieces are exclusive of each other
    (MMDIT_LABEL, "diffusion_model.forward minus the hooks' pieces below"),
    [
        (HOOKS_PRE_POST, "PerTokenTimestepsMMDiT._model_pre/_model_post/_active_for and the time/vector captures"),
        (TABLE_LABEL, "PerTokenTimestepsMMDiT._table: t_embedder on the U distinct timesteps, plus the pooled term"),
        (MODULATION_LABEL, "PerTokenTimestepsMMDiT._mods minus the table and the gather"),
        (GATHER_LABEL, "gather_tokens: one (B', L, parts x D) gather per image block and the final layer"),
        (POST_LABEL, "the final layer's hook minus its children (the stock final layer ran before it)"),
        (NAIVE_TABLE_LABEL, "naive baseline only: t_embedder on B' x L rows"),
    ],
)
HOOK_PIECES = (HOOKS_PRE_POST, TABLE_LABEL, MODULATION_LABEL, GATHER_LABEL, POST_LABEL, NAIVE_TABLE_LABEL)
PACK_SUM_TITLE = ("**sum of the pack's pieces** (rows between the MMDiT compute and ComfyUI's own pieces, plus the "
                  "sampler's set-up and loop over the KSampler's; % of the KSampler total)")


def install_hook_timers(stack: contextlib.ExitStack, timer: PieceTimer) -> None:
    """Time the SD3 adapter's pieces (the pack's class and the naive one) while stack is open."""
    from asyndm.comfy_adapter.families import mmdit as mmdit_time

    stack.enter_context(patched(mmdit_time, "gather_tokens", timer.wrap(GATHER_LABEL, mmdit_time.gather_tokens)))
    pack = mmdit_time.PerTokenTimestepsMMDiT
    for cls in (pack, naive_mmdit_hooks_class()):
        for attr, label in (("_model_pre", HOOKS_PRE_POST), ("_model_post", HOOKS_PRE_POST),
                            ("_active_for", HOOKS_PRE_POST), ("_mods", MODULATION_LABEL),
                            ("_table", TABLE_LABEL if cls is pack else NAIVE_TABLE_LABEL)):
            if attr in cls.__dict__:
                stack.enter_context(patched(cls, attr, timer.wrap(label, cls.__dict__[attr])))
        for attr, label in (("_capture", HOOKS_PRE_POST), ("_final_post", POST_LABEL)):
            if attr in cls.__dict__:
                stack.enter_context(patched(cls, attr, timer.wrap_factory(label, cls.__dict__[attr])))


profile_variant = dit.profile_variant


# ------------------------------------------------------------------------------------------------
# The transformer forward alone (bench/dit.py)

forward_inputs = dit.forward_inputs
forward_overhead = dit.forward_overhead
