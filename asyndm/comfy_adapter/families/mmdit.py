"""Give ComfyUI's SD3 / SD3.5 transformer (MMDiT) one timestep per image token.

MMDiT turns its timestep into one vector per batch row, ``c = t_embedder(t) + y_embedder(pooled)``.
Every joint block has a ``context_block`` (text) and an ``x_block`` (image), both ``DismantledBlock``s
that compute ``adaLN_modulation(c).chunk(n, dim=1)`` and apply it with ``unsqueeze(1)``; the final
layer does the same. Unlike Flux, those shapes are fixed to one vector per row, so a per-token
output of the modulation layer cannot be handed back through a hook.

While a map is set, this adapter therefore swaps, for the run only, four methods of every
``x_block`` (``pre_attention``/``post_attention`` and their SD3.5 self-attention twins
``pre_attention_x``/``post_attention_x``) and hooks the final layer. The swapped methods do the
block's own arithmetic (its norms, attention projections, MLP) with per-token modulation: ``c`` is
built for the U distinct timesteps (t_embedder on U rows, plus the row's pooled-text term, in the
stock order), the block's adaLN layer runs on those U rows once, and one gather hands every image
token its timestep's row. Text tokens keep the stock ``c`` (the background timestep): the
context blocks are not touched. With no map set every swapped method calls the original.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError
from .base import MethodSwap, TokenTimeHooks, gather_tokens, token_index

__all__ = ["PerTokenTimestepsMMDiT", "adapter_for"]

SWAPPED = ("pre_attention", "post_attention", "pre_attention_x", "post_attention_x")


def _modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """MMDiT's modulate with per-token (B, L, D) shift and scale (no unsqueeze)."""
    if shift is None:
        return x * (1 + scale)
    return torch.addcmul(shift, x, 1 + scale)


def adapter_for(diffusion_model: torch.nn.Module) -> PerTokenTimestepsMMDiT | None:
    """The SD3 adapter for ComfyUI's MMDiT (SD3, SD3.5); AuraFlow's MMDiT is another class."""
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT, OpenAISignatureMMDITWrapper

    if type(diffusion_model) in (MMDiT, OpenAISignatureMMDITWrapper):
        return PerTokenTimestepsMMDiT(diffusion_model)
    return None


class PerTokenTimestepsMMDiT(TokenTimeHooks):
    """Context manager: while active and a map is set, SD3's image tokens each get their own timestep."""

    family = "SD3"

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        dm = diffusion_model
        blocks = list(getattr(dm, "joint_blocks", []))
        if not blocks or getattr(dm, "final_layer", None) is None:
            raise UnsupportedModelError(
                f"per-token timesteps need MMDiT's joint blocks and final layer (skip_blocks / no final layer "
                f"variants are not supported). Supported: {SUPPORTED_FAMILIES}."
            )
        if any(getattr(b.x_block, "scale_mod_only", False) for b in blocks):
            raise UnsupportedModelError(f"per-token timesteps are not supported for scale-only MMDiT modulation. "
                                        f"Supported: {SUPPORTED_FAMILIES}.")
        self.model = dm
        self.patch_size = int(dm.patch_size)
        self.x_blocks = [b.x_block for b in blocks]
        super().__init__()

    # --------------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        dm = self.model
        self._handles.append(dm.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(dm.register_forward_hook(self._model_post))
        self._handles.append(dm.t_embedder.register_forward_hook(self._capture("time")))
        if getattr(dm, "y_embedder", None) is not None:
            self._handles.append(dm.y_embedder.register_forward_hook(self._capture("vector")))
        for i, block in enumerate(self.x_blocks):
            for name in SWAPPED:
                original = getattr(block, name)
                self._handles.append(MethodSwap(block, name, self._swapped(name, block, original, i)))
        self._handles.append(dm.final_layer.register_forward_hook(self._final_post(len(self.x_blocks))))

    def text_layout(self, tokens: Any) -> list[str] | None:
        """SD3's context is CLIP-L/G (77-token chunks, side by side in channels) then T5, each if loaded."""
        loaded = tokens.encoders if tokens.encoders is not None else tuple(tokens.streams)
        layout = []
        if "l" in tokens.streams and ("l" in loaded or "g" in loaded):
            layout.append("l")
        if "t5xxl" in tokens.streams and "t5xxl" in loaded:
            layout.append("t5xxl")
        return layout

    def _model_pre(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        context = kwargs.get("context")
        self._record_forward(x, context)
        if self._inverse is None:
            return
        if x.ndim != 4 or x.shape[0] != self._rows or tuple(x.shape[-2:]) != tuple(self._inverse.shape[-2:]):
            raise RuntimeError(
                f"{type(self).__name__}: the SD3 input has shape {tuple(x.shape)} but the timestep map is "
                f"{(self._rows, *self._inverse.shape[-2:])} (rows, H, W)"
            )
        idx = token_index(self._inverse.to(x.device), self.patch_size)
        self._token_idx = idx.repeat(self._rows // idx.shape[0], 1)  # (B', L_img)
        self._captured = {}
        self._c_table = None
        self._fired = [0] * (len(self.x_blocks) + 1)
        self._in_forward = True

    def _model_post(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        self._end_forward("image blocks and final layer", "A compiled graph, or another pack replacing the "
                          "joint blocks' methods, bypasses them; disable that for asynchronous sampling.",
                          skippable=len(self.x_blocks))

    def _capture(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if self._inverse is not None and self._in_forward:
                self._captured[name] = output
        return hook

    def _table(self) -> torch.Tensor:
        """(B', U, D): c of every row at every distinct timestep."""
        if self._c_table is not None:
            return self._c_table
        if "time" not in self._captured:
            raise RuntimeError(f"{type(self).__name__}: a block ran before SD3's time embedding while a map was set")
        time_rows = self._captured["time"]
        assert self._unique is not None
        u = self._unique.to(time_rows.device)
        table = self.model.t_embedder(u, dtype=time_rows.dtype)[None]
        self.table_builds += 1
        if "vector" in self._captured:
            table = table + self._captured["vector"][:, None]
        self._c_table = table.expand(self._rows, -1, -1)
        return self._c_table

    def _mods(self, block: torch.nn.Module, i: int, parts: int) -> tuple[torch.Tensor, ...]:
        """The block's adaLN output per image token, split into its parts (each (B', L, D))."""
        self._fired[i] += 1
        assert self._token_idx is not None
        rows = block.adaLN_modulation(self._table())  # (B', U, parts * D): once per distinct timestep
        return gather_tokens(rows, self._token_idx).chunk(parts, dim=-1)

    def _active_for(self, x: torch.Tensor) -> bool:
        if self._inverse is None or not self._in_forward:
            return False
        assert self._token_idx is not None
        if x.shape[:2] != self._token_idx.shape:
            raise RuntimeError(f"{type(self).__name__}: an image block got {tuple(x.shape[:2])} tokens, the map "
                               f"has {tuple(self._token_idx.shape)}")
        return True

    def _swapped(self, name: str, block: torch.nn.Module, original: Any, i: int) -> Any:
        """The per-token version of one DismantledBlock method (the original while no map is set)."""
        if name == "pre_attention":
            def pre_attention(x: torch.Tensor, c: torch.Tensor) -> Any:
                if not self._active_for(x):
                    return original(x, c)
                shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._mods(block, i, 6)
                qkv = block.attn.pre_attention(_modulate(block.norm1(x), shift_msa, scale_msa))
                return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
            return pre_attention
        if name == "pre_attention_x":
            def pre_attention_x(x: torch.Tensor, c: torch.Tensor) -> Any:
                if not self._active_for(x):
                    return original(x, c)
                (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
                 shift_msa2, scale_msa2, gate_msa2) = self._mods(block, i, 9)
                x_norm = block.norm1(x)
                qkv = block.attn.pre_attention(_modulate(x_norm, shift_msa, scale_msa))
                qkv2 = block.attn2.pre_attention(_modulate(x_norm, shift_msa2, scale_msa2))
                return qkv, qkv2, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2)
            return pre_attention_x
        if name == "post_attention":
            def post_attention(attn: torch.Tensor, x: torch.Tensor, gate_msa: torch.Tensor, shift_mlp: Any,
                               scale_mlp: torch.Tensor, gate_mlp: torch.Tensor) -> torch.Tensor:
                if gate_msa.ndim != 3:  # stock (B, D) modulation: the original
                    return original(attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
                x = x + gate_msa * block.attn.post_attention(attn)
                return x + gate_mlp * block.mlp(_modulate(block.norm2(x), shift_mlp, scale_mlp))
            return post_attention

        def post_attention_x(attn: torch.Tensor, attn2: torch.Tensor, x: torch.Tensor, gate_msa: torch.Tensor,
                             shift_mlp: Any, scale_mlp: torch.Tensor, gate_mlp: torch.Tensor,
                             gate_msa2: torch.Tensor) -> torch.Tensor:
            if gate_msa.ndim != 3:
                return original(attn, attn2, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2)
            out1 = gate_msa * block.attn.post_attention(attn)
            out2 = gate_msa2 * block.attn2.post_attention(attn2)
            x = torch.stack([x, out1, out2], dim=0).sum(dim=0)  # the stock gate_cat's order of sums
            return x + gate_mlp * block.mlp(_modulate(block.norm2(x), shift_mlp, scale_mlp))
        return post_attention_x

    def _final_post(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> Any:
            x = args[0]
            if not self._active_for(x):
                return None
            shift, scale = self._mods(module, i, 2)
            return module.linear(_modulate(module.norm_final(x), shift, scale))
        return hook

    # ------------------------------------------------------------------------------- helpers
    def _clear_map(self) -> None:
        super()._clear_map()
        self._captured: dict[str, torch.Tensor] = {}
        self._c_table: torch.Tensor | None = None
        self._token_idx: torch.Tensor | None = None
