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


def _same_stamp(a: tuple, b: tuple) -> bool:
    """(weight object, its fingerprint, a copy of the bias or None): the same to_k as when cached."""
    if a[0] is not b[0] or not torch.equal(a[1], b[1]):
        return False
    return (a[2] is None and b[2] is None) or (a[2] is not None and b[2] is not None and torch.equal(a[2], b[2]))


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
        # to_k(context) per (layer, cond): the text context is the same at every step, so the keys are
        # computed once per run. Bounded by layers x conds; checked against the context and weights.
        self._contexts: dict[Any, torch.Tensor] = {}
        self._keys: dict[tuple, tuple[tuple, torch.Tensor]] = {}
        self._probes: dict[tuple, torch.Tensor] = {}
        self.reset()

    def install(self, model_options: dict) -> None:
        """Add this observer to the run's attn2 patches (model_options is the run's own clone)."""
        to = model_options.setdefault("transformer_options", {})
        patches = to.setdefault("patches", {})
        patches["attn2_patch"] = list(patches.get("attn2_patch", [])) + [self]

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
            b, hw, _ = q.shape
            q = q.view(b, hw, heads, dim_head).transpose(1, 2)
            k = self._text_keys(module, (block, extra_options.get("block_index", 0)), uuids[o], context[sl],
                                heads, dim_head)
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim_head), dim=-1).mean(dim=1)  # (b, hw, L)
            per_item = torch.stack([probs[..., cols].mean(dim=-1) for cols in columns], dim=-1)  # (b, hw, items)
            self.total = per_item if self.total is None else self.total + per_item
            self.count += 1

    def _text_keys(self, module: torch.nn.Module, layer: tuple, uuid: Any, context: torch.Tensor, heads: int,
                   dim_head: int) -> torch.Tensor:
        """(b, heads, L, dim_head) keys of the text context, reused while context and to_k are unchanged.

        A changed context (another cond under the same uuid) or changed to_k weights (a LoRA hook
        keyframe patching them between steps) recompute; weights computed at cast time
        (weight_function, lowvram patches) are never cached. Weights are compared by a fingerprint
        (their product with a fixed probe vector, about 1/L of the cost of to_k itself), since
        ComfyUI samples under torch.inference_mode, where tensors keep no version counter.
        """
        to_k = module.to_k
        weight = getattr(to_k, "weight", None)
        bias = getattr(to_k, "bias", None)
        cacheable = (torch.is_tensor(weight) and weight.ndim == 2 and not getattr(to_k, "weight_function", None)
                     and not getattr(to_k, "bias_function", None))
        seen = self._contexts.get(uuid)
        if seen is None or seen.shape != context.shape or seen.dtype != context.dtype or not torch.equal(seen, context):
            self._contexts[uuid] = context.detach().clone()
            self._keys = {key: v for key, v in self._keys.items() if key[1] != uuid}
        stamp = None
        if cacheable:
            assert weight is not None
            stamp = (weight, self._fingerprint(weight), bias.detach().clone() if torch.is_tensor(bias) else None)
        cached = self._keys.get((layer, uuid))
        if cached is not None and stamp is not None and _same_stamp(cached[0], stamp):
            return cached[1]
        k = to_k(context).float()
        k = k.view(k.shape[0], k.shape[1], heads, dim_head).transpose(1, 2)
        if stamp is not None:
            self._keys[(layer, uuid)] = (stamp, k)
        return k

    def _fingerprint(self, weight: torch.Tensor) -> torch.Tensor:
        """weight @ probe: changes whenever the weights do (a fixed pseudo-random probe per width)."""
        key = (weight.shape[1], weight.device, weight.dtype)
        probe = self._probes.get(key)
        if probe is None:
            generator = torch.Generator().manual_seed(0x5EED)
            probe = torch.randn(weight.shape[1], generator=generator).to(weight.device, weight.dtype)
            self._probes[key] = probe
        return weight.detach() @ probe
