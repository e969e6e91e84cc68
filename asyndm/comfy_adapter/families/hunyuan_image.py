"""Give ComfyUI's HunyuanImage 2.1 transformer one timestep per image token (the Flux adapter's hooks).

HunyuanImage 2.1 runs ComfyUI's HunyuanVideo class on 2-D latents (64 channels, 1x1 patches): Flux's
double and single blocks with the image first ([image, text] in every attention), ``vec =
time_in(emb(t)) (+ vector_in(y)) (+ guidance_in(emb(g)))`` with t embedded unscaled (the model's
timesteps are already 0..1000), and a text path of its own: the TokenRefiner (``txt_in``) refines
the Qwen2.5-VL tokens with the scalar t, and ByT5 glyph tokens for quoted text are appended after
them. The Flux adapter's per-token rows serve it unchanged, with the image first in the single
blocks; the TokenRefiner keeps the scalar (background) timestep, as the text does everywhere.

Refused by name: the distilled (meanflow) model, whose ``time_r_in`` embeds the step's target
timestep (one per token would be the next timestep of each token, which the model does not
take), and HunyuanVideo's video / image-to-video inputs.

Key words: the Qwen2.5-VL tokens as the text encoder keeps them (its chat template cut at the
user turn, as ComfyUI's encode_token_weights does). A BPE word tokenizes differently alone than
inside the prompt (" rabbit" vs "rabbit"), so the words' token ids are read off the prompt's own
tokens, decoded with the tokenizer ComfyUI ships (comfy/text_encoders/qwen25_tokenizer).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from comfy.ldm.flux.layers import ModulationOut

from ..errors import SUPPORTED_FAMILIES, UnsupportedModelError
from ..tokens import Segment, TokenStream
from .base import TimeHooks
from .flux import PerTokenTimesteps

__all__ = ["PerTokenTimestepsHunyuanImage", "adapter_for", "template_end"]

QWEN_STREAM = "qwen25_7b"  # HunyuanImageTokenizer's Qwen2.5-VL stream
WORDS_STREAM = "qwen25_7b:in-prompt"  # the same tokens, each word's ids read in the prompt (added by text_layout)
IM_START, IM_END, USER, NEWLINE, LESS_THAN = 151644, 151645, 872, 198, 27
_WORD = re.compile(r"[\w'-]+", re.UNICODE)  # what tokens.split_words calls a word


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"per-token timesteps are not supported for {what}. Supported: {SUPPORTED_FAMILIES}.")


def adapter_for(diffusion_model: torch.nn.Module) -> PerTokenTimestepsHunyuanImage | None:
    """The HunyuanImage 2.1 adapter for ComfyUI's HunyuanVideo class on images; its other uses are refused by name."""
    from comfy.ldm.hunyuan_video.model import HunyuanVideo

    if type(diffusion_model) is not HunyuanVideo:
        return None
    dm = diffusion_model
    if len(dm.patch_size) != 2:
        raise _unsupported("HunyuanVideo (video: 3-D patches)")
    if getattr(dm, "time_r_in", None) is not None:
        raise _unsupported("HunyuanImage 2.1 distilled (meanflow: its time_r_in embeds each step's target timestep, "
                           "which per token would be every token's own next timestep)")
    if getattr(dm, "cond_type_embedding", None) is not None or getattr(dm, "vision_in", None) is not None:
        raise _unsupported("HunyuanVideo 1.5")
    return PerTokenTimestepsHunyuanImage(dm)


def template_end(ids: list[int]) -> int:
    """How many leading Qwen tokens HunyuanImage's text encoder drops (comfy.text_encoders.hunyuan_image /
    qwen_image encode_token_weights): the chat template up to the user turn's first token."""
    if ids and ids[0] == LESS_THAN and len(ids) > 36:  # the refiner's plain-text template
        return 36
    end = -1
    starts = [i for i, v in enumerate(ids) if v == IM_START][:2]
    if starts:
        end = starts[-1]
    if len(ids) > end + 3 and ids[end + 1] == USER and ids[end + 2] == NEWLINE:
        end += 3
    return end if end >= 0 else len(ids) - 1  # no template: ComfyUI keeps out[:, -1:]


def _qwen_tokenizer() -> Any:
    """The tree's Qwen2.5-VL tokenizer (loaded per run: the pack keeps no state between prompts)."""
    import comfy.text_encoders.qwen_image

    return comfy.text_encoders.qwen_image.Qwen25_7BVLITokenizer().tokenizer


def words_in_prompt(ids: list[int], start: int, decode: Any) -> dict[str, list[int]]:
    """Each word's token ids as they stand in the prompt (first occurrence): the tokens ``ids[start:]``
    (up to the closing <|im_end|>) decoded prefix by prefix give every token's character span, and
    a word takes the tokens that overlap it."""
    stop = ids.index(IM_END, start) if IM_END in ids[start:] else len(ids)
    spans, before = [], ""
    for k in range(start, stop):
        text = decode(ids[start:k + 1])
        spans.append((len(before), len(text)))
        before = text
    found: dict[str, list[int]] = {}
    for match in _WORD.finditer(before):
        word = match.group(0).lower()
        if word in found:
            continue
        tokens = [ids[start + k] for k, (a, b) in enumerate(spans) if a < match.end() and b > match.start()]
        if tokens:
            found[word] = tokens
    return found


class PerTokenTimestepsHunyuanImage(PerTokenTimesteps):
    """Context manager: while active and a map is set, HunyuanImage's image tokens each get their own timestep."""

    family = "HunyuanImage 2.1"
    time_factor = 1.0  # HunyuanVideo embeds the model's timestep (0..1000) as it is
    row_terms = ("vector", "guidance")  # vec = time_in(t) + vector_in(y), then + guidance_in(g)
    image_first = True  # its blocks run on [image, text]

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        dm = diffusion_model
        patch = [int(p) for p in dm.patch_size]
        if len(patch) != 2 or patch[0] != patch[1]:
            raise _unsupported(f"HunyuanVideo with {patch} patches")
        doubles, singles = list(dm.double_blocks), list(dm.single_blocks)
        if not all(getattr(b, "modulation", False) for b in doubles) or not all(
                getattr(b, "modulation", None) is not None for b in singles):
            raise _unsupported("HunyuanVideo blocks without their own modulation")
        self.model = dm
        self.patch_size = patch[0]
        self.img_mods = [b.img_mod for b in doubles]
        self.single_mods = [b.modulation for b in singles]
        self.final_mod = dm.final_layer.adaLN_modulation
        TimeHooks.__init__(self)

    def text_layout(self, tokens: Any) -> list[str | Segment] | None:
        """The Qwen2.5-VL tokens after the template (the ByT5 glyph tokens come after them in the model,
        from their own conditioning)."""
        stream = tokens.streams.get(QWEN_STREAM)
        if stream is None:
            return [QWEN_STREAM]  # PromptTokens names the tokenizers the prompt was encoded with
        ids = [t for chunk in stream.chunks for t in chunk]
        drop = template_end(ids)
        if WORDS_STREAM not in tokens.streams:
            decode = _qwen_tokenizer().decode
            tokens.streams[WORDS_STREAM] = TokenStream(stream.chunks, words_in_prompt(ids, drop, decode))
        return [Segment(WORDS_STREAM, drop_front=drop)]

    def _model_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        super()._model_pre(module, args, kwargs)
        x = args[0] if args else kwargs["x"]
        text, image, hw = self.forward_tokens or (0, 0, (0, 0))
        byt5 = kwargs.get("txt_byt5")
        if torch.is_tensor(byt5) and byt5.ndim == 3 and self.model.byt5_in is not None:
            text += int(byt5.shape[1])  # ByT5 glyph tokens follow the Qwen tokens in the text stream
        self.forward_tokens = (text, image, hw)
        if self._inverse is None:
            return
        for name, what in (("guiding_frame_index", "HunyuanVideo image-to-video (a guiding frame)"),
                           ("ref_latent", "HunyuanVideo with a reference latent"),
                           ("clip_fea", "HunyuanVideo 1.5 image-to-video (vision tokens)")):
            if kwargs.get(name) is not None:
                raise _unsupported(what)
        if x.ndim != 4:
            raise _unsupported("HunyuanVideo on video latents")
        self._image_tokens = math.ceil(x.shape[-2] / self.patch_size) * math.ceil(x.shape[-1] / self.patch_size)

    def _single_post(self, i: int) -> Any:
        """HunyuanImage's single blocks run on [image, text]: per-token rows first, then the stock row."""
        def hook(module: torch.nn.Module, _args: tuple, output: Any) -> Any:
            if self._inverse is None or not self._in_forward:
                return None
            assert self._lengths is not None
            txt, _, refs = self._lengths
            if refs:
                raise RuntimeError(f"{type(self).__name__}: {refs} tokens beyond the image in the image stream")
            stock = torch.cat([output[0].shift, output[0].scale, output[0].gate], dim=-1)  # (B', 1, 3D)
            pieces = [self._modulated(module, i), stock.expand(-1, txt, -1)]
            return ModulationOut(*torch.cat(pieces, dim=1).chunk(3, dim=-1)), None
        return hook
