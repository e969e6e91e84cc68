"""Give ComfyUI's HiDream transformer (comfy.ldm.hidream.model) one timestep per image token.

HiDream turns its timestep into one vector per batch row, ``adaln_input = t_embedder(t) +
p_embedder(pooled)``. Every block computes ``adaLN_modulation(adaln_input)[:, None].chunk(n, -1)``
(12 parts in the dual-stream blocks, image then text; 6 in the single-stream blocks, whose
sequence is [image, T5, Llama, Llama layer k]) and the final layer is Flux's ``LastLayer``. The
``[:, None]`` fixes those shapes to one vector per row, and HiDream has no block-replace patches,
so this adapter swaps, for the run only, the ``forward`` of every inner block: the swapped forward
does the block's own arithmetic (its norms, attention, MoE feed-forward) with per-token
modulation for the image tokens. ``adaln_input`` is built for the U distinct timesteps (t_embedder
on U rows, plus the row's pooled-text term, in the stock order), each modulation layer runs on
those U rows once, and one gather hands every image token its timestep's row. The text tokens
keep the stock row (the background timestep); so do the tokens of an edit image that HiDream E1
concatenates to the right of the latent. The final layer's modulation (whose output broadcasts
over the tokens) is hooked to return one row per image token. With no map set everything calls
the original.

Key words: the joint sequence's text is [T5 (the conditioning's context, 128 tokens), Llama-3.1
(last listed layer), Llama-3.1 (the block's layer)]; the Llama tokens lose their start token in
the encoder and live in ``conditioning_llama3``, not in the context, so both Llama copies are laid
out after the context without counting in its length (``Segment(in_context=False)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError
from ..joint_attention import JointAttentionObserver
from ..tokens import Segment
from .base import MethodSwap, TokenTimeHooks, gather_tokens, token_index

__all__ = ["PerTokenTimestepsHiDream", "adapter_for"]

T5_TOKENS = 128  # ComfyUI's HiDreamTokenizer keeps the first 128 T5 tokens (padded to 128)


def adapter_for(diffusion_model: torch.nn.Module) -> PerTokenTimestepsHiDream | None:
    """The HiDream adapter for ComfyUI's HiDreamImageTransformer2DModel (HiDream I1 full/dev/fast, E1)."""
    from comfy.ldm.hidream.model import HiDreamImageTransformer2DModel

    if type(diffusion_model) is HiDreamImageTransformer2DModel:
        return PerTokenTimestepsHiDream(diffusion_model)
    return None


class PerTokenTimestepsHiDream(TokenTimeHooks):
    """Context manager: while active and a map is set, HiDream's image tokens each get their own timestep."""

    family = "HiDream"
    image_first = True  # the joint sequence is [image, T5, Llama, Llama]

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        dm = diffusion_model
        if getattr(dm, "caption_projection", None) is None or getattr(dm, "llama_layers", None) is None:
            raise UnsupportedModelError(f"per-token timesteps are not supported for HiDream models without caption "
                                        f"projections or Llama layers. Supported: {SUPPORTED_FAMILIES}.")
        self.model = dm
        self.patch_size = int(dm.patch_size)
        self.doubles = [b.block for b in dm.double_stream_blocks]
        self.singles = [b.block for b in dm.single_stream_blocks]
        self.final_mod = dm.final_layer.adaLN_modulation
        self.observer: JointAttentionObserver | None = None
        super().__init__()

    def text_layout(self, tokens: Any) -> list[str | Segment] | None:
        """[T5 (128 columns: the context), Llama without its start token, the same Llama again].

        Streams whose encoder the CLIP did not load are in the sequence as zeros: an unloaded T5
        keeps its 128 columns with no word in them, an unloaded Llama is one zero token (left out).
        """
        loaded = tokens.encoders
        layout: list[str | Segment] = []
        if loaded is None or "t5xxl" in loaded:
            layout.append(Segment("t5xxl", keep=T5_TOKENS))
        else:
            layout.append(Segment("t5xxl", pad_front=T5_TOKENS, keep=0))
        if "llama" in tokens.streams and (loaded is None or "llama" in loaded):
            layout += [Segment("llama", drop_front=1, in_context=False)] * 2
        return layout

    def attention_observer(self, latent_hw: tuple[int, int], batch: int,
                           columns_by_uuid: dict[Any, list[list[int]]]) -> JointAttentionObserver:
        self.observer = super().attention_observer(latent_hw, batch, columns_by_uuid)
        return self.observer

    # --------------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        dm = self.model
        self._handles.append(dm.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(dm.register_forward_hook(self._model_post))
        self._handles.append(dm.t_embedder.register_forward_hook(self._capture("time")))
        self._handles.append(dm.p_embedder.register_forward_hook(self._capture("pooled")))
        for i, block in enumerate(self.doubles):
            self._handles.append(MethodSwap(block, "forward", self._double(block, block.forward, i)))
        for j, block in enumerate(self.singles):
            i = len(self.doubles) + j
            self._handles.append(MethodSwap(block, "forward", self._single(block, block.forward, i)))
        self._handles.append(self.final_mod.register_forward_hook(self._final_post(len(self.doubles) + len(self.singles))))

    @staticmethod
    def _argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
        return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)

    def _model_pre(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = self._argument(args, kwargs, "x", 0)
        context = self._argument(args, kwargs, "context", 3)
        llama = self._argument(args, kwargs, "encoder_hidden_states_llama3", 4)
        edit = self._argument(args, kwargs, "image_cond", 5)
        p = self.patch_size
        width = x.shape[-1] + (edit.shape[-1] if torch.is_tensor(edit) else 0)
        image_tokens = math.ceil(x.shape[-2] / p) * math.ceil(width / p)
        text_tokens = int(context.shape[1]) if torch.is_tensor(context) and context.ndim == 3 else 0
        if torch.is_tensor(llama) and llama.ndim == 4:
            text_tokens += 2 * int(llama.shape[2])  # the last listed layer, then each block's own layer
        # With an edit image the image tokens are not the latent's grid: the observer would skip them.
        self.forward_tokens = (text_tokens, image_tokens, (int(x.shape[-2]), int(width)))
        if torch.is_tensor(edit) and self.observer is not None and self.observer.enabled:
            raise ValueError("key words are not supported on HiDream E1 (an edit image beside the latent) yet: give "
                             "the key items as masks (Attention Mask to Timestep Map)")
        if self._inverse is None:
            return
        if x.ndim != 4 or x.shape[0] != self._rows or tuple(x.shape[-2:]) != tuple(self._inverse.shape[-2:]):
            raise RuntimeError(
                f"{type(self).__name__}: the HiDream input has shape {tuple(x.shape)} but the timestep map is "
                f"{(self._rows, *self._inverse.shape[-2:])} (rows, H, W)"
            )
        self._token_idx = self._image_index(x, edit)
        self._captured = {}
        self._table_rows = None
        self._fired = [0] * (len(self.doubles) + len(self.singles) + 1)
        self._in_forward = True

    def _image_index(self, x: torch.Tensor, edit: Any) -> torch.Tensor:
        """(B', L_img) row of every image token: its timestep's (0..U-1), or U (the stock row) for a
        token of the edit image, which sits to the right of the latent in every token row."""
        assert self._inverse is not None and self._unique is not None
        idx = token_index(self._inverse.to(x.device), self.patch_size)
        idx = idx.repeat(self._rows // idx.shape[0], 1)
        self._has_edit = torch.is_tensor(edit)
        if not self._has_edit:
            return idx
        p = self.patch_size
        rows, cols = math.ceil(x.shape[-2] / p), math.ceil(x.shape[-1] / p)
        total_cols = math.ceil((x.shape[-1] + edit.shape[-1]) / p)
        full = torch.full((idx.shape[0], rows, total_cols), len(self._unique), dtype=idx.dtype, device=idx.device)
        full[:, :, :cols] = idx.view(-1, rows, cols)
        return full.reshape(idx.shape[0], -1)

    def _model_post(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        self._end_forward("blocks and final modulation", "A compiled graph, or another pack replacing the blocks' "
                          "forward, bypasses them; disable that for asynchronous sampling.",
                          skippable=len(self.doubles) + len(self.singles))

    def _capture(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if self._inverse is not None and self._in_forward and name not in self._captured:
                self._captured[name] = output
        return hook

    def _table(self) -> torch.Tensor:
        """(B', U, D): adaln_input of every row at every distinct timestep."""
        if self._table_rows is not None:
            return self._table_rows
        if "time" not in self._captured or "pooled" not in self._captured:
            raise RuntimeError(f"{type(self).__name__}: a block ran before HiDream's time embedding while a map was set")
        time_rows, pooled = self._captured["time"], self._captured["pooled"]
        assert self._unique is not None
        table = self.model.t_embedder(self._unique.to(time_rows.device), time_rows.dtype)[None]
        self.table_builds += 1
        self._table_rows = table + pooled[:, None]  # the stock order: timesteps + p_embedder
        return self._table_rows

    def _per_token(self, layer: Any, stock: torch.Tensor, i: int, width: int | None = None) -> torch.Tensor:
        """(B', L_img, C): ``layer`` on the U rows once, every image token given its row (edit-image
        tokens the stock row ``stock``, (B', C)); only the first ``width`` channels when given."""
        self._fired[i] += 1
        assert self._token_idx is not None
        rows = layer(self._table())  # (B', U, C)
        if self._has_edit:
            rows = torch.cat([rows, stock[:, None]], dim=1)
        if width is not None:
            rows = rows[..., :width]
        return gather_tokens(rows, self._token_idx)

    def _active_for(self, x: torch.Tensor, text: bool = False) -> bool:
        """Is a map set for this forward? ``x``: the image tokens, or [image, text] for a single block."""
        if self._inverse is None or not self._in_forward:
            return False
        assert self._token_idx is not None
        rows, image = self._token_idx.shape
        if x.shape[0] != rows or (x.shape[1] < image if text else x.shape[1] != image):
            raise RuntimeError(f"{type(self).__name__}: a block got {tuple(x.shape[:2])} tokens, the map has "
                               f"{rows} rows of {image} image tokens")
        return True

    def _double(self, block: torch.nn.Module, original: Any, i: int) -> Any:
        """HiDreamImageTransformerBlock.forward with per-token modulation of the image stream."""

        def forward(image_tokens: torch.Tensor, image_tokens_masks: Any = None, text_tokens: Any = None,
                    adaln_input: Any = None, rope: Any = None, transformer_options: dict | None = None) -> Any:
            options = {} if transformer_options is None else transformer_options
            if not self._active_for(image_tokens):
                return original(image_tokens, image_tokens_masks, text_tokens, adaln_input, rope,
                                transformer_options=options)
            wtype = image_tokens.dtype
            stock = block.adaLN_modulation(adaln_input)  # (B', 12 D): the text stream's (background) row
            dim = stock.shape[-1] // 12
            shift_msa_t, scale_msa_t, gate_msa_t, shift_mlp_t, scale_mlp_t, gate_mlp_t = stock[:, None].chunk(12, dim=-1)[6:]
            image = self._per_token(block.adaLN_modulation, stock, i, width=6 * dim)
            shift_msa_i, scale_msa_i, gate_msa_i, shift_mlp_i, scale_mlp_i, gate_mlp_i = image.chunk(6, dim=-1)

            norm_image_tokens = block.norm1_i(image_tokens).to(dtype=wtype)
            norm_image_tokens = norm_image_tokens * (1 + scale_msa_i) + shift_msa_i
            norm_text_tokens = block.norm1_t(text_tokens).to(dtype=wtype)
            norm_text_tokens = norm_text_tokens * (1 + scale_msa_t) + shift_msa_t
            attn_output_i, attn_output_t = block.attn1(norm_image_tokens, image_tokens_masks, norm_text_tokens,
                                                       rope=rope, transformer_options=options)
            image_tokens = gate_msa_i * attn_output_i + image_tokens
            text_tokens = gate_msa_t * attn_output_t + text_tokens

            norm_image_tokens = block.norm3_i(image_tokens).to(dtype=wtype)
            norm_image_tokens = norm_image_tokens * (1 + scale_mlp_i) + shift_mlp_i
            norm_text_tokens = block.norm3_t(text_tokens).to(dtype=wtype)
            norm_text_tokens = norm_text_tokens * (1 + scale_mlp_t) + shift_mlp_t
            ff_output_i = gate_mlp_i * block.ff_i(norm_image_tokens)
            ff_output_t = gate_mlp_t * block.ff_t(norm_text_tokens)
            return ff_output_i + image_tokens, ff_output_t + text_tokens
        return forward

    def _single(self, block: torch.nn.Module, original: Any, i: int) -> Any:
        """HiDreamImageSingleTransformerBlock.forward on [image, text]: the image tokens' modulation per token."""

        def forward(image_tokens: torch.Tensor, image_tokens_masks: Any = None, text_tokens: Any = None,
                    adaln_input: Any = None, rope: Any = None, transformer_options: dict | None = None) -> Any:
            options = {} if transformer_options is None else transformer_options
            if not self._active_for(image_tokens, text=True):
                return original(image_tokens, image_tokens_masks, text_tokens, adaln_input, rope,
                                transformer_options=options)
            assert self._token_idx is not None
            wtype = image_tokens.dtype
            stock = block.adaLN_modulation(adaln_input)  # (B', 6 D)
            image = self._per_token(block.adaLN_modulation, stock, i)
            text = image_tokens.shape[1] - image.shape[1]
            per_token = torch.cat([image, stock[:, None].expand(-1, text, -1)], dim=1)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = per_token.chunk(6, dim=-1)

            norm_image_tokens = block.norm1_i(image_tokens).to(dtype=wtype)
            norm_image_tokens = norm_image_tokens * (1 + scale_msa) + shift_msa
            attn_output_i = block.attn1(norm_image_tokens, image_tokens_masks, rope=rope, transformer_options=options)
            image_tokens = gate_msa * attn_output_i + image_tokens

            norm_image_tokens = block.norm3_i(image_tokens).to(dtype=wtype)
            norm_image_tokens = norm_image_tokens * (1 + scale_mlp) + shift_mlp
            ff_output_i = gate_mlp * block.ff_i(norm_image_tokens.to(dtype=wtype))
            return ff_output_i + image_tokens
        return forward

    def _final_post(self, i: int) -> Any:
        def hook(module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> Any:
            if self._inverse is None or not self._in_forward:
                return None
            # module.forward: the U rows, without running this hook again; output is (B', 1, 2 D)
            return self._per_token(module.forward, output[:, 0], i)
        return hook

    # ------------------------------------------------------------------------------- helpers
    def _clear_map(self) -> None:
        super()._clear_map()
        self._captured: dict[str, torch.Tensor] = {}
        self._table_rows: torch.Tensor | None = None
        self._token_idx: torch.Tensor | None = None
        self._has_edit = False
