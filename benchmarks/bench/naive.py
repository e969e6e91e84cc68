"""The naive baselines: the time embedding computed for every pixel (UNet) or every token (Flux, SD3).

The pack builds a table over the U distinct timesteps and gathers it per pixel or token. These
subclasses of the pack's own hooks compute the same thing without the table, the way a direct
reading of "one timestep per pixel" (and the paper's reference) does it, so the gain of the table
design can be measured. Classes are made once, after ComfyUI is importable.
"""

from __future__ import annotations

from typing import Any

_NAIVE_CLASS: list[type] = []
_NAIVE_FLUX_CLASS: list[type] = []
_NAIVE_MMDIT_CLASS: list[type] = []


def naive_hooks_class() -> type:
    """The NaivePerPixelTimesteps class (made once, after ComfyUI is importable)."""
    if not _NAIVE_CLASS:
        _NAIVE_CLASS.append(_make_naive_hooks_class())
    return _NAIVE_CLASS[0]


def naive_flux_hooks_class() -> type:
    """The NaivePerTokenTimesteps class (made once, after ComfyUI is importable)."""
    if not _NAIVE_FLUX_CLASS:
        _NAIVE_FLUX_CLASS.append(_make_naive_flux_hooks_class())
    return _NAIVE_FLUX_CLASS[0]


def naive_mmdit_hooks_class() -> type:
    """The NaivePerTokenTimestepsMMDiT class (made once, after ComfyUI is importable)."""
    if not _NAIVE_MMDIT_CLASS:
        _NAIVE_MMDIT_CLASS.append(_make_naive_mmdit_hooks_class())
    return _NAIVE_MMDIT_CLASS[0]


def _make_naive_hooks_class() -> type:
    """PerPixelTimesteps computing the time embedding for every pixel, as the paper's reference does.

    The pack builds a table over the U distinct timesteps (U rows of the time MLP and of every
    ResBlock's emb_layers) and gathers it per pixel. This baseline runs the time MLP on all
    B' x H x W pixel timesteps once per forward, and every ResBlock's emb_layers on all pixels of
    that block's resolution (B' x h x w rows), giving the same (B', C, h, w) result.
    """
    import torch
    from comfy.ldm.modules.diffusionmodules import openaimodel

    from asyndm.comfy_adapter.families import unet as unet_time

    class NaivePerPixelTimesteps(unet_time.PerPixelTimesteps):
        def _unet_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            super()._unet_pre(module, args, kwargs)
            self._pixel_emb: torch.Tensor | None = None
            if self._inverse is not None:  # the carrier rows reach emb_layers' pre-hooks, which replace them
                self._emb_is_table = False
                self._table_hooks(True)

        def _emb_pre(self, i: int) -> Any:
            def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
                if self._inverse is None:
                    return None
                if not self._in_forward or self._sizes[i] is None:
                    raise RuntimeError("naive hooks: a ResBlock ran outside a UNet forward while a map was set")
                emb = args[0]
                full = self._pixel_embedding(emb)  # (B', H*W, E)
                h, w = self._sizes[i]
                pos = self._positions((h, w), emb.device)
                pixels = full if pos is None else full[:, pos]  # (B', h*w, E)
                return (pixels.reshape(full.shape[0] * h * w, -1),)  # emb_layers runs on every pixel

            return hook

        def _emb_post(self, i: int) -> Any:
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
                if self._inverse is None:
                    return None
                h, w = self._sizes[i]
                self._fired[i] += 1
                return output.view(self._rows, h, w, -1).permute(0, 3, 1, 2).contiguous()

            return hook

        def _pixel_embedding(self, emb: torch.Tensor) -> torch.Tensor:
            if self._pixel_emb is None:
                if self._emb_patches:
                    raise NotImplementedError("the naive baseline does not apply emb_patch")
                t = self.t_map().to(emb.device)
                rows = t.shape[0]
                sinusoid = openaimodel.timestep_embedding(t.reshape(-1), self.unet.model_channels, repeat_only=False)
                e = self.unet.time_embed(sinusoid.to(self._x_dtype))  # time MLP on B' x H x W rows
                e = e.view(rows, -1, e.shape[-1])
                if self._label is not None:
                    e = e + self._label[:, None]
                self._pixel_emb = e.to(emb.dtype)
            return self._pixel_emb

        def _positions(self, size: tuple[int, int], device: torch.device) -> torch.Tensor | None:
            big_h, big_w = self._inverse.shape[-2:]
            if tuple(size) == (big_h, big_w):
                return None
            key = ("naive-positions", tuple(size), device)
            pos = self._index_cache.get(key)
            if pos is None:
                grid = torch.arange(big_h * big_w, device=device).view(1, big_h, big_w)
                pos = unet_time.block_index_map(grid, size).reshape(-1)
                self._index_cache[key] = pos
            return pos

    return NaivePerPixelTimesteps


def _make_naive_flux_hooks_class() -> type:
    """PerTokenTimesteps without the table: Flux's time MLP on every image token's timestep
    (B' x L rows), and every modulation layer (each block's and the final layer's) on all B' x L
    rows, giving the same (B', L, C) modulation as the pack's U-row table and gather."""
    import torch
    from comfy.ldm.flux.layers import timestep_embedding

    from asyndm.comfy_adapter.families import flux as flux_time

    class NaivePerTokenTimesteps(flux_time.PerTokenTimesteps):
        def _table(self) -> torch.Tensor:
            """(B', L, D): the modulation input vector of every image token."""
            if self._vec_table is not None:
                return self._vec_table
            if self._lengths is None or "time" not in self._captured or self._token_idx is None:
                raise RuntimeError("naive Flux hooks: a modulation ran before Flux's time embedding")
            time_rows = self._captured["time"]
            assert self._unique is not None
            t = self._unique.to(time_rows.device)[self._token_idx.to(time_rows.device)]  # (B', L)
            sinusoid = timestep_embedding(t.reshape(-1), flux_time.TIME_EMBED_DIM).to(time_rows.dtype)
            table = self.model.time_in.forward(sinusoid).view(t.shape[0], t.shape[1], -1)
            self.table_builds += 1
            if "guidance" in self._captured:
                table = table + self._captured["guidance"][:, None]
            if "vector" in self._captured:
                table = table + self._captured["vector"][:, None]
            self._vec_table = table
            return table

        def _per_token(self, lin_out: torch.Tensor) -> torch.Tensor:
            return lin_out  # already one row per token

    return NaivePerTokenTimesteps


def _make_naive_mmdit_hooks_class() -> type:
    """PerTokenTimestepsMMDiT without the table: SD3's t_embedder on every image token's timestep
    (B' x L rows) and every image block's adaLN (and the final layer's) on all B' x L rows, giving
    the same per-token modulation as the pack's U-row table and gather."""
    import torch

    from asyndm.comfy_adapter.families import mmdit as mmdit_time

    class NaivePerTokenTimestepsMMDiT(mmdit_time.PerTokenTimestepsMMDiT):
        def _table(self) -> torch.Tensor:
            """(B', L, D): c of every image token."""
            if self._c_table is not None:
                return self._c_table
            if "time" not in self._captured or self._token_idx is None:
                raise RuntimeError("naive SD3 hooks: a block ran before SD3's time embedding")
            time_rows = self._captured["time"]
            assert self._unique is not None
            t = self._unique.to(time_rows.device)[self._token_idx.to(time_rows.device)]  # (B', L)
            table = self.model.t_embedder(t.reshape(-1), dtype=time_rows.dtype).view(t.shape[0], t.shape[1], -1)
            self.table_builds += 1
            if "vector" in self._captured:
                table = table + self._captured["vector"][:, None]
            self._c_table = table
            return table

        def _mods(self, block: torch.nn.Module, i: int, parts: int) -> tuple[torch.Tensor, ...]:
            self._fired[i] += 1
            return tuple(block.adaLN_modulation(self._table()).chunk(parts, dim=-1))  # every token's own row

    return NaivePerTokenTimestepsMMDiT
