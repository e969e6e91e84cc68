"""Give ComfyUI's SD1.x/SD2.x/SDXL UNet one timestep per latent pixel, through torch hooks.

The UNet computes one time embedding per batch row (``UNetModel._forward``) and consumes it only
in ``ResBlock._forward`` as ``emb_layers(emb)[..., None, None]`` added to (or scaling/shifting)
the block's features. While a map is set we replace that ``emb_layers`` output with a
(B', C, h, w) tensor (1 row for one image: it broadcasts over the CFG chunks like the stock
(B', C, 1, 1) does): each pixel gets the projection of its own timestep's embedding, taken at
the block's resolution. Nothing in ComfyUI is edited or patched: the hooks are registered in
``__enter__`` and removed in ``__exit__``, and with no map set they pass everything through.

The per-pixel embedding is built from a table over the U distinct timesteps (U is small: one per
schedule track), not per pixel, so the extra cost is U rows of the time MLP and of every
``emb_layers`` plus one gather per ResBlock (per image, shared by its CFG chunks).

The table travels as the UNet's own embedding: the time MLP's stock call runs on the U timesteps
instead of the B' carrier rows, and its output (SDXL: (U, 1, E), to which the UNet adds its (B', E)
label) reaches every ResBlock's ``emb_layers``, whose forward hook gathers it per pixel. Where a
patch reads or rewrites the embedding on its way to the blocks (``emb_patch``,
``forward_timestep_embed_patch``), or a timestep block other than the ResBlocks would read it (another
pack's module in the UNet), the stock rows go on instead, the U rows ride after them in the
same call, and ``emb_layers`` pre-hooks (installed for those forwards only) swap in the table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from comfy.ldm.modules.diffusionmodules import openaimodel

from ..attention import AttentionObserver, attn2_modules, capture_grid
from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError
from . import unwrap
from .base import TimeHooks

__all__ = ["PerPixelTimesteps", "adapter_for", "block_index_map", "unet_resblocks"]


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"per-pixel timesteps are not supported for {what}. Supported: {SUPPORTED_FAMILIES}.")


def adapter_for(diffusion_model: torch.nn.Module) -> PerPixelTimesteps | None:
    """The UNet adapter for ComfyUI's openaimodel.UNetModel (refusing the variants it cannot serve)."""
    if isinstance(diffusion_model, openaimodel.UNetModel):
        return PerPixelTimesteps(diffusion_model)
    return None


def unet_resblocks(diffusion_model: torch.nn.Module) -> list[openaimodel.ResBlock]:
    """The ResBlocks that read the time embedding, after refusing what the hooks cannot serve (_timestep_blocks)."""
    return _timestep_blocks(diffusion_model)[0]


def _timestep_blocks(diffusion_model: torch.nn.Module) -> tuple[list[openaimodel.ResBlock], bool]:
    """(the ResBlocks that read the time embedding, whether another timestep block would read it too: another
    pack's module in the UNet), after refusing what the hooks cannot serve; one walk over the modules.

    Refused: anything that is not an openaimodel.UNetModel; temporal models (VideoResBlock,
    SpatialVideoTransformer: their time_stack adds the embedding over a frame axis, via
    exchange_temb_dims); ResBlocks that resample (up/down: their embedding resolution differs from
    their input's) or are not 2-D. ResBlocks with skip_t_emb have no embedding and are left alone.
    """
    dm = unwrap(diffusion_model)
    if not isinstance(dm, openaimodel.UNetModel):
        raise _unsupported(f"{type(dm).__module__}.{type(dm).__name__}")
    if getattr(dm, "use_temporal_resblocks", False):
        raise _unsupported("temporal (video) UNets")
    blocks: list[openaimodel.ResBlock] = []
    other_readers = False
    for name, module in _embedding_paths(dm):
        if isinstance(module, (openaimodel.VideoResBlock, openaimodel.SpatialVideoTransformer)):
            raise _unsupported(f"temporal (video) UNets ({name} is a {type(module).__name__})")
        if not isinstance(module, openaimodel.ResBlock):
            other_readers = other_readers or (isinstance(module, openaimodel.TimestepBlock)
                                              and not isinstance(module, openaimodel.TimestepEmbedSequential))
            continue
        if module.emb_layers is None:
            continue
        if module.exchange_temb_dims:
            raise _unsupported(f"ResBlocks that exchange time-embedding dims ({name})")
        if module.updown:
            raise _unsupported(f"resampling ResBlocks (resblock_updown, {name})")
        if not isinstance(module.in_layers[-1], torch.nn.Conv2d):
            raise _unsupported(f"non-2-D ResBlocks ({name})")
        if not isinstance(module.emb_layers, torch.nn.Sequential):
            raise _unsupported(f"ResBlocks with a custom emb_layers ({name}: {type(module.emb_layers).__name__})")
        blocks.append(module)
    if not blocks:
        raise _unsupported("a UNet without time-conditioned ResBlocks")
    return blocks, other_readers


def _embedding_paths(dm: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module the time embedding can reach, in named_modules' order: the UNet's
    blocks and what they hold, except the insides of the stock modules that take no embedding (spatial
    transformers, up- and downsamplers) and of ResBlocks. Those hold most of a UNet's modules, and this
    walk runs once per sampling run."""
    found: list[tuple[str, torch.nn.Module]] = []
    closed = (openaimodel.ResBlock, openaimodel.Upsample, openaimodel.Downsample)

    def walk(prefix: str, module: torch.nn.Module) -> None:
        found.append((prefix, module))
        if isinstance(module, closed) or (isinstance(module, openaimodel.SpatialTransformer)
                                          and not isinstance(module, openaimodel.SpatialVideoTransformer)):
            return
        for name, child in module.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    for name in ("input_blocks", "middle_block", "output_blocks"):
        top = getattr(dm, name, None)
        if isinstance(top, torch.nn.Module):
            walk(name, top)
    return found


def block_index_map(inverse: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) index map -> (B, h, w) at a block's resolution.

    SD UNets halve with stride-2 convs (size ceil(H/2) each time), whose output pixel i is centred
    on input pixel 2i: we take every s-th pixel from the top-left, the reference's [::s, ::s].
    For sizes divisible by s this equals nearest-neighbour resizing, which is the fallback for
    sizes no power-of-two stride explains.
    """
    big_h, big_w = inverse.shape[-2:]
    h, w = size
    if (h, w) == (big_h, big_w):
        return inverse
    s = 2
    while s < 2 * max(big_h, big_w):
        if -(-big_h // s) == h and -(-big_w // s) == w:
            return inverse[:, ::s, ::s]
        s *= 2
    return F.interpolate(inverse[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()


class PerPixelTimesteps(TimeHooks):
    """Context manager: while active and a map is set, the UNet uses a timestep per pixel.

    Usage (the sampler side, once per model call)::

        with PerPixelTimesteps(model.diffusion_model) as hooks:
            hooks.set_map(t_rows)        # (B', H, W) model timesteps for the next forward's rows
            out = model.apply_model(...)  # carrier timestep per row still passed as usual
            hooks.set_map(None)          # stock behaviour again

    ``emb_patch`` (transformer_options["patches"]["emb_patch"], applied by ComfyUI to the time
    embedding before the SDXL label is added) is honoured: each patch is applied to the table,
    once per distinct timestep u, on B' rows that all carry u. A patch that treats rows
    independently therefore gives each pixel what the stock model gives a batch at u (to the rounding
    of the time MLP, whose rows are computed in another batch than the stock call's); a patch that
    mixes rows, or counts its calls, sees U calls per forward instead of one.

    Not covered: gradient checkpointing recomputes blocks in backward without a map (inference
    only); torch.compile graphs traced without these hooks ignore them, which is detected (the
    hooks count their calls per forward) and raised as RuntimeError rather than silently wrong.
    """

    family = "UNet"
    patch_size = 1

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        self.unet = unwrap(diffusion_model)
        # A timestep block other than the ResBlocks (another pack's module) would read the embedding itself:
        # with one, the embedding stays the stock rows (see _unet_pre).
        self.blocks, self._other_emb_readers = _timestep_blocks(self.unet)
        self._table_handles: list[Any] = []  # the emb_layers pre-hooks, while installed
        self._has_label = self.unet.num_classes is not None and getattr(self.unet, "label_emb", None) is not None
        # Block index maps, kept while the same index map object comes back (every call of a track set):
        # the reference keeps that object alive, so identity cannot be reused by another tensor.
        self._index_owner: torch.Tensor | None = None
        self._index_cache: dict[tuple, torch.Tensor] = {}
        # Per block: (map object, table layout, rows, size, index) of the last gather, see _block_index.
        self._index_by_block: list[tuple | None] = [None] * len(self.blocks)
        super().__init__()

    def attention_observer(self, latent_hw: tuple[int, int], batch: int,
                           columns_by_uuid: dict[Any, list[list[int]]]) -> AttentionObserver:
        """Cross-attention (attn2) at 1/4 of the latent size, as the paper reads it."""
        return AttentionObserver(attn2_modules(self.unet), capture_grid(latent_hw), latent_hw, batch, columns_by_uuid)

    # --------------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        unet = self.unet
        self._handles.append(unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
        self._handles.append(unet.register_forward_hook(self._unet_post))
        self._handles.append(unet.time_embed.register_forward_pre_hook(self._time_pre))
        self._handles.append(unet.time_embed.register_forward_hook(self._time_post))
        label = getattr(unet, "label_emb", None)
        if unet.num_classes is not None and label is not None:
            self._handles.append(label.register_forward_hook(self._label_post))
        for i, block in enumerate(self.blocks):
            # Each block's input size, read in every forward: patches can change it from one forward to the next
            # at the same latent size (Kohya Deep Shrink downscales inside the UNet over a range of sigmas).
            self._handles.append(block.register_forward_pre_hook(self._block_pre(i)))
            self._handles.append(block.emb_layers.register_forward_hook(self._emb_post(i)))

    def _table_hooks(self, wanted: bool) -> None:
        """The emb_layers pre-hooks that swap the B' carrier rows for the table: needed only in forwards where
        the time embedding cannot itself be the table (something else reads or rewrites it, see _unet_pre)."""
        if wanted and not self._table_handles:
            self._table_handles = [block.emb_layers.register_forward_pre_hook(self._emb_pre(i))
                                   for i, block in enumerate(self.blocks)]
        elif not wanted:
            for handle in self._table_handles:
                handle.remove()
            self._table_handles = []

    def _remove(self) -> None:
        self._table_hooks(False)
        super()._remove()

    def _unet_pre(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._inverse is None:
            return
        x = args[0] if args else kwargs["x"]
        if x.ndim != 4 or x.shape[0] != self._rows or tuple(x.shape[-2:]) != tuple(self._inverse.shape[-2:]):
            raise RuntimeError(
                f"PerPixelTimesteps: the UNet input has shape {tuple(x.shape)} but the timestep map is "
                f"{(self._rows, *self._inverse.shape[-2:])} (rows, H, W); set a map for exactly the rows and "
                "size of this forward"
            )
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None) or {}
        patches = options.get("patches") or {}
        self._emb_patches = list(patches.get("emb_patch") or [])
        self._options = options
        # The time MLP's output can be the table itself (U rows; SDXL: (U, 1, E), to which the UNet adds
        # its (B', E) label) unless a patch reads or rewrites the embedding on its way to the blocks, or a
        # timestep block other than the ResBlocks reads it.
        self._emb_is_table = (not self._emb_patches and not patches.get("forward_timestep_embed_patch")
                              and not self._other_emb_readers)
        self._table_hooks(not self._emb_is_table)
        self._x_dtype = x.dtype
        self._fired = [0] * len(self.blocks)
        self._sizes = [None] * len(self.blocks)
        self._label = None
        self._table = None
        self._fused_rows = None
        self._emb_table = False
        self._in_forward = True

    def _unet_post(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        self._end_forward("ResBlocks", "A torch.compile graph traced without these hooks, gradient checkpointing or "
                          "another pack replacing ResBlock.forward bypasses them; disable that for asynchronous sampling.")

    def _time_pre(self, _module: torch.nn.Module, args: tuple) -> tuple | None:
        """The time MLP runs on the table's U sinusoid rows: instead of the B' carrier rows where its output can be
        the table itself, else after them, in the stock call either way (its weights are read once per forward,
        as in the stock model; a call of its own would read them again, which costs more than the few rows)."""
        if self._inverse is None or not self._in_forward or self._fused_rows is not None or self._own_call or not args:
            return None
        t_emb = args[0]
        if not torch.is_tensor(t_emb) or t_emb.ndim != 2 or t_emb.shape[0] != self._rows:
            return None
        if not self._emb_is_table and (self._x_dtype, t_emb.device) in self._base_cache:
            return None
        sinusoid = openaimodel.timestep_embedding(self._unique.to(t_emb.device), self.unet.model_channels,
                                                  repeat_only=False).to(t_emb.dtype)
        if self._emb_is_table:
            self._fused_rows = 0
            return (sinusoid,)
        self._fused_rows = t_emb.shape[0]
        return (torch.cat([t_emb, sinusoid]),)

    def _time_post(self, _module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """The table goes on into the UNet as its embedding; or the fused call is split: the carrier rows go on,
        the table rows are kept for the emb_layers pre-hooks."""
        rows = self._fused_rows
        if rows is None:
            return None
        self._fused_rows = None
        self.table_builds += 1
        if rows == 0:
            self._emb_table = True
            return output[:, None] if self._has_label else output  # SDXL: + label (B', E) gives (U, B', E)
        self._base_cache[(self._x_dtype, output.device)] = output[rows:]
        return output[:rows]

    def _label_post(self, _module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        if self._inverse is not None:
            self._label = output

    def _block_pre(self, i: int) -> Any:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            if self._inverse is not None and self._in_forward:
                self._sizes[i] = tuple(args[0].shape[-2:])
        return hook

    def _emb_pre(self, i: int) -> Any:
        """emb_layers gets the U-row table instead of the B' carrier rows (their output is not used)."""
        def hook(_module: torch.nn.Module, args: tuple) -> tuple | None:
            if self._inverse is None:
                return None
            if not self._in_forward or self._sizes[i] is None:
                raise RuntimeError("PerPixelTimesteps: a ResBlock ran outside a UNet forward while a map was set")
            return (self._embedding_table(args[0]),)
        return hook

    def _emb_post(self, i: int) -> Any:
        """emb_layers' output on the table -> the block's (B', C, h, w) per-pixel embedding."""
        def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._inverse is None:
                return None
            size = self._sizes[i]
            if size is None or not self._in_forward:
                raise RuntimeError("PerPixelTimesteps: a ResBlock ran outside a UNet forward while a map was set")
            if not self._emb_table and not self._table_handles:
                raise RuntimeError("PerPixelTimesteps: the time MLP did not run on the map's timesteps in this "
                                   "forward, so the ResBlocks' embedding is not the table")
            self._fired[i] += 1
            return self._per_pixel(output, size, i, u_major=self._emb_table)
        return hook

    # ------------------------------------------------------------------------------ the table
    def _embedding_table(self, emb: torch.Tensor) -> torch.Tensor:
        """(U, E), or (B', U, E) with SDXL's label or an emb_patch: what emb would be per timestep."""
        if self._table is not None:
            return self._table
        rows = self._rows
        if emb.ndim != 2 or emb.shape[0] != rows:
            raise RuntimeError(f"PerPixelTimesteps: time embedding of shape {tuple(emb.shape)}, expected ({rows}, E)")
        key = (self._x_dtype, emb.device)
        base = self._base_cache.get(key)
        if base is None:  # the time MLP ran without the fused rows (its input was not the stock (B', C) one)
            u = self._unique.to(emb.device)
            sinusoid = openaimodel.timestep_embedding(u, self.unet.model_channels, repeat_only=False)
            self._own_call = True
            try:
                base = self.unet.time_embed(sinusoid.to(self._x_dtype))
            finally:
                self._own_call = False
            self._base_cache[key] = base
            self.table_builds += 1
        table = base
        if self._emb_patches:
            per_u = []
            for j in range(base.shape[0]):
                e = base[j].expand(rows, -1).clone()
                for patch in self._emb_patches:
                    e = patch(e, self.unet.model_channels, self._options)
                per_u.append(e)
            table = torch.stack(per_u, dim=1)  # (B', U, E)
        if self._label is not None:
            label = self._label
            table = (table[None] if table.ndim == 2 else table) + label[:, None]
        self._table = table.to(emb.dtype)
        return self._table

    def _index(self, size: tuple[int, int], device: torch.device, tables: int) -> torch.Tensor:
        """(R * h * w,) int32: each pixel's row in the block's table, flattened in (R, h, w) order.
        tables: 1 for one (U, C) table shared by the rows, else U (every row r has its own (U, C)
        table, flattened row-major: row r's entries start at r * U). Built once per size."""
        assert self._inverse is not None
        if self._index_owner is not self._inverse:  # a new map (not a new call with the same map object)
            self._index_owner = self._inverse
            self._index_cache = {}
        key = (size, device, tables, self._rows)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = block_index_map(self._inverse.to(device), size)
            if tables > 1:
                rows = self._rows
                idx = idx.repeat(rows // idx.shape[0], 1, 1)
                idx = idx + torch.arange(rows, device=device).view(-1, 1, 1) * tables
            idx = idx.to(torch.int32).reshape(-1)  # int32 (one copy): index_select reads it faster than int64
            self._index_cache[key] = idx
        return idx

    def _block_index(self, block: int, size: tuple[int, int], device: torch.device, tables: int) -> torch.Tensor:
        """_index for a block, remembered per block while the map object, its rows, the block's size and the table
        layout stay (every call of a track set): a list lookup per block and call instead of building a key."""
        kept = self._index_by_block[block]
        if (kept is not None and kept[0] is self._inverse and kept[1] == tables and kept[2] == self._rows
                and kept[3] == size and kept[4].device == device):
            return kept[4]
        idx = self._index(size, device, tables)
        self._index_by_block[block] = (self._inverse, tables, self._rows, size, idx)
        return idx

    def _per_pixel(self, out_tab: torch.Tensor, size: tuple[int, int], block: int, *,
                   u_major: bool = False) -> torch.Tensor:
        """out_tab (U, C) or (B', U, C) ((U, B', C) with u_major: the table that was the UNet's embedding, to
        which SDXL added its label) -> (B', C, h, w): each pixel gets its timestep's row.

        Rows that share an index map (the CFG chunks of one image) are gathered once and broadcast
        to the forward's rows, which halves the writes under CFG. One timestep everywhere needs no
        gather at all: it broadcasts like the stock (B', C) embedding.
        """
        rows = self._rows
        per_row = out_tab.ndim == 3
        distinct = out_tab.shape[0] if per_row and u_major else out_tab.shape[-2]
        if distinct == 1:
            if per_row:
                return (out_tab[0] if u_major else out_tab[:, 0])[:, :, None, None]  # (B', C, 1, 1)
            return out_tab[0, :, None, None].expand(rows, -1, -1, -1)
        h, w = size
        channels = out_tab.shape[-1]
        tables = distinct if per_row else 1
        idx = self._block_index(block, size, out_tab.device, tables)
        if not per_row:  # one table: gather once per image, broadcast to the CFG chunks
            by_channel = out_tab.t()  # (C, U), a strided view of the small table
        else:  # SDXL label / emb_patch: every row has its own table, (C, B' * U) row-major in (B', U)
            by_channel = out_tab.permute(2, 1, 0) if u_major else out_tab.permute(2, 0, 1)
            by_channel = by_channel.reshape(channels, -1)
        picked = self._gather(by_channel, idx, h, w)
        if picked.shape[0] in (1, rows):  # one image: broadcasts over the CFG chunks in `h + emb`
            return picked
        return picked.repeat(rows // picked.shape[0], 1, 1, 1)

    @staticmethod
    def _gather(by_channel: torch.Tensor, idx: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """by_channel (C, V), idx (R * h * w,) -> (R, C, h, w), each (h, w) plane contiguous.

        One index_select along V writes every channel's pixels in (R, h, w) order: for one image
        that is NCHW exactly, for more the images' planes interleave by channel, read as (R, C, h,
        w) through strides. Either way the ResBlock's `h + emb` keeps its NCHW layout. Two ops per
        block on top of the table's transposed view; exact (a copy, unlike a one-hot matmul under TF32).
        """
        channels = by_channel.shape[0]
        picked = by_channel.index_select(1, idx)  # (C, R * h * w)
        rows = idx.numel() // (h * w)
        if rows == 1:
            return picked.view(1, channels, h, w)
        return picked.as_strided((rows, channels, h, w), (h * w, rows * h * w, w, 1))

    # ------------------------------------------------------------------------------- helpers
    def _clear_map(self) -> None:
        super()._clear_map()
        self._base_cache: dict[tuple, torch.Tensor] = {}
        self._fused_rows: int | None = None  # carrier rows of the time MLP call that also carries the table
        self._own_call = False  # the table's own time MLP call (not to be fused)
        self._emb_is_table = True  # this forward's time MLP output may be the table itself
        self._emb_table = False  # ... and is: the ResBlocks' emb is the (U, E) or (U, B', E) table
        self._table: torch.Tensor | None = None
        self._label: torch.Tensor | None = None
        self._emb_patches: list = []
        self._options: dict = {}
        self._x_dtype: torch.dtype = torch.float32
        self._fired: list[int] = [0] * len(getattr(self, "blocks", []))
        self._sizes: list[Any] = [None] * len(getattr(self, "blocks", []))
