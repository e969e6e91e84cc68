"""Give ComfyUI's Chroma and Chroma Radiance transformers one timestep per image token, through torch hooks.

Chroma has Flux's blocks without their modulation layers. One MLP, the approximator
(``distilled_guidance_layer``), turns [emb16(t), emb16(guidance), emb32(i)] for i = 0..343 into
344 modulation vectors per row (``mod_vectors``, (B, 344, D)), and ``get_modulations`` slices one
(B, 1, D) per use: single block i at 3i, double block i's image stream at 3S + 6i, its text
stream at 3S + 6D + 6i, the final layer at the last two. The blocks take those slices as ``vec``.

While a map is set, the image-side vectors become one row per token: the approximator runs once
per forward on the U distinct timesteps (for each distinct guidance value of the rows, on the
image-side positions only, with the row's own guidance and position features, in the stock
order), and a pre-hook on every block hands it, in place of its ``vec``, the gathered per-token
rows: the double blocks' image modulation, the single blocks' [text: the stock row, image: per
token]. Chroma's final layer squeezes its modulation to one row, so its output is recomputed
with per-token shift and scale (its own norm and linear). Text tokens keep the stock vectors: the
background timestep.

Chroma Radiance is the same transformer on 16x16 pixel patches, followed by a NeRF head that
reads the transformer's per-patch output and the pixels but no timestep: the same hooks serve it,
with patch 16 and no final layer.
"""

from __future__ import annotations

from typing import Any

import torch
from comfy.ldm.flux.layers import ModulationOut, timestep_embedding

from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError
from ..host import to_device
from .base import TokenTimeHooks, gather_tokens, token_index

__all__ = ["PerTokenTimestepsChroma", "adapter_for", "image_positions"]

TIME_FEATURES = 16  # Chroma embeds t (and guidance) with 16 sinusoidal features each
MOD_INDEX_LENGTH = 344  # the approximator's positions per row (Chroma's forward_orig)


def adapter_for(diffusion_model: torch.nn.Module) -> PerTokenTimestepsChroma | None:
    """The Chroma adapter for ComfyUI's Chroma and ChromaRadiance classes."""
    from comfy.ldm.chroma.model import Chroma
    from comfy.ldm.chroma_radiance.model import ChromaRadiance

    if type(diffusion_model) in (Chroma, ChromaRadiance):
        return PerTokenTimestepsChroma(diffusion_model)
    return None


def image_positions(depth: int, depth_single: int) -> list[int]:
    """The approximator positions of the image side, as get_modulations slices them: every single
    block's 3, every double block's image 6, the final layer's 2 (the double blocks' text 6 are left out)."""
    single = list(range(3 * depth_single))
    double_img = [3 * depth_single + j for j in range(6 * depth)]
    return single + double_img + [MOD_INDEX_LENGTH - 2, MOD_INDEX_LENGTH - 1]


class PerTokenTimestepsChroma(TokenTimeHooks):
    """Context manager: while active and a map is set, Chroma's image tokens each get their own timestep."""

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        from comfy.ldm.chroma_radiance.model import ChromaRadiance

        dm = diffusion_model
        params = dm.params
        self.radiance = isinstance(dm, ChromaRadiance)
        self.family = "Chroma Radiance" if self.radiance else "Chroma"
        self.depth, self.depth_single = int(params.depth), int(params.depth_single_blocks)
        if 3 * self.depth_single + 12 * self.depth + 2 > MOD_INDEX_LENGTH:
            raise UnsupportedModelError(f"per-token timesteps are not supported for a {self.family} model with "
                                        f"{self.depth} double and {self.depth_single} single blocks (more modulation "
                                        f"vectors than the {MOD_INDEX_LENGTH} its approximator makes). "
                                        f"Supported: {SUPPORTED_FAMILIES}.")
        self.model = dm
        self.patch_size = int(dm.patch_size)
        self.final = getattr(dm, "final_layer", None)  # Chroma Radiance has none (its NeRF head has no timestep)
        self.positions = image_positions(self.depth, self.depth_single)
        self._positions: dict[torch.device, torch.Tensor] = {}  # self.positions as an index, per device
        super().__init__()

    def text_layout(self, tokens: Any) -> list[str] | None:
        """Chroma's context is T5-XXL's output for every token (PixArt's tokenizer: no padding, the end token kept)."""
        return ["t5xxl"]

    # --------------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        dm = self.model
        self._handles.append(dm.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(dm.register_forward_hook(self._model_post))
        self._handles.append(dm.distilled_guidance_layer.register_forward_hook(self._approximator_post))
        for i, block in enumerate(dm.double_blocks):
            self._handles.append(block.register_forward_pre_hook(self._double_pre(i), with_kwargs=True))
        for i, block in enumerate(dm.single_blocks):
            self._handles.append(block.register_forward_pre_hook(self._single_pre(i), with_kwargs=True))
        if self.final is not None:
            self._handles.append(self.final.register_forward_hook(self._final_post, with_kwargs=True))

    def _blocks(self) -> int:
        return self.depth + self.depth_single

    def _model_pre(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        self._record_forward(x, context)
        if self._inverse is None:
            return
        if x.ndim != 4 or x.shape[0] != self._rows or tuple(x.shape[-2:]) != tuple(self._inverse.shape[-2:]):
            raise RuntimeError(
                f"{type(self).__name__}: the {self.family} input has shape {tuple(x.shape)} but the timestep map is "
                f"{(self._rows, *self._inverse.shape[-2:])} (rows, H, W)"
            )
        idx = token_index(self._inverse.to(x.device), self.patch_size)
        self._token_idx = idx.repeat(self._rows // idx.shape[0], 1)  # (B', L_img)
        self._approx_in = None
        self._table = None
        self._fired = [0] * (self._blocks() + 1)
        self._in_forward = True

    def _model_post(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        blocks = self._blocks()
        # Blocks may be skipped (skip-layer guidance, Chroma's skip lists), but not all of them; the
        # final layer (Chroma) or the approximator (Radiance) always runs.
        skippable = blocks if any(self._fired[:blocks]) else 0
        self._end_forward("blocks and final modulation", "A compiled graph, or another pack replacing the blocks, "
                          "bypasses them; disable that for asynchronous sampling.", skippable=skippable)

    def _approximator_post(self, _module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> None:
        if self._inverse is None or not self._in_forward:
            return
        self._approx_in = args[0]  # (B', 344, 64): [emb16(t), emb16(guidance), emb32(position)]
        if self.final is None:
            self._fired[-1] += 1

    def _rows_table(self) -> torch.Tensor:
        """(B', U, P, D): the approximator's image-side vectors of every row at every timestep of the map.

        Computed for every row, not once per distinct guidance value: finding the distinct values
        (torch.unique) would read the rows back to the host at every model call, which stalls a GPU;
        the rows of a CFG batch usually share the guidance, so this runs the approximator on about
        twice the rows it needs, a small part of a step next to the blocks.
        """
        if self._table is not None:
            return self._table
        if self._approx_in is None:
            raise RuntimeError(f"{type(self).__name__}: a block ran before {self.family}'s approximator while a map "
                               "was set")
        assert self._unique is not None
        inputs = self._approx_in
        positions = self._positions.get(inputs.device)
        if positions is None:
            positions = self._positions[inputs.device] = to_device(torch.tensor(self.positions), inputs.device)
        base = inputs[:, positions]  # (B', P, 64)
        u = self._unique.to(inputs.device)
        t_features = timestep_embedding(u, TIME_FEATURES).to(inputs.device, inputs.dtype)  # (U, 16), as the stock
        rows, p = base.shape[:2]
        grid = base[:, None].expand(rows, u.shape[0], p, base.shape[-1]).clone()
        grid[..., :TIME_FEATURES] = t_features[None, :, None, :]
        self._table = self.model.distilled_guidance_layer.forward(grid)  # (B', U, P, D)
        self.table_builds += 1
        return self._table

    def _per_token(self, start: int, parts: int) -> list[torch.Tensor]:
        """``parts`` consecutive image-side vectors from table column ``start``, each (B', L_img, D)."""
        table = self._rows_table()
        rows = table[:, :, start:start + parts].flatten(2)  # (B', U, parts * D)
        assert self._token_idx is not None
        return list(gather_tokens(rows, self._token_idx).chunk(parts, dim=-1))

    def _active_for(self, img: torch.Tensor, what: str) -> bool:
        if self._inverse is None or not self._in_forward:
            return False
        assert self._token_idx is not None
        if img.shape[0] != self._token_idx.shape[0] or img.shape[1] < self._token_idx.shape[1]:
            raise RuntimeError(f"{type(self).__name__}: {what} got {tuple(img.shape[:2])} tokens, the map has "
                               f"{tuple(self._token_idx.shape)}")
        return True

    def _double_pre(self, i: int) -> Any:
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            img = kwargs.get("img", args[0] if args else None)
            if img is None or not self._active_for(img, f"double block {i}"):
                return None
            self._fired[i] += 1
            (_img_mods, txt_mods) = kwargs["vec"]
            parts = self._per_token(3 * self.depth_single + 6 * i, 6)
            kwargs = {**kwargs, "vec": ((ModulationOut(*parts[:3]), ModulationOut(*parts[3:])), txt_mods)}
            return args, kwargs
        return hook

    def _single_pre(self, i: int) -> Any:
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            x = args[0] if args else kwargs.get("x")
            if x is None or not self._active_for(x, f"single block {i}"):
                return None
            self._fired[self.depth + i] += 1
            stock = kwargs["vec"]
            assert self._token_idx is not None
            text = x.shape[1] - self._token_idx.shape[1]
            parts = self._per_token(3 * i, 3)
            mixed = [torch.cat([s.expand(-1, text, -1), p], dim=1)
                     for s, p in zip((stock.shift, stock.scale, stock.gate), parts, strict=True)]
            return args, {**kwargs, "vec": ModulationOut(*mixed)}
        return hook

    def _final_post(self, module: torch.nn.Module, args: tuple, kwargs: dict, _output: torch.Tensor) -> Any:
        x = args[0] if args else kwargs["x"]
        if not self._active_for(x, "the final layer"):
            return None
        self._fired[-1] += 1
        shift, scale = self._per_token(len(self.positions) - 2, 2)
        # Chroma's LastLayer with one row per token: addcmul(shift, 1 + scale, norm_final(x)), then linear
        return module.linear(torch.addcmul(shift, 1 + scale, module.norm_final(x)))

    # ------------------------------------------------------------------------------- helpers
    def _clear_map(self) -> None:
        super()._clear_map()
        self._approx_in: torch.Tensor | None = None
        self._table: torch.Tensor | None = None
        self._token_idx: torch.Tensor | None = None
