"""AsynDM's algorithm core: per-pixel timestep schedules, item masks and per-pixel sampler steps.

Pure torch, importable without ComfyUI; the ComfyUI glue lives in asyndm.comfy_adapter and is
imported only by the nodes.
"""

from __future__ import annotations

from .masks import initial_item_masks, item_masks
from .schedules import SCHEDULE_CURVES, next_state, step, timestep_maps
from .steps import ancestral_step, ddim_step, dpmpp_2m_step
from .timesteps import round_clamp

__all__ = [
    "SCHEDULE_CURVES",
    "ancestral_step",
    "ddim_step",
    "dpmpp_2m_step",
    "initial_item_masks",
    "item_masks",
    "next_state",
    "round_clamp",
    "step",
    "timestep_maps",
]
