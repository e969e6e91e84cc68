"""Observe the key words' cross-attention without changing the model's output.

Installed as an ``attn2_patch`` (ComfyUI calls it with the block's normalised hidden states and
the text context just before cross-attention). It recomputes softmax(QK^T / sqrt(d)) from the
block's own (possibly LoRA-patched) to_q / to_k at the capture grid only, for the conditional rows,
and accumulates the columns of the key words' tokens. It returns its inputs untouched, so the
optimized attention path and other packs' attn2 replacements keep working.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["AttentionObserver", "attn2_modules", "capture_grid"]


def attn2_modules(diffusion_model: torch.nn.Module) -> dict[tuple[str, int, int], torch.nn.Module]:
    """Map (block kind, block id, transformer index) -> attn2 module, as ComfyUI names blocks."""
    found: dict[tuple[str, int, int], torch.nn.Module] = {}
    groups: list[tuple[str, Any]] = [
        ("input", getattr(diffusion_model, "input_blocks", [])),
        ("middle", [getattr(diffusion_model, "middle_block", None)]),
        ("output", getattr(diffusion_model, "output_blocks", [])),
    ]
    for kind, blocks in groups:
        for block_id, block in enumerate(blocks):
            if block is None:
                continue
            for layer in block:
                blocks_list = getattr(layer, "transformer_blocks", None)
                if blocks_list is None:
                    continue
                for index, tb in enumerate(blocks_list):
                    attn2 = getattr(tb, "attn2", None)
                    if attn2 is not None:
                        found[(kind, block_id, index)] = attn2
    return found


def capture_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The spatial size of UNet activations two downsamplings below the latent (1/4 resolution)."""
    h, w = latent_hw
    for _ in range(2):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


class AttentionObserver:
    """attn2_patch that accumulates per-image, per-item attention maps for one step."""

    def __init__(
        self,
        modules: dict[tuple[str, int, int], torch.nn.Module],
        grid: tuple[int, int],
        latent_hw: tuple[int, int],
        batch: int,
        columns_by_uuid: dict[Any, list[list[int]]],
    ) -> None:
        self.modules = modules
        self.grid = grid
        self.latent_hw = latent_hw
        self.batch = batch
        self.columns_by_uuid = columns_by_uuid
        self.num_items = len(next(iter(columns_by_uuid.values()))) if columns_by_uuid else 0
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        """Start a new accumulation (the sampler reads and resets once per step)."""
        self.total: torch.Tensor | None = None
        self.count = 0

    def mean(self) -> torch.Tensor | None:
        """(B, h*w, items) average of what was seen since the last reset, or None."""
        if self.total is None or self.count == 0:
            return None
        return self.total / self.count

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: Any, extra_options: dict) -> tuple:
        if self.enabled and self.num_items:
            self._observe(n, context, extra_options)
        return n, context, value

    @torch.no_grad()
    def _observe(self, n: torch.Tensor, context: torch.Tensor, extra_options: dict) -> None:
        shape = extra_options.get("activations_shape")
        original = extra_options.get("original_shape")
        if shape is None or tuple(shape[-2:]) != self.grid:
            return
        if original is not None and tuple(original[-2:]) != self.latent_hw:
            return  # an area-conditioned crop: its pixels are not the whole image
        block = extra_options.get("block")
        if block is None:
            return
        module = self.modules.get((block[0], block[1], extra_options.get("block_index", 0)))
        if module is None:
            return
        cond_or_uncond = extra_options.get("cond_or_uncond", [0])
        uuids = extra_options.get("uuids", [None] * len(cond_or_uncond))
        chunks = len(cond_or_uncond)
        if chunks == 0 or n.shape[0] % chunks:
            return
        rows = n.shape[0] // chunks
        if rows != self.batch:
            return
        heads = int(extra_options["n_heads"])
        dim_head = int(extra_options["dim_head"])
        for o in range(chunks):
            columns = self.columns_by_uuid.get(uuids[o]) if cond_or_uncond[o] == 0 else None
            if columns is None:
                continue
            sl = slice(o * rows, (o + 1) * rows)
            q = module.to_q(n[sl]).float()
            k = module.to_k(context[sl]).float()
            b, hw, _ = q.shape
            q = q.view(b, hw, heads, dim_head).transpose(1, 2)
            k = k.view(b, k.shape[1], heads, dim_head).transpose(1, 2)
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim_head), dim=-1).mean(dim=1)  # (b, hw, L)
            per_item = torch.stack([probs[..., cols].mean(dim=-1) for cols in columns], dim=-1)  # (b, hw, items)
            self.total = per_item if self.total is None else self.total + per_item
            self.count += 1
