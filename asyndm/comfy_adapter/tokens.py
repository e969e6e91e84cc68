"""Find the token columns of key words in a prompt, with the model's own tokenizer.

The paper typed token positions by hand. We tokenize the prompt and every word of it with the
CLIP object's tokenizer when the prompt is encoded, and keep word -> token ids in the
conditioning, so the sampler can later locate key words (a word may be several tokens) without
holding the CLIP model.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["PromptTokens", "prompt_tokens", "split_words", "KEY", "UnknownWordError"]

KEY = "asyndm_prompt_tokens"  # where the conditioning dict keeps a PromptTokens
_WORD = re.compile(r"[\w'-]+", re.UNICODE)


class UnknownWordError(ValueError):
    """A key word that is not in the prompt."""


def split_words(text: str) -> list[str]:
    """The prompt's words (letters, digits, ' and -), lower-cased, in order."""
    return [w.lower() for w in _WORD.findall(text)]


def _ids(tokenized: dict) -> list[list[int]]:
    """Token ids per 77-token chunk from clip.tokenize output (first encoder's stream)."""
    stream = tokenized[sorted(tokenized.keys())[0]]
    return [[int(t[0]) for t in chunk] for chunk in stream]


class PromptTokens:
    """A prompt's token ids per chunk, and the token ids of each of its words."""

    def __init__(self, text: str, chunks: list[list[int]], word_ids: dict[str, list[int]]) -> None:
        self.text = text
        self.chunks = chunks
        self.word_ids = word_ids
        self.words = split_words(text)

    def columns(self, phrase: str) -> list[int]:
        """Context columns of a key word or phrase (all its tokens), first occurrence."""
        words = split_words(phrase)
        if not words:
            raise UnknownWordError("a key word is empty: give words of the prompt separated by commas")
        missing = [w for w in words if w not in self.word_ids]
        if missing:
            raise UnknownWordError(
                f"key word {phrase!r} is not in the prompt; its words are: {', '.join(dict.fromkeys(self.words))}"
            )
        needle = [t for w in words for t in self.word_ids[w]]
        offset = 0
        for chunk in self.chunks:
            for start in range(len(chunk) - len(needle) + 1):
                if chunk[start : start + len(needle)] == needle:
                    return [offset + start + j for j in range(len(needle))]
            offset += len(chunk)
        raise UnknownWordError(
            f"key word {phrase!r} was not found as consecutive tokens of the prompt; "
            f"its words are: {', '.join(dict.fromkeys(self.words))}"
        )


def prompt_tokens(clip: Any, text: str) -> PromptTokens:
    """Tokenize the prompt and each of its words with the CLIP object's tokenizer."""
    chunks = _ids(clip.tokenize(text))
    empty = _ids(clip.tokenize(""))[0]
    start, end = empty[0], empty[1]
    word_ids: dict[str, list[int]] = {}
    for word in dict.fromkeys(split_words(text)):
        ids = _ids(clip.tokenize(word))[0]
        body = ids[1:] if ids and ids[0] == start else ids
        if end in body:
            body = body[: body.index(end)]
        if body:
            word_ids[word] = body
    return PromptTokens(text, chunks, word_ids)
