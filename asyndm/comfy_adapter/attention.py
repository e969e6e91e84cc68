"""Observe the key words' cross-attention without changing the model's output.

Installed as an ``attn2_patch`` (ComfyUI calls it with the block's normalised hidden states and
the text context just before cross-attention) that arms the observer for a layer at the capture
grid, and as the run's ``optimized_attention_override``, which runs the attention unchanged and
scores softmax(QK^T / sqrt(d)) of the conditional rows from the q and k the block itself
projected (LoRA-patched weights included), accumulating the columns of the key words' tokens.
Where the attention is ComfyUI's sub-quadratic one (its CPU default), which computes those
probabilities itself, the override runs its exact operations and keeps them (sub_quad.py) instead
of scoring them a second time. Nothing is read back to the host and nothing is cached. The patch
returns its inputs untouched, so the optimized attention path and other packs' attention overrides
(chained) keep working; a layer another pack replaces with attn2_replace is scored from its to_q /
to_k instead.
"""

from __future__ import annotations

import math
import sys
from types import ModuleType
from typing import Any

import torch

from .host import to_device

__all__ = ["AttentionObserver", "attn2_modules", "capture_grid", "column_weights"]


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
    """attn2_patch that accumulates per-image, per-item attention maps for one step.

    The scores are taken from the block's own attention call where it can: the attn2 patch only
    arms the observer for an observed layer, and the run's ``optimized_attention_override`` (chained
    before any other pack's) receives the q and k the block itself projected, runs the attention
    unchanged, then scores the key words' columns from those q and k; or, for ComfyUI's sub-quadratic
    attention with no other pack's override, computes it with sub_quad.py (the same result, bit for bit)
    and averages the probabilities that computation made. A layer whose attn2 another pack replaces
    (attn2_replace) has no such call: it is recomputed from the block's to_q / to_k.
    """

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
        self._previous_override: Any = None
        self._replaced: set = set()  # the attn2 blocks another pack replaces (no attention call to read)
        self._armed: tuple | None = None  # (n, context, plan) of the attn2 call about to run
        self._columns: dict[tuple, torch.Tensor] = {}  # (uuid, device, context length, heads) -> (items, L) weights
        self._zeros: dict[torch.device, torch.Tensor] = {}
        self._sub_quad: ModuleType | None = None  # sub_quad.py, where ComfyUI is loaded (see install)
        self._sub_quad_agrees: dict[bool, bool] = {}  # upcast -> sub_quad.agrees, asked at the run's first use
        self._sub_quad_routes: dict[tuple, bool | None] = {}  # (function, dtype, precision) -> _sub_quad_upcast
        self._last_route: tuple | None = None  # the last (function, dtype, precision, upcast) asked: every layer's
        self._last_columns: tuple | None = None  # the last (uuid, device, length, heads, weights) asked
        self._conds_kept: tuple | None = None  # (cond_or_uncond, uuids, rows, conds) of the last model call seen
        self.reset()

    def install(self, model_options: dict) -> None:
        """Add this observer to the run's attn2 patches and attention override (model_options is the
        run's own clone, so both go with the run)."""
        to = model_options.setdefault("transformer_options", {})
        patches = to.setdefault("patches", {})
        patches["attn2_patch"] = list(patches.get("attn2_patch", [])) + [self]
        self._replaced = set((to.get("patches_replace") or {}).get("attn2", {}) or {})
        self._previous_override = to.get("optimized_attention_override")
        to["optimized_attention_override"] = self._attention
        if "comfy.ldm.modules.attention" in sys.modules:  # ComfyUI's attention functions exist to be recognised
            from . import sub_quad

            self._sub_quad = sub_quad

    def reset(self) -> None:
        """Start a new accumulation (the sampler reads and resets once per step)."""
        self.total: torch.Tensor | None = None
        self.count = 0
        self._armed = None
        # (q, k, the conditional chunk's rows, heads, uuid): the rows are taken when scored, for all layers at once
        self._pending: list[tuple[torch.Tensor, torch.Tensor, slice, int, Any]] = []
        # (items, rows * heads * h*w) column averages of the probabilities a layer's own attention computed
        # (sub_quad.py), with (rows, heads, h*w, uuid): summed over layers and heads at `mean`
        self._pending_columns: list[tuple[torch.Tensor, int, int, int, Any]] = []

    def mean(self) -> torch.Tensor | None:
        """(B, h*w, items) average of what was seen since the last reset, or None."""
        self._flush()
        self._score_pending()
        if self.total is None or self.count == 0:
            return None
        return (self.total / self.count).permute(1, 2, 0)  # kept (items, B, h*w): see _score_pending

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: Any, extra_options: dict) -> tuple:
        if self._armed is not None:
            self._flush()
        if self.enabled and self.num_items:
            found = self._plan(n, extra_options)
            if found is not None:
                plan, replaced = found
                if replaced:
                    self._score_recomputed(n, context, plan)
                else:
                    self._armed = (n, context, plan)
        return n, context, value

    def _attention(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """The run's attention override: the attention itself, unchanged; an armed call is also scored, from the
        probabilities the attention computed where it is ComfyUI's sub-quadratic one (sub_quad.py), else from its
        q and k."""
        armed, self._armed = self._armed, None
        if armed is not None and self._previous_override is None and self._sub_quad is not None:
            out = self._own_sub_quad(func, args, kwargs, armed)
            if out is not None:
                return out
        out = self._previous_override(func, *args, **kwargs) if self._previous_override is not None else \
            func(*args, **kwargs)
        if armed is not None:
            n, context, plan = armed
            q, k = args[0], args[1]
            if _armed_call(q, k, n, context, plan[2]):
                self._score(q, k, plan)
            else:  # not the call the patch armed for (an unusual attention layout): recompute
                self._score_recomputed(n, context, plan)
        return out

    def _own_sub_quad(self, func: Any, args: tuple, kwargs: dict, armed: tuple) -> torch.Tensor | None:
        """The attention's output, its conditional rows' probabilities kept, where the call is ComfyUI's sub_quad
        and sub_quad.py restates it exactly; else None (the caller runs the attention and scores q and k)."""
        own = self._sub_quad
        assert own is not None
        call = own.plain_call(args, kwargs)
        if call is None:
            return None
        q, k, v, heads, precision = call
        n, context, plan = armed
        if heads != plan[2] or not _armed_call(q, k, n, context, heads):
            return None
        upcast = self._sub_quad_upcast(func, q.dtype, precision)
        if upcast is None:
            return None
        result = own.attention_with_probs(q, k, v, heads, upcast)
        if result is None:
            return None
        out, probs = result
        _, hw, length = probs.shape
        for sl, uuid in plan[1]:  # each conditional chunk is a range of rows (_plan: whole numbers), its heads' rows
            start, stop = sl.start, sl.stop
            cond = probs[start * heads:stop * heads].reshape(-1, length)  # (rows * heads * hw, L), a view
            # averaged now, so that the layer's probabilities are not held until `mean` (one product per layer)
            columns = self._column_weights(uuid, probs.device, length, heads) @ cond.t()
            self._pending_columns.append((columns, stop - start, heads, hw, uuid))
        return out

    def _sub_quad_upcast(self, func: Any, dtype: torch.dtype, precision: Any) -> bool | None:
        """sub_quad.float32_scores of a call of `func` in this dtype and precision, where `func` is ComfyUI's sub_quad,
        scores in float32 and is restated exactly (sub_quad.agrees, once per upcast); else None. Decided once per run
        and (function, dtype, precision): every observed layer asks."""
        last = self._last_route
        if last is not None and last[0] is func and last[1] is dtype and last[2] is precision:
            return last[3]
        key = (func, dtype, precision)
        if key not in self._sub_quad_routes:
            own = self._sub_quad
            assert own is not None
            upcast = own.float32_scores(dtype, precision) if own.is_sub_quad(func) else None
            if upcast is not None and upcast not in self._sub_quad_agrees:
                self._sub_quad_agrees[upcast] = own.agrees(func, upcast)
            self._sub_quad_routes[key] = upcast if upcast is not None and self._sub_quad_agrees[upcast] else None
        self._last_route = (func, dtype, precision, self._sub_quad_routes[key])
        return self._sub_quad_routes[key]

    def _flush(self) -> None:
        """An armed layer whose attention call never came (replaced after install): recompute it."""
        if self._armed is not None:
            n, context, plan = self._armed
            self._armed = None
            self._score_recomputed(n, context, plan)

    def _plan(self, n: torch.Tensor, extra_options: dict) -> tuple[tuple, bool] | None:
        """((module, [(row slice, uuid)] of the conditional chunks, heads), whether another pack replaced the layer's
        attn2) for an observed attn2 call, else None."""
        shape = extra_options.get("activations_shape")
        if shape is None or tuple(shape[-2:]) != self.grid:
            return None
        original = extra_options.get("original_shape")
        if original is not None and tuple(original[-2:]) != self.latent_hw:
            return None  # an area-conditioned crop: its pixels are not the whole image
        block = extra_options.get("block")
        if block is None:
            return None
        key = (block[0], block[1], extra_options.get("block_index", 0))
        module = self.modules.get(key)
        if module is None:
            return None
        conds = self._call_conds(n.shape[0], extra_options)
        if not conds:
            return None
        replaced = key in self._replaced or block in self._replaced
        return (module, conds, int(extra_options["n_heads"])), replaced

    def _call_conds(self, total: int, extra_options: dict) -> list[tuple[slice, Any]]:
        """[(row slice, uuid)] of the conditional chunks of a model call of `total` rows whose prompt has key words
        (empty where none, or where the rows are not whole chunks of the observed batch). Worked out at the call's
        first observed layer and kept while its cond_or_uncond and uuids lists, the same objects in all the call's
        layers, come back (the lists are held, so their identity is not reused)."""
        given, uuids_given = extra_options.get("cond_or_uncond"), extra_options.get("uuids")
        kept = self._conds_kept
        if kept is not None and kept[0] is given and kept[1] is uuids_given and kept[2] == total:
            return kept[3]
        cond_or_uncond = [0] if given is None else given
        uuids = [None] * len(cond_or_uncond) if uuids_given is None else uuids_given
        chunks = len(cond_or_uncond)
        conds: list[tuple[slice, Any]] = []
        if chunks and total % chunks == 0 and total // chunks == self.batch:
            rows = self.batch
            conds = [(slice(o * rows, (o + 1) * rows), uuids[o]) for o in range(chunks)
                     if cond_or_uncond[o] == 0 and self.columns_by_uuid.get(uuids[o]) is not None]
        self._conds_kept = (given, uuids_given, total, conds)
        return conds

    @torch.no_grad()
    def _score_recomputed(self, n: torch.Tensor, context: torch.Tensor, plan: tuple) -> None:
        """Score a layer from the block's to_q / to_k (where its attention call cannot be read)."""
        module, conds, _ = plan
        for sl, _uuid in conds:
            q = module.to_q(n[sl])
            k = module.to_k(context[sl])
            self._score(q, k, (module, [(slice(None), _uuid)], plan[2]))

    def _score(self, q: torch.Tensor, k: torch.Tensor, plan: tuple) -> None:
        """Keep (B', hw, heads * d) q and (B', L, heads * d) k with the slice of their conditional rows, for scoring
        at `mean`: the observed layers (all at the capture grid) are scored together, in one batch, and their
        rows are taken there, once for all of them (no op per layer here)."""
        _, conds, heads = plan
        for sl, uuid in conds:
            self._pending.append((q, k, sl, heads, uuid))

    @torch.no_grad()
    def _score_pending(self) -> None:
        """Add the key words' attention of every kept layer: softmax(q k^T / sqrt(d)) averaged over heads,
        each item's token columns averaged. Layers of one shape are scored together, in ops that do not
        grow with the number of observed layers: their q (and k) concatenated, the conditional rows' heads
        put together in one copy, one batched product with the 1/sqrt(d) scale, one softmax, and one
        product with the column weights (the head mean folded into them) taken from the transposed side,
        which keeps the product's output small. Layers whose own attention kept its probabilities (sub_quad.py)
        were averaged then; their averages are concatenated and summed the same way. The total is kept as
        (items, B, h*w), the layout it comes in."""
        groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for q, k, sl, heads, uuid in self._pending:
            key = (tuple(q.shape), tuple(k.shape), sl.indices(q.shape[0]), heads, uuid, q.dtype, k.dtype)
            groups.setdefault(key, []).append((q, k))
        self._pending = []
        for (q_shape, k_shape, (first, stop, step), heads, uuid, _, _), kept in groups.items():
            layers = len(kept)
            total, hw, width = q_shape
            length = k_shape[1]
            dim_head = width // heads
            qs = torch.cat([q for q, _ in kept]) if layers > 1 else kept[0][0]  # (layers * B', hw, heads * d)
            ks = torch.cat([k for _, k in kept]) if layers > 1 else kept[0][1]
            rows = slice(first, stop, step)
            # (layers * rows * heads, hw, d) and (..., L, d) in float32: the conditional rows, head-major, one copy
            # each (the conversion of a half-precision block's q and k included)
            qs = _float_copy(qs.reshape(layers, total, hw, heads, dim_head)[:, rows].transpose(2, 3), hw, dim_head)
            ks = _float_copy(ks.reshape(layers, total, length, heads, dim_head)[:, rows].transpose(2, 3), length,
                             dim_head)
            scores = torch.baddbmm(self._zero(qs.device), qs, ks.transpose(1, 2), beta=0.0,
                                   alpha=1.0 / math.sqrt(dim_head))
            probs = torch.softmax(scores, dim=-1)  # (layers * rows * heads, hw, L)
            weights = self._column_weights(uuid, probs.device, length, heads)  # (items, L)
            self._add_columns(weights @ probs.view(-1, length).t(), layers, heads, hw)
        averaged: dict[tuple, list[torch.Tensor]] = {}
        for columns, rows, heads, hw, uuid in self._pending_columns:
            averaged.setdefault((tuple(columns.shape), rows, heads, hw, uuid), []).append(columns)
        self._pending_columns = []
        for (_, _, heads, hw, _), layer_columns in averaged.items():
            columns = torch.cat(layer_columns, dim=1) if len(layer_columns) > 1 else layer_columns[0]
            self._add_columns(columns, len(layer_columns), heads, hw)

    def _add_columns(self, columns: torch.Tensor, layers: int, heads: int, hw: int) -> None:
        """Add (items, layers * rows * heads * hw) column averages (layer-major, then row, head, pixel) to the total,
        summed over the layers and the heads (the head mean is folded into the column weights)."""
        per_item = columns.view(columns.shape[0], layers, -1, heads, hw)
        summed = per_item.sum(dim=(1, 3))  # (items, rows, hw)
        self.total = summed if self.total is None else self.total + summed
        self.count += layers

    def _zero(self, device: torch.device) -> torch.Tensor:
        """A 0-d float32 zero on `device`: baddbmm's ignored input (beta 0), made once per device."""
        if device not in self._zeros:
            self._zeros[device] = torch.zeros((), device=device)
        return self._zeros[device]

    def _column_weights(self, uuid: Any, device: torch.device, length: int, heads: int) -> torch.Tensor:
        """(items, L): column_weights transposed, divided by the number of heads (their mean)."""
        last = self._last_columns
        if last is not None and last[0] is uuid and last[2] == length and last[3] == heads and last[1] == device:
            return last[4]
        key = (uuid, device, length, heads)
        if key not in self._columns:
            table = column_weights(self.columns_by_uuid[uuid], length, torch.device("cpu")) / heads
            self._columns[key] = to_device(table.t().contiguous(), device)
        self._last_columns = (uuid, device, length, heads, self._columns[key])
        return self._columns[key]


def _armed_call(q: Any, k: Any, n: torch.Tensor, context: torch.Tensor, heads: int) -> bool:
    """Are q and k the (B', h*w, heads * d) and (B', L, heads * d) projections of the armed layer's hidden states n and
    context (the call the attn2 patch armed for, not an unusual attention layout)?"""
    return torch.is_tensor(q) and torch.is_tensor(k) and q.ndim == 3 and k.ndim == 3 and \
        q.shape[:2] == n.shape[:2] and k.shape[:2] == context.shape[:2] and q.shape[-1] % heads == 0


def _float_copy(heads_view: torch.Tensor, tokens: int, dim_head: int) -> torch.Tensor:
    """(layers, rows, heads, tokens, d) strided view -> (layers * rows * heads, tokens, d) contiguous float32: one
    copy, where a reshape then a float conversion would copy a half-precision q or k twice."""
    if heads_view.dtype == torch.float32:
        return heads_view.reshape(-1, tokens, dim_head)
    return heads_view.to(torch.float32, memory_format=torch.contiguous_format).view(-1, tokens, dim_head)


def column_weights(items: list[list[int]], length: int, device: torch.device) -> torch.Tensor:
    """(L, items) float32: 1 / (item's token count) at each item's token columns, so that one matmul
    averages every item's columns (no index list per call: indexing a device tensor with a Python
    list uploads the list each time). Observers make it once per prompt, device and context length."""
    table = torch.zeros(length, len(items), dtype=torch.float32)
    for i, cols in enumerate(items):
        table[cols, i] = 1.0 / len(cols)
    return to_device(table, device)
