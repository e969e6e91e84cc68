"""Key words are located with the model's own tokenizer."""

from __future__ import annotations

import pytest

from asyndm.comfy_adapter.tokens import UnknownWordError, prompt_tokens, split_words


def test_words_map_to_their_token_columns(sd15_checkpoint) -> None:
    clip = sd15_checkpoint[1]
    toks = prompt_tokens(clip, "a rabbit playing basketball")
    # BOS, a, rabbit, playing, basketball: columns are word index + 1 for single-token words
    assert toks.columns("rabbit") == [2]
    assert toks.columns("basketball") == [4]
    assert toks.columns("Rabbit") == [2]  # case does not matter


def test_multi_token_words_and_phrases(sd15_checkpoint) -> None:
    clip = sd15_checkpoint[1]
    text = "an axolotl next to a teddy bear"
    toks = prompt_tokens(clip, text)
    ids = toks.word_ids["axolotl"]
    assert len(ids) > 1, "axolotl should be several BPE tokens"
    cols = toks.columns("axolotl")
    assert cols == list(range(2, 2 + len(ids)))
    assert [toks.chunks[0][c] for c in cols] == ids
    bear = toks.columns("teddy bear")
    assert len(bear) == 2 and bear[1] == bear[0] + 1


def test_words_in_a_second_77_token_chunk(sd15_checkpoint) -> None:
    clip = sd15_checkpoint[1]
    text = " ".join(["red"] * 80) + " giraffe"
    toks = prompt_tokens(clip, text)
    assert len(toks.chunks) == 2
    col = toks.columns("giraffe")[0]
    assert col >= 77 and toks.chunks[1][col - 77] == toks.word_ids["giraffe"][0]


def test_unknown_word_lists_the_prompt_words(sd15_checkpoint) -> None:
    toks = prompt_tokens(sd15_checkpoint[1], "a rabbit playing basketball")
    with pytest.raises(UnknownWordError, match="rabbit, playing, basketball"):
        toks.columns("giraffe")
    with pytest.raises(UnknownWordError, match="empty"):
        toks.columns("  ")


def test_split_words() -> None:
    assert split_words("A cat's toy, (big:1.2) ball!") == ["a", "cat's", "toy", "big", "1", "2", "ball"]
