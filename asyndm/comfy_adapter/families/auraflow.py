"""Give ComfyUI's AuraFlow transformer (comfy.ldm.aura.mmdit.MMDiT) one timestep per image token.

AuraFlow turns its timestep into one vector per batch row, ``global_cond = t_embedder(t)`` (the
x1000 is inside the embedder; there is no pooled text), and every block reads it through a
modulation layer: ``modC`` (text) and ``modX`` (image) in the joint ``MMDiTBlock``s, ``modCX`` in
the single ``DiTBlock``s (whose sequence is [registers, text, image]), and ``modF``, which the
model's forward applies inline before its final linear. Each of those is chunked with
``chunk(6, dim=1)`` and applied with ``unsqueeze(1)``, so a per-token output cannot be handed back
through a hook.

While a map is set, this adapter therefore swaps, for the run only, the ``forward`` of every block:
the swapped forward does the block's own arithmetic (its norms, attention, MLPs) with per-token
modulation for the image tokens. ``global_cond`` is built for the U distinct timesteps (t_embedder on
U rows), each image modulation layer runs on those U rows once, and one gather hands every image
token its timestep's row. The text tokens and the 8 register tokens before them keep the stock
``global_cond`` (the background timestep). For the final modulation, ``modF``'s output is replaced
by zeros (the model's inline ``x * (1 + 0) + 0`` returns x unchanged) and the per-token modulation
is applied in front of ``final_linear``. With no map set everything calls the original.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError
from ..joint_attention import JointAttentionObserver
from .base import MethodSwap, TokenTimeHooks, gather_tokens, token_index

__all__ = ["PerTokenTimestepsAuraFlow", "adapter_for"]

TEXT_STREAM = "pile_t5xl"  # ComfyUI's AuraT5Tokenizer (Pile-T5-XL SentencePiece, >= 256 tokens, pad 1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AuraFlow's modulate with per-token (B, L, D) shift and scale: the same two operations, no unsqueeze."""
    return x * (1 + scale) + shift


def adapter_for(diffusion_model: torch.nn.Module) -> PerTokenTimestepsAuraFlow | None:
    """The AuraFlow adapter for ComfyUI's AuraFlow MMDiT (a class of its own, not SD3's MMDiT)."""
    from comfy.ldm.aura.mmdit import MMDiT

    if type(diffusion_model) is MMDiT:
        return PerTokenTimestepsAuraFlow(diffusion_model)
    return None


class PerTokenTimestepsAuraFlow(TokenTimeHooks):
    """Context manager: while active and a map is set, AuraFlow's image tokens each get their own timestep."""

    family = "AuraFlow"

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        dm = diffusion_model
        doubles, singles = list(dm.double_layers), list(dm.single_layers)
        if any(getattr(b, "is_last", False) for b in doubles):
            raise UnsupportedModelError(
                f"per-token timesteps are not supported for AuraFlow models made of joint blocks only (the last "
                f"block's text half has no MLP). Supported: {SUPPORTED_FAMILIES}."
            )
        self.model = dm
        self.patch_size = int(dm.patch_size)
        self.registers = int(dm.register_tokens.shape[1])
        self.doubles, self.singles = doubles, singles
        super().__init__()

    def text_layout(self, tokens: Any) -> list[str] | None:
        """AuraFlow's context is the Pile-T5-XL encoder's output (the registers are the model's, see below)."""
        return [TEXT_STREAM]

    def attention_observer(self, latent_hw: tuple[int, int], batch: int,
                           columns_by_uuid: dict[Any, list[list[int]]]) -> JointAttentionObserver:
        """The joint sequence is [registers, text, image]: the context columns move right by the registers.

        The registers are part of the text side of every attention call, so they stay in the
        softmax's normaliser (as a start token would); the conditioning itself does not hold them,
        which is why the offset is applied here and not as a padded segment of the layout.
        """
        shifted = {uuid: [[c + self.registers for c in cols] for cols in items]
                   for uuid, items in columns_by_uuid.items()}
        return super().attention_observer(latent_hw, batch, shifted)

    # --------------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        dm = self.model
        self._handles.append(dm.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(dm.register_forward_hook(self._model_post))
        self._handles.append(dm.t_embedder.register_forward_hook(self._capture_time))
        for i, block in enumerate(self.doubles):
            self._handles.append(MethodSwap(block, "forward", self._double(block, block.forward, i)))
        for j, block in enumerate(self.singles):
            i = len(self.doubles) + j
            self._handles.append(MethodSwap(block, "forward", self._single(block, block.forward, i)))
        final = len(self.doubles) + len(self.singles)
        self._handles.append(dm.modF.register_forward_hook(self._final_mod))
        self._handles.append(dm.final_linear.register_forward_pre_hook(self._final_pre(final)))

    def _model_pre(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        self._record_forward(x, context, self.registers)
        if self._inverse is None:
            return
        if x.ndim != 4 or x.shape[0] != self._rows or tuple(x.shape[-2:]) != tuple(self._inverse.shape[-2:]):
            raise RuntimeError(
                f"{type(self).__name__}: the AuraFlow input has shape {tuple(x.shape)} but the timestep map is "
                f"{(self._rows, *self._inverse.shape[-2:])} (rows, H, W)"
            )
        idx = token_index(self._inverse.to(x.device), self.patch_size)
        self._token_idx = idx.repeat(self._rows // idx.shape[0], 1)  # (B', L_img)
        self._time_rows = None
        self._cond_table = None
        self._final_zeroed = False
        self._fired = [0] * (len(self.doubles) + len(self.singles) + 1)
        self._in_forward = True

    def _model_post(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        self._end_forward("blocks and final modulation", "A compiled graph, or another pack replacing the blocks' "
                          "forward, bypasses them; disable that for asynchronous sampling.",
                          skippable=len(self.doubles) + len(self.singles))

    def _capture_time(self, _module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        if self._inverse is not None and self._in_forward and self._time_rows is None:
            self._time_rows = output

    def _table(self) -> torch.Tensor:
        """(1, U, D): global_cond at every distinct timestep (AuraFlow's has no per-row term)."""
        if self._cond_table is not None:
            return self._cond_table
        time_rows = self._time_rows
        if time_rows is None:
            raise RuntimeError(f"{type(self).__name__}: a block ran before AuraFlow's time embedding while a map was set")
        assert self._unique is not None
        self._cond_table = self.model.t_embedder(self._unique.to(time_rows.device), time_rows.dtype)[None]
        self.table_builds += 1
        return self._cond_table

    def _mods(self, layer: torch.nn.Module, i: int, parts: int) -> tuple[torch.Tensor, ...]:
        """A modulation layer's output per image token, split into its parts (each (B', L_img, D))."""
        self._fired[i] += 1
        assert self._token_idx is not None
        rows = layer(self._table())  # (1, U, parts * D): once per distinct timestep
        return gather_tokens(rows.expand(self._rows, -1, -1), self._token_idx).chunk(parts, dim=-1)

    def _active_for(self, x: torch.Tensor, text: bool = False) -> bool:
        """Is a map set for this forward? ``x``: the image tokens, or [text, image] for a single block."""
        if self._inverse is None or not self._in_forward:
            return False
        assert self._token_idx is not None
        rows, image = self._token_idx.shape
        if x.shape[0] != rows or (x.shape[1] < image if text else x.shape[1] != image):
            raise RuntimeError(f"{type(self).__name__}: a block got {tuple(x.shape[:2])} tokens, the map has "
                               f"{rows} rows of {image} image tokens")
        return True

    def _double(self, block: torch.nn.Module, original: Any, i: int) -> Any:
        """MMDiTBlock.forward with per-token modulation of the image half (the original while no map is set)."""
        from comfy.ldm.aura.mmdit import modulate

        def forward(c: torch.Tensor, x: torch.Tensor, global_cond: torch.Tensor,
                    transformer_options: dict | None = None, **kwargs: Any) -> Any:
            options = {} if transformer_options is None else transformer_options
            if not self._active_for(x):
                return original(c, x, global_cond, transformer_options=options, **kwargs)
            cres, xres = c, x
            cshift_msa, cscale_msa, cgate_msa, cshift_mlp, cscale_mlp, cgate_mlp = block.modC(global_cond).chunk(6, dim=1)
            c = modulate(block.normC1(c), cshift_msa, cscale_msa)
            xshift_msa, xscale_msa, xgate_msa, xshift_mlp, xscale_mlp, xgate_mlp = self._mods(block.modX, i, 6)
            x = _modulate(block.normX1(x), xshift_msa, xscale_msa)
            c, x = block.attn(c, x, transformer_options=options)
            c = block.normC2(cres + cgate_msa.unsqueeze(1) * c)
            c = cgate_mlp.unsqueeze(1) * block.mlpC(modulate(c, cshift_mlp, cscale_mlp))
            c = cres + c
            x = block.normX2(xres + xgate_msa * x)
            x = xgate_mlp * block.mlpX(_modulate(x, xshift_mlp, xscale_mlp))
            x = xres + x
            return c, x
        return forward

    def _single(self, block: torch.nn.Module, original: Any, i: int) -> Any:
        """DiTBlock.forward on [registers, text, image]: the image tokens' modulation per token."""

        def forward(cx: torch.Tensor, global_cond: torch.Tensor, transformer_options: dict | None = None,
                    **kwargs: Any) -> torch.Tensor:
            options = {} if transformer_options is None else transformer_options
            if not self._active_for(cx, text=True):
                return original(cx, global_cond, transformer_options=options, **kwargs)
            assert self._token_idx is not None
            text = cx.shape[1] - self._token_idx.shape[1]
            stock = block.modCX(global_cond)[:, None]  # (B', 1, 6D): the text tokens' (background) row
            image = self._mods(block.modCX, i, 1)[0]
            per_token = torch.cat([stock.expand(-1, text, -1), image], dim=1)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = per_token.chunk(6, dim=-1)
            cxres = cx
            cx = _modulate(block.norm1(cx), shift_msa, scale_msa)
            cx = block.attn(cx, transformer_options=options)
            cx = block.norm2(cxres + gate_msa * cx)
            mlpout = block.mlp(_modulate(cx, shift_mlp, scale_mlp))
            cx = gate_mlp * mlpout
            return cxres + cx
        return forward

    def _final_mod(self, _module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> Any:
        """modF's output while a map is set: zeros, so the forward's inline modulate leaves x as it is."""
        if self._inverse is None or not self._in_forward or self._final_zeroed:
            return None  # no map, or the adapter's own call on the U rows (below)
        self._final_zeroed = True
        return torch.zeros_like(output)

    def _final_pre(self, i: int) -> Any:
        def hook(_module: torch.nn.Module, args: tuple) -> Any:
            if self._inverse is None or not self._in_forward or not self._final_zeroed:
                return None
            x = args[0]
            self._active_for(x)
            shift, scale = self._mods(self.model.modF, i, 2)
            self._final_zeroed = False
            return (_modulate(x, shift, scale), *args[1:])
        return hook

    # ------------------------------------------------------------------------------- helpers
    def _clear_map(self) -> None:
        super()._clear_map()
        self._time_rows: torch.Tensor | None = None
        self._cond_table: torch.Tensor | None = None
        self._token_idx: torch.Tensor | None = None
        self._final_zeroed = False
