"""Find the context columns of key words in a prompt, with the model's own tokenizers.

The paper typed token positions by hand. We tokenize the prompt and every word of it with the
CLIP object's tokenizer when the prompt is encoded, and keep word -> token ids in the
conditioning for every tokenizer stream the CLIP has ("l" and "g" for CLIP-L/G, "t5xxl" for T5),
so the sampler can later locate key words (a word may be several tokens) without holding the CLIP
model. Which streams make up the conditioning's context, in which order, depends on the model
family (a UNet reads CLIP; Flux reads T5; SD3 reads CLIP then T5): the family adapter says so with
a layout, a list of stream names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PromptTokens", "Segment", "TokenStream", "prompt_tokens", "split_words", "KEY", "UnknownWordError"]

KEY = "asyndm_prompt_tokens"  # where the conditioning dict keeps a PromptTokens
_WORD = re.compile(r"[\w'-]+", re.UNICODE)
# (CLIP model attribute, its tokenizer stream)
ENCODERS = (("clip_l", "l"), ("clip_g", "g"), ("t5xxl", "t5xxl"), ("llama", "llama"))
# What Lumina 2's text node writes between the system prompt and the prompt (CLIPTextEncodeLumina2)
SYSTEM_PROMPT_END = "<Prompt Start>"


class UnknownWordError(ValueError):
    """A key word that is not in the prompt."""


def split_words(text: str) -> list[str]:
    """The prompt's words (letters, digits, ' and -), lower-cased, in order."""
    return [w.lower() for w in _WORD.findall(text)]


@dataclass
class TokenStream:
    """One tokenizer's view of a prompt: token ids per chunk (77 for CLIP, one chunk for T5) and each word's ids."""

    chunks: list[list[int]]
    word_ids: dict[str, list[int]] = field(default_factory=dict)
    # a word's ids after another word, where a BPE tokenizer (Llama, Qwen) spells it with its leading
    # space (" rabbit"), unlike the word alone (the prompt's first word); only where they differ
    inner_ids: dict[str, list[int]] = field(default_factory=dict)
    # the first token after SYSTEM_PROMPT_END where the text has it (a system prompt typed before the prompt)
    prompt_from: int = 0

    @property
    def length(self) -> int:
        """How many context columns this stream fills (all chunks, padding included)."""
        return sum(len(chunk) for chunk in self.chunks)

    def find(self, words: Sequence[str], begin: int = 0) -> list[int] | None:
        """Columns of the words' tokens, consecutive, first occurrence at or after ``begin``; None if absent."""
        if any(w not in self.word_ids for w in words):
            return None
        spellings = [[t for w in words for t in self.word_ids[w]]]
        if any(w in self.inner_ids for w in words):  # inside the prompt: every word after a space
            spellings.append([t for w in words for t in self.inner_ids.get(w, self.word_ids[w])])
            first, *rest = words  # or the phrase opens the prompt: its first word alone
            spellings.append(self.word_ids[first] + [t for w in rest for t in self.inner_ids.get(w, self.word_ids[w])])
        found = [cols for needle in spellings if (cols := self._first(needle, begin)) is not None]
        return min(found) if found else None

    def _first(self, needle: list[int], begin: int) -> list[int] | None:
        offset = 0
        for chunk in self.chunks:
            for start in range(max(begin - offset, 0), len(chunk) - len(needle) + 1):
                if chunk[start : start + len(needle)] == needle:
                    return [offset + start + j for j in range(len(needle))]
            offset += len(chunk)
        return None


@dataclass(frozen=True)
class Segment:
    """How one tokenizer stream lands in a model's text context.

    ``drop_front`` tokens of the stream are not in the context (a chat template the encoder trims),
    ``pad_front`` columns come before the stream's tokens (left padding, or registers the model
    prepends), and at most ``keep`` tokens remain (None: all). Words are looked for from token
    ``search_from`` of the stream on (a system prompt the user typed before the prompt is in the
    context, but its words are not the key items). ``in_context`` False: the tokens
    reach the model through another conditioning tensor (HiDream's Llama layers), appended after
    the context in the attention sequence, so they do not count in the context's length.
    """

    stream: str
    drop_front: int = 0
    pad_front: int = 0
    keep: int | None = None
    in_context: bool = True
    search_from: int = 0

    def kept(self, stream: TokenStream) -> int:
        rest = max(stream.length - self.drop_front, 0)
        return rest if self.keep is None else min(rest, self.keep)

    def width(self, stream: TokenStream) -> int:
        """Context columns this segment fills."""
        return self.pad_front + self.kept(stream)


class PromptTokens:
    """A prompt's token ids per tokenizer stream, the ids of each of its words, and the loaded encoders.

    ``chunks`` / ``word_ids`` are the default stream (the first by name: what a UNet's context holds);
    ``streams`` has all of them; ``encoders`` the streams whose encoder the CLIP had loaded (None: unknown).
    """

    def __init__(self, text: str, chunks: list[list[int]], word_ids: dict[str, list[int]], *,
                 streams: dict[str, TokenStream] | None = None, encoders: tuple[str, ...] | None = None) -> None:
        self.text = text
        self.chunks = chunks
        self.word_ids = word_ids
        self.words = split_words(text)
        self.streams = streams if streams is not None else {"": TokenStream(chunks, word_ids)}
        self.default_stream = sorted(self.streams)[0]
        self.encoders = encoders

    def _layout(self, layout: Sequence[str | Segment] | None) -> list[Segment]:
        segments = [Segment(self.default_stream)] if layout is None else [
            item if isinstance(item, Segment) else Segment(item) for item in layout]
        names = [seg.stream for seg in segments]
        missing = [name for name in names if name not in self.streams]
        if missing or not names:
            raise ValueError(
                f"the prompt was encoded with a CLIP whose tokenizers are {', '.join(sorted(self.streams))}, but this "
                f"model reads {', '.join(names) or 'none'}: encode it with the text encoders this model uses"
            )
        return segments

    def context_length(self, layout: Sequence[str | Segment] | None = None) -> int:
        """The context columns the streams of this layout fill, in order."""
        return sum(seg.width(self.streams[seg.stream]) for seg in self._layout(layout) if seg.in_context)

    def columns(self, phrase: str, layout: Sequence[str | Segment] | None = None) -> list[int]:
        """Context columns of a key word or phrase (all its tokens, first occurrence in every stream of
        the layout, each stream's columns offset by the segments before it)."""
        words = split_words(phrase)
        if not words:
            raise UnknownWordError("a key word is empty: give words of the prompt separated by commas")
        segments = self._layout(layout)
        listing = ", ".join(dict.fromkeys(self.words))
        if any(w not in self.word_ids and all(w not in self.streams[seg.stream].word_ids for seg in segments)
               for w in words):
            raise UnknownWordError(f"key word {phrase!r} is not in the prompt; its words are: {listing}")
        found: list[int] = []
        offset = 0
        for seg in segments:
            stream = self.streams[seg.stream]
            cols = stream.find(words, begin=max(seg.drop_front, seg.search_from))
            if cols is not None and cols[-1] < seg.drop_front + seg.kept(stream):
                found += [offset + seg.pad_front + c - seg.drop_front for c in cols]
            offset += seg.width(stream)
        if not found:
            raise UnknownWordError(
                f"key word {phrase!r} was not found as consecutive tokens of the prompt; its words are: {listing}"
            )
        return found


def _streams(tokenized: dict) -> dict[str, list[list[int]]]:
    """Token ids per chunk for every stream of a clip.tokenize output."""
    return {name: [[int(t[0]) for t in chunk] for chunk in chunks] for name, chunks in tokenized.items()}


def _unpadded(ids: list[int], pad: int) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] == pad:
        end -= 1
    return ids[:end]


def _body(ids: list[int], empty: list[int]) -> list[int]:
    """A word's own tokens: its tokenization less what the empty prompt's has in front (start token, a
    chat template's beginning) and behind (end token, the template's end), padding dropped first.

    By position, not by value: a word that the template also holds (Qwen-Image's system prompt has
    "image", "background", ...) keeps its tokens."""
    if empty:
        pad = empty[-1]
        ids, empty = _unpadded(ids, pad), _unpadded(empty, pad)
    start = 0
    while start < min(len(ids), len(empty)) and ids[start] == empty[start]:
        start += 1
    tail = 0
    while tail < min(len(ids), len(empty)) - start and ids[-1 - tail] == empty[-1 - tail]:
        tail += 1
    return ids[start:len(ids) - tail]


def loaded_encoders(clip: Any) -> tuple[str, ...] | None:
    """The streams whose text encoder the CLIP object holds (SD3 may run without T5 or CLIP-G)."""
    model = getattr(clip, "cond_stage_model", None)
    if model is None:
        return None
    return tuple(stream for attr, stream in ENCODERS if getattr(model, attr, None) is not None)


def prompt_tokens(clip: Any, text: str) -> PromptTokens:
    """Tokenize the prompt and each of its words with every tokenizer of the CLIP object."""
    chunks = _streams(clip.tokenize(text))
    empty = {name: ids[0] for name, ids in _streams(clip.tokenize("")).items()}  # start, end, template, padding
    spelled: dict[str, str] = {}  # each word (lower-cased) as the prompt first spells it: T5, Qwen, Gemma are case-sensitive
    for match in _WORD.findall(text):
        spelled.setdefault(match.lower(), match)
    words = list(spelled)
    word_ids: dict[str, dict[str, list[int]]] = {name: {} for name in chunks}
    inner_ids: dict[str, dict[str, list[int]]] = {name: {} for name in chunks}
    lead = {name: _body(ids[0], empty.get(name, [])) for name, ids in _streams(clip.tokenize("x")).items()}
    for word in words:
        alone = _streams(clip.tokenize(spelled[word]))
        after = _streams(clip.tokenize("x " + spelled[word]))
        for name, ids in alone.items():
            body = _body(ids[0], empty.get(name, []))
            if body and name in word_ids:
                word_ids[name][word] = body
                inner = _body(after.get(name, [[]])[0], empty.get(name, []))
                head = lead.get(name, [])
                if inner[:len(head)] == head and inner[len(head):] and inner[len(head):] != body:
                    inner_ids[name][word] = inner[len(head):]
    streams = {name: TokenStream(chunks[name], word_ids[name], inner_ids[name]) for name in chunks}
    end = text.find(SYSTEM_PROMPT_END)
    if end >= 0:  # the tokens up to the marker: the empty prompt's head, then the system prompt's body
        for name, ids in _streams(clip.tokenize(text[:end + len(SYSTEM_PROMPT_END)])).items():
            empty_ids = empty.get(name, [])
            head = 0
            while head < min(len(ids[0]), len(empty_ids)) and ids[0][head] == empty_ids[head]:
                head += 1
            if name in streams:
                streams[name].prompt_from = head + len(_body(ids[0], empty_ids))
    first = sorted(streams)[0]
    return PromptTokens(text, streams[first].chunks, streams[first].word_ids, streams=streams,
                        encoders=loaded_encoders(clip))
