"""Parsing of the key-word widget."""

from __future__ import annotations

import pytest

from asyndm.keywords import parse_key_words


def test_words_and_priorities() -> None:
    assert parse_key_words("rabbit, basketball:0.9", 0.7) == (("rabbit", "basketball"), (0.7, 0.9))
    assert parse_key_words("teddy bear , ball", 0.5) == (("teddy bear", "ball"), (0.5, 0.5))
    assert parse_key_words("", 0.7) == ((), ())
    assert parse_key_words("rabbit,", 0.7) == (("rabbit",), (0.7,))


@pytest.mark.parametrize("text, match", [
    ("rabbit,,ball", "empty key word"),
    (" , ", "empty key word"),
    ("rabbit:1.5", "must lie in"),
    ("rabbit:high", "priority k"),
    (":0.5", "no word"),
])
def test_bad_key_words(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_key_words(text, 0.7)


def test_bad_default_k() -> None:
    with pytest.raises(ValueError, match="k must lie"):
        parse_key_words("rabbit", -0.1)
