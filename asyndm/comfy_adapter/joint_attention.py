"""Observe the key words' attention inside a transformer's joint attention, without changing it.

Flux and SD3 attend over one sequence [text tokens, image tokens] (some families put the image
first: ``image_first``). Installed as ComfyUI's
``transformer_options["optimized_attention_override"]`` (every ``optimized_attention`` call that
carries transformer_options goes through it, with q and k after q/k-norm and RoPE), the observer
takes each call's image queries and text keys, for the conditional rows, and computes
softmax(q_img k_txt^T / sqrt(d)) over the text keys only: the image-to-text part of the joint
attention, normalised as a cross-attention would be (the UNet's maps, and the paper's, are
softmaxes over text tokens). It averages the key words' columns over heads and calls, then calls
the attention function (or another pack's override) with the inputs untouched.

Calls whose sequence has no text tokens (SD3.5 medium's image-only self-attention) and forwards of
a cropped latent (area conditioning) are skipped. The forward's text and image token counts come
from the family's time adapter, which reads them in its forward pre-hook.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .attention import column_weights

__all__ = ["JointAttentionObserver"]

HEAD_CHUNK = 4  # heads per softmax, to bound the (rows, heads, image, text) scratch memory


class JointAttentionObserver:
    """optimized_attention_override that accumulates per-image, per-item attention maps for one step."""

    def __init__(self, lengths: Any, latent_hw: tuple[int, int], patch_size: int, batch: int,
                 columns_by_uuid: dict[Any, list[list[int]]], *, image_first: bool = False) -> None:
        self.lengths = lengths  # .forward_tokens: (text, image, (h, w)) of the forward being run
        self.image_first = image_first  # sequence [image, text] (HiDream, HunyuanImage) instead of [text, image]
        self.latent_hw = latent_hw
        h, w = latent_hw
        self.grid = (math.ceil(h / patch_size), math.ceil(w / patch_size))
        self.batch = batch
        self.columns_by_uuid = columns_by_uuid
        self.num_items = len(next(iter(columns_by_uuid.values()))) if columns_by_uuid else 0
        self.enabled = False
        self.previous: Any = None
        self._weights: dict[tuple, torch.Tensor] = {}  # (uuid, device, text length) -> column_weights
        self.reset()

    def install(self, model_options: dict) -> None:
        """Become the run's attention override (chaining one that is already there)."""
        to = model_options.setdefault("transformer_options", {})
        self.previous = to.get("optimized_attention_override")
        to["optimized_attention_override"] = self

    def reset(self) -> None:
        """Start a new accumulation (the sampler reads and resets once per step)."""
        self.total: torch.Tensor | None = None
        self.count = 0

    def mean(self) -> torch.Tensor | None:
        """(B, h*w, items) average of what was seen since the last reset, or None."""
        if self.total is None or self.count == 0:
            return None
        return self.total / self.count

    def __call__(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        if self.enabled and self.num_items:
            self._observe(args, kwargs)
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    @torch.no_grad()
    def _observe(self, args: tuple, kwargs: dict) -> None:
        forward = getattr(self.lengths, "forward_tokens", None)
        if forward is None or len(args) < 2:
            return
        text, image, hw = forward
        if tuple(hw) != tuple(self.latent_hw) or text < 1:
            return  # a cropped latent (area conditioning), or no text
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if kwargs.get("skip_reshape", False):
            if q.ndim != 4:
                return
        else:
            if q.ndim != 3 or heads is None:
                return
            q = q.view(q.shape[0], q.shape[1], int(heads), -1).transpose(1, 2)
            k = k.view(k.shape[0], k.shape[1], int(heads), -1).transpose(1, 2)
        if q.shape[2] < text + image or k.shape[2] < text + image:
            return  # not a joint [text, image] call (image-only self-attention)
        options = kwargs.get("transformer_options") or {}
        cond_or_uncond = options.get("cond_or_uncond", [0])
        uuids = options.get("uuids", [None] * len(cond_or_uncond))
        chunks = len(cond_or_uncond)
        if chunks == 0 or q.shape[0] % chunks or q.shape[0] // chunks != self.batch:
            return
        rows = self.batch
        scale = 1.0 / math.sqrt(q.shape[-1])
        for o in range(chunks):
            columns = self.columns_by_uuid.get(uuids[o]) if cond_or_uncond[o] == 0 else None
            if columns is None:
                continue
            sl = slice(o * rows, (o + 1) * rows)
            if self.image_first:
                q_img, k_txt = q[sl, :, :image], k[sl, :, image:image + text]
            else:
                q_img, k_txt = q[sl, :, text:text + image], k[sl, :, :text]
            probs = torch.zeros(rows, image, text, device=q.device, dtype=torch.float32)
            for h0 in range(0, q.shape[1], HEAD_CHUNK):
                logits = q_img[:, h0:h0 + HEAD_CHUNK].float() @ k_txt[:, h0:h0 + HEAD_CHUNK].float().transpose(-1, -2)
                probs += torch.softmax(logits * scale, dim=-1).sum(dim=1)
            probs /= q.shape[1]
            if max(max(cols) for cols in columns) >= text:
                continue  # not this prompt's context (the sampler checked its length against the tokens)
            key = (uuids[o], probs.device, text)
            if key not in self._weights:
                self._weights[key] = column_weights(columns, text, probs.device)
            per_item = probs @ self._weights[key]  # (rows, image, items): each item's columns averaged
            self.total = per_item if self.total is None else self.total + per_item
            self.count += 1
