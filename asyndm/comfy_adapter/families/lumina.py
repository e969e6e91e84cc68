"""Give ComfyUI's Lumina 2 / Z-Image transformer (NextDiT) one timestep per image token.

NextDiT runs its time backwards: ``t' = 1 - t``, embedded once per batch row as
``adaln_input = t_embedder(t' * time_scale)`` (Z-Image: time_scale 1000). Three stacks of
``JointTransformerBlock``s follow: ``context_refiner`` on the caption alone (not modulated),
``noise_refiner`` on the image tokens (then Z-Image's padding tokens) and the main ``layers`` on
[caption, image, padding]. A modulated block computes ``adaLN_modulation(adaln_input).chunk(4,
dim=1)`` (two scales and two tanh gates) and lifts them over the tokens with ``unsqueeze(1)``;
the final layer scales the same way. Those shapes are fixed to one vector per row.

While a map is set, this adapter swaps, for the run only, the ``forward`` of every modulated block
and of the final layer: each does the block's own arithmetic (its norms, attention, feed-forward,
in the stock order) with per-token modulation. ``adaln_input`` is built for the U distinct
timesteps (the embedder run on U rows, with the same reversal and scale), each block's
``adaLN_modulation`` runs on those rows once, and one gather hands every image token its
timestep's row; caption and padding tokens take the stock row (the background timestep). The
caption refiner is not touched. With no map set every swapped forward calls the original.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError
from ..tokens import Segment
from .base import MethodSwap, TokenTimeHooks, gather_tokens, token_index

__all__ = ["PerTokenTimestepsNextDiT", "adapter_for"]

STREAMS = (("Lumina 2", "gemma2_2b"), ("Z-Image", "qwen3_4b"))  # the tokenizer stream each one's CLIP records


def adapter_for(diffusion_model: torch.nn.Module) -> PerTokenTimestepsNextDiT | None:
    """The Lumina 2 / Z-Image adapter for ComfyUI's NextDiT class."""
    from comfy.ldm.lumina.model import NextDiT

    if type(diffusion_model) is NextDiT:
        return PerTokenTimestepsNextDiT(diffusion_model)
    return None


def _is_z_image(dm: torch.nn.Module) -> bool:
    """Z-Image's modulation is one Linear on a 256-wide time embedding (Lumina 2's: SiLU, then Linear)."""
    first = dm.layers[0].adaLN_modulation[0] if len(dm.layers) else None
    return first is not None and not isinstance(first, torch.nn.SiLU)


class PerTokenTimestepsNextDiT(TokenTimeHooks):
    """Context manager: while active and a map is set, NextDiT's image tokens each get their own timestep."""

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        dm = diffusion_model
        self.family = "Z-Image" if _is_z_image(dm) else "Lumina 2"
        refiners, layers = list(getattr(dm, "noise_refiner", [])), list(getattr(dm, "layers", []))
        if not layers or not all(getattr(b, "modulation", False) for b in refiners + layers):
            raise UnsupportedModelError(f"per-token timesteps need {self.family}'s modulated noise refiner and "
                                        f"main layers. Supported: {SUPPORTED_FAMILIES}.")
        self.model = dm
        self.patch_size = int(dm.patch_size)
        self.pad_multiple = int(getattr(dm, "pad_tokens_multiple", None) or 0)
        self.refiners, self.layers = refiners, layers
        super().__init__()

    def text_layout(self, tokens: Any) -> list[str | Segment] | None:
        """NextDiT's caption is the text encoder's whole output: Gemma-2's tokens from the start token on
        (Lumina 2: the system prompt is part of the text, and words are looked for after its
        "<Prompt Start>" marker, as CLIPTextEncodeLumina2 writes it), Qwen3's chat template around the
        prompt (Z-Image). Z-Image's caption padding comes after it, in the model."""
        name = dict(STREAMS)[self.family]
        stream = tokens.streams.get(name)
        if stream is None or not stream.prompt_from:
            return [name]
        return [Segment(name, search_from=stream.prompt_from)]

    # --------------------------------------------------------------------------------- hooks
    def _padding(self, length: int) -> int:
        """Padding tokens Z-Image appends to a sequence of this length (none for Lumina 2)."""
        return (-length) % self.pad_multiple if self.pad_multiple else 0

    def _install(self) -> None:
        dm = self.model
        self._handles.append(dm.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(dm.register_forward_hook(self._model_post))
        self._handles.append(dm.t_embedder.register_forward_hook(self._capture_time, with_kwargs=True))
        for i, block in enumerate(self.refiners + self.layers):
            in_layers = i >= len(self.refiners)
            self._handles.append(MethodSwap(block, "forward", self._swapped_block(block, block.forward, i, in_layers)))
        final = dm.final_layer
        n = len(self.refiners) + len(self.layers)
        self._handles.append(MethodSwap(final, "forward", self._swapped_final(final, final.forward, n)))

    def _model_pre(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        image = math.ceil(x.shape[-2] / self.patch_size) * math.ceil(x.shape[-1] / self.patch_size)
        caption = int(context.shape[1]) if torch.is_tensor(context) and context.ndim == 3 else 0
        caption += self._padding(caption)  # the caption as the joint attention sees it
        self.forward_tokens = (caption, image, (int(x.shape[-2]), int(x.shape[-1])))
        if self._inverse is None:
            return
        if x.ndim != 4 or x.shape[0] != self._rows or tuple(x.shape[-2:]) != tuple(self._inverse.shape[-2:]):
            raise RuntimeError(
                f"{type(self).__name__}: the {self.family} input has shape {tuple(x.shape)} but the timestep map "
                f"is {(self._rows, *self._inverse.shape[-2:])} (rows, H, W)"
            )
        idx = token_index(self._inverse.to(x.device), self.patch_size)
        rows = self._rows
        idx = idx.repeat(rows // idx.shape[0], 1)  # (B', L_img)
        background = self._unique.shape[0] if self._unique is not None else 0  # the table's last row
        pad = idx.new_full((rows, self._padding(image)), background)
        self._refiner_idx = torch.cat([idx, pad], dim=1)  # [image, padding]
        self._layer_idx = torch.cat([idx.new_full((rows, caption), background), idx, pad], dim=1)
        self._time = None
        self._table = None
        self._fired = [0] * (len(self.refiners) + len(self.layers) + 1)
        self._in_forward = True

    def _model_post(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        self._end_forward("modulated blocks and final layer", "A compiled graph, or another pack replacing the "
                          "blocks' forward, bypasses them; disable that for asynchronous sampling.")

    def _capture_time(self, _module: torch.nn.Module, _args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if self._inverse is not None and self._in_forward:
            self._time = output
            self._time_dtype = kwargs.get("dtype", output.dtype)

    def _adaln_table(self) -> torch.Tensor:
        """(U, D): adaln_input at every distinct timestep, reversed and scaled as NextDiT does it."""
        if self._table is not None:
            return self._table
        if self._time is None:
            raise RuntimeError(f"{type(self).__name__}: a block ran before {self.family}'s time embedding while a "
                               "map was set")
        assert self._unique is not None
        t = 1.0 - self._unique.to(self._time.device)
        self._table = self.model.t_embedder.forward(t * self.model.time_scale, dtype=self._time_dtype)
        self.table_builds += 1
        return self._table

    def _per_token(self, layer: Any, stock_input: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B', L, C): layer run on the U distinct timesteps and on the stock row, gathered per token of x."""
        if x.shape[:2] != idx.shape:
            raise RuntimeError(f"{type(self).__name__}: a sequence of {tuple(x.shape[:2])} tokens, the map expects "
                               f"{tuple(idx.shape)}")
        rows = layer(self._adaln_table())[None].expand(stock_input.shape[0], -1, -1)
        table = torch.cat([rows, layer(stock_input)[:, None]], dim=1)  # (B', U + 1, C): last row the background
        return gather_tokens(table, idx)

    def _swapped_block(self, block: torch.nn.Module, original: Any, i: int, in_layers: bool) -> Any:
        def forward(x: torch.Tensor, x_mask: torch.Tensor, freqs_cis: torch.Tensor,
                    adaln_input: torch.Tensor | None = None, transformer_options: dict | None = None) -> torch.Tensor:
            options = {} if transformer_options is None else transformer_options
            if self._inverse is None or not self._in_forward or adaln_input is None:
                return original(x, x_mask, freqs_cis, adaln_input, transformer_options=options)
            self._fired[i] += 1
            idx = self._layer_idx if in_layers else self._refiner_idx
            assert idx is not None
            mods = self._per_token(block.adaLN_modulation, adaln_input, idx, x)
            scale_msa, gate_msa, scale_mlp, gate_mlp = mods.chunk(4, dim=-1)
            x = x + gate_msa.tanh() * block.attention_norm2(
                block.attention(block.attention_norm1(x) * (1 + scale_msa), x_mask, freqs_cis,
                                transformer_options=options))
            return x + gate_mlp.tanh() * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * (1 + scale_mlp)))
        return forward

    def _swapped_final(self, final: torch.nn.Module, original: Any, i: int) -> Any:
        def forward(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            if self._inverse is None or not self._in_forward:
                return original(x, c)
            self._fired[i] += 1
            assert self._layer_idx is not None
            scale = self._per_token(final.adaLN_modulation, c, self._layer_idx, x)
            return final.linear(final.norm_final(x) * (1 + scale))
        return forward

    # ------------------------------------------------------------------------------- helpers
    def _clear_map(self) -> None:
        super()._clear_map()
        self._refiner_idx: torch.Tensor | None = None
        self._layer_idx: torch.Tensor | None = None
        self._time: torch.Tensor | None = None
        self._time_dtype: Any = None
        self._table: torch.Tensor | None = None
