"""Parse the key-word widget: "rabbit, basketball:0.9" -> words and a priority per word."""

from __future__ import annotations

__all__ = ["parse_key_words"]


def parse_key_words(text: str, default_k: float) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Comma-separated words or phrases, each optionally followed by ':k' (k in [0, 1])."""
    if not (0.0 <= default_k <= 1.0):
        raise ValueError(f"k must lie in [0, 1], got {default_k}")
    words: list[str] = []
    ks: list[float] = []
    parts = text.split(",")
    if parts and not parts[-1].strip():
        parts = parts[:-1]  # a trailing comma is harmless
    for raw in parts:
        item = raw.strip()
        if not item:
            raise ValueError(f"empty key word in {text!r}: separate words with single commas")
        k = default_k
        if ":" in item:
            word, _, value = item.rpartition(":")
            try:
                k = float(value)
            except ValueError:
                raise ValueError(f"key word {item!r}: the part after ':' must be a priority k in [0, 1]") from None
            if not (0.0 <= k <= 1.0):
                raise ValueError(f"key word {item!r}: priority k must lie in [0, 1], got {k}")
            item = word.strip()
            if not item:
                raise ValueError(f"key word {raw.strip()!r} has a priority but no word")
        words.append(item)
        ks.append(k)
    return tuple(words), tuple(ks)
