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

Flux.2 is the same class with ``global_modulation``: the image and text streams' double-block
modulations and the single blocks' are computed once per forward, before the blocks, by
``double_stream_modulation_img`` / ``_txt`` and ``single_stream_modulation``, and shared by every
block. The same hooks sit on those three layers (and the final layer's); the token counts come
from ``img_in`` and ``txt_in``, which run before them. Its latents are 128 channels in 1x1
patches. Its key words are Mistral tokens: the encoder keeps the whole template (system prompt,
[INST] ... [/INST]) and Flux2.extra_conds pads the context on the left to 512 tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from comfy.ldm.flux.layers import ModulationOut, timestep_embedding

from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError
from ..tokens import Segment
from .base import TimeHooks, TokenTimeHooks, gather_tokens, token_index

__all__ = ["PerTokenTimesteps", "PerTokenTimestepsFlux2", "adapter_for", "token_index"]  # token_index: for tests

TIME_EMBED_DIM = 256  # Flux embeds its timestep (and guidance) with 256 sinusoidal features
FLUX2_STREAM = "mistral3_24b"  # Flux2Tokenizer's stream (Mistral-Small-3, tekken vocabulary)
FLUX2_CONTEXT_TOKENS = 512  # Flux2.extra_conds left-pads shorter contexts to this many tokens


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"per-token timesteps are not supported for {what}. Supported: {SUPPORTED_FAMILIES}.")


def adapter_for(diffusion_model: torch.nn.Module) -> PerTokenTimesteps | None:
    """The Flux adapter for ComfyUI's Flux class itself: Flux dev / schnell / Kontext, or Flux.2."""
    from comfy.ldm.flux.model import Flux

    if type(diffusion_model) is Flux:
        if getattr(getattr(diffusion_model, "params", None), "global_modulation", False):
            return PerTokenTimestepsFlux2(diffusion_model)
        return PerTokenTimesteps(diffusion_model)
    return None


class PerTokenTimesteps(TokenTimeHooks):
    """Context manager: while active and a map is set, Flux's image tokens each get their own timestep."""

    family = "Flux"
    time_factor = 1000.0  # Flux embeds t in [0, 1] scaled by 1000
    row_terms = ("guidance", "vector")  # vec = time_in(t) + guidance_in(g) + vector_in(y)

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

    def text_layout(self, tokens: Any) -> list[str] | None:
        """Flux's context is the T5 encoder's output (CLIP-L only gives the pooled vector)."""
        return ["t5xxl"]

    def _model_pre(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        image_tokens = self._record_forward(x, context)
        if self._inverse is None:
            return
        if x.ndim != 4 or x.shape[0] != self._rows or tuple(x.shape[-2:]) != tuple(self._inverse.shape[-2:]):
            raise RuntimeError(
                f"PerTokenTimesteps: the Flux input has shape {tuple(x.shape)} but the timestep map is "
                f"{(self._rows, *self._inverse.shape[-2:])} (rows, H, W)"
            )
        idx = token_index(self._inverse.to(x.device), self.patch_size)
        self._token_idx = idx.repeat(self._rows // idx.shape[0], 1)  # (B', L_img)
        self._image_tokens = image_tokens
        self._captured = {}
        self._vec_table = None
        self._lengths = None
        self._fired = [0] * (len(self.img_mods) + len(self.single_mods) + 1)
        self._in_forward = True

    def _skippable(self) -> int:
        """Hooked parts that may not run in a forward (blocks skip-layer guidance replaces): the per-block ones."""
        return len(self.img_mods) + len(self.single_mods)

    def _model_post(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        self._end_forward("modulation layers", "A compiled graph, or another pack replacing the blocks, bypasses "
                          "them; disable that for asynchronous sampling.", skippable=self._skippable())

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
        features = timestep_embedding(u, TIME_EMBED_DIM, time_factor=self.time_factor).to(time_rows.dtype)
        table = self.model.time_in.forward(features)[None]
        self.table_builds += 1
        for term in self.row_terms:  # the row's own guidance and pooled-text terms, in the stock order
            if term in self._captured:
                table = table + self._captured[term][:, None]
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


class PerTokenTimestepsFlux2(PerTokenTimesteps):
    """Flux.2: the same per-token rows, on its three global modulation layers and the final layer's."""

    family = "Flux.2"

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        dm = diffusion_model
        params = getattr(dm, "params", None)
        if params is None or not getattr(params, "global_modulation", False):
            raise _unsupported("a Flux model without global modulation as Flux.2")
        self.model = dm
        self.patch_size = int(dm.patch_size)
        self.img_mods = [dm.double_stream_modulation_img]  # fired parts: [double image, single, final]
        self.single_mods = [dm.single_stream_modulation]
        self.final_mod = dm.final_layer.adaLN_modulation
        TimeHooks.__init__(self)

    def _install(self) -> None:
        dm = self.model
        self._handles.append(dm.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(dm.register_forward_hook(self._model_post))
        self._handles.append(dm.time_in.register_forward_hook(self._capture("time")))
        if getattr(dm.params, "guidance_embed", False):
            self._handles.append(dm.guidance_in.register_forward_hook(self._capture("guidance")))
        if getattr(dm, "vector_in", None) is not None:
            self._handles.append(dm.vector_in.register_forward_hook(self._capture("vector")))
        # The modulations run once, before the blocks: the token counts come from the input layers.
        self._handles.append(dm.img_in.register_forward_hook(self._img_in_post))
        self._handles.append(dm.txt_in.register_forward_hook(self._txt_in_post))
        self._handles.append(self.img_mods[0].register_forward_hook(self._double_post(0)))
        self._handles.append(self.single_mods[0].register_forward_hook(self._single_post(1)))
        self._handles.append(self.final_mod.register_forward_hook(self._final_post(2)))

    def _skippable(self) -> int:
        return 0  # the global modulations run in every forward, whatever blocks are skipped

    def text_layout(self, tokens: Any) -> list[str | Segment] | None:
        """The Mistral tokens (system prompt and [INST] template included: the encoder keeps them), after the
        left padding Flux2.extra_conds adds up to 512 context tokens."""
        stream = tokens.streams.get(FLUX2_STREAM)
        if stream is None:
            return [FLUX2_STREAM]  # PromptTokens names the encoders it has and the one this model reads
        return [Segment(FLUX2_STREAM, pad_front=max(FLUX2_CONTEXT_TOKENS - stream.length, 0))]

    def _model_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._image_stream = None
        super()._model_pre(module, args, kwargs)

    def _img_in_post(self, _module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        if self._inverse is not None and self._in_forward:
            self._image_stream = int(output.shape[1])  # image tokens, then any reference tokens

    def _txt_in_post(self, _module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        if self._inverse is None or not self._in_forward:
            return
        total = self._image_stream
        if total is None:
            raise RuntimeError("PerTokenTimestepsFlux2: the text ran before the image input layer while a map was set")
        if total < self._image_tokens:
            raise RuntimeError(f"PerTokenTimestepsFlux2: {total} image tokens, expected at least {self._image_tokens}")
        self._lengths = (int(output.shape[1]), self._image_tokens, total - self._image_tokens)

    def _clear_map(self) -> None:
        super()._clear_map()
        self._image_stream: int | None = None
