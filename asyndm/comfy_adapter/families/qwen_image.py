"""Give ComfyUI's Qwen-Image transformer (and Qwen-Image-Edit, the same class) one timestep per image token.

Qwen-Image turns its timestep into one vector per batch row, ``temb = time_text_embed(t)``. Every
block computes ``img_mod(temb)`` and ``txt_mod(temb)`` (6 x width each), splits them in two halves
and applies each half through the block's ``_modulate`` (shift, scale and gate, lifted over the
tokens with ``unsqueeze(1)``); the last layer ``norm_out`` does the same with (scale, shift).
The image stream of a block is [image tokens, reference latents] (Qwen-Image-Edit appends the
reference images' tokens after the image's); the text stream is separate.

While a map is set: ``temb`` is built for the U distinct timesteps (``time_text_embed`` on U rows),
every block's ``img_mod`` runs on those U rows once, and its output becomes a table of U + 1 rows
(the last one is the stock row: the forward's own, background timestep). The block's
``_modulate``, swapped for the run, gathers that table per token (image tokens their timestep's
row, reference tokens the background row) and applies it without the ``unsqueeze``; the text
stream's modulation is the stock one. ``norm_out``'s forward is swapped likewise. With no map set
every swapped method calls the original. ComfyUI 0.3.75 has no ``index_timestep_zero`` reference
method (Qwen-Image-Edit-2511's, which gives reference tokens t = 0): its references keep the row's
timestep, here the background's.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError
from ..tokens import Segment
from .base import MethodSwap, TokenTimeHooks, gather_tokens, token_index

__all__ = ["PerTokenTimestepsQwenImage", "adapter_for", "template_end"]

STREAM = "qwen25_7b"  # the tokenizer stream of ComfyUI's Qwen-Image CLIP (Qwen2.5-VL-7B)
IM_START, USER, NEWLINE = 151644, 872, 198  # "<|im_start|>", "user", "\n" in Qwen2.5's vocabulary


def template_end(ids: list[int]) -> int:
    """How many leading tokens ComfyUI's Qwen-Image text encoder drops from its output.

    As ``QwenImageTEModel.encode_token_weights`` trims it: the context starts at the second
    "<|im_start|>" (the first when there is one), after "user" and a newline when those follow; the
    system prompt before it is not in the context. The end of the template stays.
    """
    starts = [i for i, t in enumerate(ids) if t == IM_START][:2]
    end = starts[-1] if starts else -1
    if len(ids) > end + 3 and ids[end + 1] == USER and ids[end + 2] == NEWLINE:
        end += 3
    return end if end >= 0 else max(len(ids) - 1, 0)  # no template at all: ComfyUI keeps the last token


def adapter_for(diffusion_model: torch.nn.Module) -> PerTokenTimestepsQwenImage | None:
    """The Qwen-Image adapter for ComfyUI's QwenImageTransformer2DModel (Qwen-Image and Qwen-Image-Edit)."""
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    if type(diffusion_model) is QwenImageTransformer2DModel:
        return PerTokenTimestepsQwenImage(diffusion_model)
    return None


class PerTokenTimestepsQwenImage(TokenTimeHooks):
    """Context manager: while active and a map is set, Qwen-Image's image tokens each get their own timestep."""

    family = "Qwen-Image"

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        dm = diffusion_model
        blocks = list(getattr(dm, "transformer_blocks", []))
        if not blocks or getattr(dm, "norm_out", None) is None:
            raise UnsupportedModelError(
                f"per-token timesteps need Qwen-Image's transformer blocks and final layer (a model built "
                f"without its final layer is not supported). Supported: {SUPPORTED_FAMILIES}."
            )
        self.model = dm
        self.patch_size = int(dm.patch_size)
        self.blocks = blocks
        super().__init__()

    def text_layout(self, tokens: Any) -> list[str | Segment] | None:
        """The Qwen2.5-VL tokens after the template's system prompt (ComfyUI trims it), then the template's end."""
        stream = tokens.streams.get(STREAM)
        if stream is None:
            return [STREAM]  # PromptTokens names the encoders it has and the one this model reads
        return [Segment(STREAM, drop_front=template_end(stream.chunks[0] if stream.chunks else []))]

    # --------------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        dm = self.model
        self._handles.append(dm.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(dm.register_forward_hook(self._model_post))
        self._handles.append(dm.time_text_embed.register_forward_hook(self._capture_time))
        for i, block in enumerate(self.blocks):
            self._handles.append(block.img_mod.register_forward_hook(self._img_mod_post(i)))
            self._handles.append(MethodSwap(block, "_modulate", self._swapped_modulate(block._modulate)))
        final = dm.norm_out
        self._handles.append(MethodSwap(final, "forward", self._swapped_final(final, final.forward, len(self.blocks))))

    def _model_pre(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        self._record_forward(x, context)
        if self._inverse is None:
            return
        if x.ndim != 5 or x.shape[2] != 1 or x.shape[0] != self._rows or \
                tuple(x.shape[-2:]) != tuple(self._inverse.shape[-2:]):
            raise RuntimeError(
                f"{type(self).__name__}: the Qwen-Image input has shape {tuple(x.shape)} but the timestep map is "
                f"{(self._rows, *self._inverse.shape[-2:])} (rows, H, W) for one frame (rows, C, 1, H, W)"
            )
        idx = token_index(self._inverse.to(x.device), self.patch_size)
        self._token_idx = idx.repeat(self._rows // idx.shape[0], 1)  # (B', L_img)
        self._full_idx = None
        self._time = None
        self._table = None
        self._fired = [0] * (len(self.blocks) + 1)
        self._in_forward = True

    def _model_post(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        self._end_forward("image modulations and final layer", "A compiled graph, or another pack replacing the "
                          "blocks or their modulation, bypasses them; disable that for asynchronous sampling.",
                          skippable=len(self.blocks))

    def _capture_time(self, _module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> None:
        if self._inverse is not None and self._in_forward:
            self._time = args[1] if len(args) > 1 else None  # time_text_embed(timestep, hidden_states)

    def _temb_table(self) -> torch.Tensor:
        """(U, D): temb at every distinct timestep (the time embedding run on U rows once per forward)."""
        if self._table is not None:
            return self._table
        if self._time is None:
            raise RuntimeError(f"{type(self).__name__}: a block ran before Qwen-Image's time embedding while a map "
                               "was set")
        assert self._unique is not None
        self._table = self.model.time_text_embed.forward(self._unique.to(self._time.device), self._time)
        self.table_builds += 1
        return self._table

    def _rows_per_token(self, x: torch.Tensor) -> torch.Tensor:
        """(B', L) row index of every token of the image stream x: its timestep's, the background's for references."""
        assert self._token_idx is not None and self._unique is not None
        image = self._token_idx.shape[1]
        if x.shape[0] != self._token_idx.shape[0] or x.shape[1] < image:
            raise RuntimeError(f"{type(self).__name__}: an image stream of {tuple(x.shape[:2])} tokens, the map has "
                               f"{tuple(self._token_idx.shape)}")
        if self._full_idx is None or self._full_idx.shape[1] != x.shape[1]:
            background = self._unique.shape[0]  # the table's last row
            refs = self._token_idx.new_full((x.shape[0], x.shape[1] - image), background)
            self._full_idx = torch.cat([self._token_idx.to(x.device), refs], dim=1)
        return self._full_idx

    def _per_timestep(self, layer: Any, stock: torch.Tensor) -> torch.Tensor:
        """(B', U + 1, C): layer run on the U distinct timesteps' temb, then the stock (background) row."""
        rows = layer(self._temb_table())[None].expand(stock.shape[0], -1, -1)  # layer: no hooks of its own
        return torch.cat([rows, stock[:, None]], dim=1)

    def _img_mod_post(self, i: int) -> Any:
        def hook(module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> Any:
            if self._inverse is None or not self._in_forward:
                return None
            self._fired[i] += 1
            return self._per_timestep(module.forward, output)  # (B', U + 1, 6D): the block's _modulate gathers it
        return hook

    def _swapped_modulate(self, original: Any) -> Any:
        def _modulate(x: torch.Tensor, mod_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if mod_params.ndim != 3:  # the text stream, or no map set: the stock (B, 3D) modulation
                return original(x, mod_params)
            shift, scale, gate = gather_tokens(mod_params, self._rows_per_token(x)).chunk(3, dim=-1)
            return torch.addcmul(shift, x, 1 + scale), gate
        return _modulate

    def _swapped_final(self, final: torch.nn.Module, original: Any, i: int) -> Any:
        def forward(x: torch.Tensor, conditioning_embedding: torch.Tensor) -> torch.Tensor:
            if self._inverse is None or not self._in_forward:
                return original(x, conditioning_embedding)
            self._fired[i] += 1
            stock = final.linear(final.silu(conditioning_embedding))
            rows = self._per_timestep(lambda t: final.linear(final.silu(t)), stock)
            scale, shift = gather_tokens(rows, self._rows_per_token(x)).chunk(2, dim=-1)
            return torch.addcmul(shift, final.norm(x), 1 + scale)
        return forward

    # ------------------------------------------------------------------------------- helpers
    def _clear_map(self) -> None:
        super()._clear_map()
        self._token_idx: torch.Tensor | None = None
        self._full_idx: torch.Tensor | None = None
        self._time: torch.Tensor | None = None
        self._table: torch.Tensor | None = None
