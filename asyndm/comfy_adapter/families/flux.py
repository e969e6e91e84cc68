"""Give ComfyUI's Flux transformer one timestep per image token, through torch hooks.

Flux turns its timestep into one vector per batch row, ``vec = time_in(emb(t)) + guidance_in(..)
+ vector_in(pooled)``, and every block reads it through a modulation layer: ``img_mod`` and
``txt_mod`` in the double-stream blocks, ``modulation`` in the single-stream blocks (whose
sequence is [text, image]) and ``final_layer.adaLN_modulation``. Their outputs broadcast over
the tokens (``apply_mod`` is an addcmul), so a (B', L, D) output per token works unchanged.

While a map is set, the image-side modulations return one row per token: the vector is built
for the U distinct timesteps (time MLP on U rows, plus the row's own guidance and pooled-text
terms, in the stock order), each modulation layer runs on those U rows once, and one gather
per layer hands every token its timestep's row. Text tokens (and reference latents appended
after the image, as Flux Kontext does) keep the row's own vector: the background timestep.
Nothing in ComfyUI is edited; the hooks live inside ``with`` and pass everything through when
no map is set.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from comfy.ldm.flux.layers import ModulationOut, timestep_embedding

from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError
from .base import TimeHooks, gather_tokens, token_index

__all__ = ["PerTokenTimesteps", "token_index"]  # token_index re-exported for tests

TIME_EMBED_DIM = 256  # Flux embeds its timestep (and guidance) with 256 sinusoidal features


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"per-token timesteps are not supported for {what}. Supported: {SUPPORTED_FAMILIES}.")


class PerTokenTimesteps(TimeHooks):
    """Context manager: while active and a map is set, Flux's image tokens each get their own timestep."""

    family = "Flux"

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        dm = diffusion_model
        params = getattr(dm, "params", None)
        if params is None or getattr(params, "global_modulation", False):
            raise _unsupported("Flux.2 (modulation computed once per model, not per block)")
        doubles, singles = list(dm.double_blocks), list(dm.single_blocks)
        if not all(getattr(b, "modulation", False) for b in doubles) or not all(
                getattr(b, "modulation", None) is not None for b in singles):
            raise _unsupported("Flux-layout models without per-block modulation (Chroma)")
        self.model = dm
        self.patch_size = int(dm.patch_size)
        self.img_mods = [b.img_mod for b in doubles]
        self.single_mods = [b.modulation for b in singles]
        self.final_mod = dm.final_layer.adaLN_modulation
        super().__init__()

    def token_timesteps(self) -> torch.Tensor | None:
        """(B', L) timestep of every image token in the forward being set up (for checks)."""
        if self._unique is None or self._inverse is None:
            return None
        idx = token_index(self._inverse, self.patch_size)
        return self._unique[idx].repeat(self._rows // idx.shape[0], 1)

    # --------------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        dm = self.model
        self._handles.append(dm.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(dm.register_forward_hook(self._model_post))
        self._handles.append(dm.time_in.register_forward_hook(self._capture("time")))
        if getattr(dm.params, "guidance_embed", False):
            self._handles.append(dm.guidance_in.register_forward_hook(self._capture("guidance")))
        if getattr(dm, "vector_in", None) is not None:
            self._handles.append(dm.vector_in.register_forward_hook(self._capture("vector")))
        self._handles.append(dm.double_blocks[0].register_forward_pre_hook(self._first_block_pre, with_kwargs=True))
        for i, mod in enumerate(self.img_mods):
            self._handles.append(mod.register_forward_hook(self._double_post(i)))
        for i, mod in enumerate(self.single_mods):
            self._handles.append(mod.register_forward_hook(self._single_post(len(self.img_mods) + i)))
        self._handles.append(self.final_mod.register_forward_hook(self._final_post(len(self.img_mods) + len(self.single_mods))))

    def _model_pre(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._inverse is None:
            return
        x = args[0] if args else kwargs["x"]
        if x.ndim != 4 or x.shape[0] != self._rows or tuple(x.shape[-2:]) != tuple(self._inverse.shape[-2:]):
            raise RuntimeError(
                f"PerTokenTimesteps: the Flux input has shape {tuple(x.shape)} but the timestep map is "
                f"{(self._rows, *self._inverse.shape[-2:])} (rows, H, W)"
            )
        idx = token_index(self._inverse.to(x.device), self.patch_size)
        self._token_idx = idx.repeat(self._rows // idx.shape[0], 1)  # (B', L_img)
        self._image_tokens = math.ceil(x.shape[-2] / self.patch_size) * math.ceil(x.shape[-1] / self.patch_size)
        self._captured = {}
        self._vec_table = None
        self._lengths = None
        self._fired = [0] * (len(self.img_mods) + len(self.single_mods) + 1)
        self._in_forward = True

    def _model_post(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        self._end_forward("modulation layers", "A compiled graph, or another pack replacing the blocks, bypasses "
                          "them; disable that for asynchronous sampling.")

    def _capture(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if self._inverse is not None and self._in_forward:
                self._captured[name] = output
        return hook

    def _first_block_pre(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._inverse is None or not self._in_forward:
            return
        img, txt = kwargs.get("img", args[0] if args else None), kwargs.get("txt", args[1] if len(args) > 1 else None)
        total = int(img.shape[1])
        if total < self._image_tokens:
            raise RuntimeError(f"PerTokenTimesteps: {total} image tokens, expected at least {self._image_tokens}")
        self._lengths = (int(txt.shape[1]), self._image_tokens, total - self._image_tokens)

    def _table(self) -> torch.Tensor:
        """(B', U, D): the modulation input vector of every row at every distinct timestep."""
        if self._vec_table is not None:
            return self._vec_table
        if self._lengths is None or "time" not in self._captured:
            raise RuntimeError("PerTokenTimesteps: a modulation ran before Flux's time embedding while a map was set")
        time_rows = self._captured["time"]
        assert self._unique is not None
        u = self._unique.to(time_rows.device)
        table = self.model.time_in.forward(timestep_embedding(u, TIME_EMBED_DIM).to(time_rows.dtype))[None]
        self.table_builds += 1
        if "guidance" in self._captured:
            table = table + self._captured["guidance"][:, None]
        if "vector" in self._captured:
            table = table + self._captured["vector"][:, None]
        self._vec_table = table.expand(self._rows, -1, -1)
        return self._vec_table

    def _per_token(self, lin_out: torch.Tensor) -> torch.Tensor:
        """(B', U, C) -> (B', L_img, C): every image token takes its timestep's row."""
        assert self._token_idx is not None
        return gather_tokens(lin_out, self._token_idx)

    def _modulated(self, module: torch.nn.Module, i: int) -> torch.Tensor:
        self._fired[i] += 1
        table = self._table()
        return self._per_token(module.lin(torch.nn.functional.silu(table)))

    def _double_post(self, i: int) -> Any:
        def hook(module: torch.nn.Module, _args: tuple, output: Any) -> Any:
            if self._inverse is None or not self._in_forward:
                return None
            assert self._lengths is not None
            _, _, refs = self._lengths
            per_token = self._modulated(module, i)
            if refs:  # reference latents after the image keep the row's own (background) vector
                stock = torch.cat([output[0].shift, output[0].scale, output[0].gate,
                                   output[1].shift, output[1].scale, output[1].gate], dim=-1)
                per_token = torch.cat([per_token, stock.expand(-1, refs, -1)], dim=1)
            parts = per_token.chunk(6, dim=-1)
            return ModulationOut(*parts[:3]), ModulationOut(*parts[3:])
        return hook

    def _single_post(self, i: int) -> Any:
        def hook(module: torch.nn.Module, _args: tuple, output: Any) -> Any:
            if self._inverse is None or not self._in_forward:
                return None
            assert self._lengths is not None
            txt, _, refs = self._lengths
            stock = torch.cat([output[0].shift, output[0].scale, output[0].gate], dim=-1)  # (B', 1, 3D)
            pieces = [stock.expand(-1, txt, -1), self._modulated(module, i)]
            if refs:
                pieces.append(stock.expand(-1, refs, -1))
            return ModulationOut(*torch.cat(pieces, dim=1).chunk(3, dim=-1)), None
        return hook

    def _final_post(self, i: int) -> Any:
        def hook(module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> Any:
            if self._inverse is None or not self._in_forward:
                return None
            assert self._lengths is not None
            _, _, refs = self._lengths
            self._fired[i] += 1
            table = self._table()
            per_token = self._per_token(module.forward(table))  # SiLU + Linear on the U rows
            if refs:
                per_token = torch.cat([per_token, output.expand(-1, refs, -1)], dim=1)
            return per_token
        return hook

    # ------------------------------------------------------------------------------- helpers
    def _clear_map(self) -> None:
        super()._clear_map()
        self._captured: dict[str, torch.Tensor] = {}
        self._vec_table: torch.Tensor | None = None
        self._token_idx: torch.Tensor | None = None
        self._image_tokens = 0
        self._lengths: tuple[int, int, int] | None = None
