"""One switch of the pack, on and off, compared in one process: the pack's pieces of each setting.

Between runs of one benchmark the machine drifts by more than most single changes are worth (a few tenths of a
percent of KSampler's run). So a change is judged here the way the issue-18 rounds judged theirs: one loaded model, one
case, the switch (a class or module attribute, such as ``AsynSampler.pixel_steps``) set to each of two values in
alternating profiled runs (on, off, off, on, ...), KSampler's run profiled between the pairs, and the medians
compared. Used by ``benchmarks/switch_ab.py``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from statistics import median
from typing import Any

from .report import FAMILY_ROWS, pack_pieces_ms

__all__ = ["compare", "markdown", "parse_value", "resolve_switch"]


def resolve_switch(target: str) -> tuple[Any, str]:
    """'package.module:Class.attribute' (or 'package.module:attribute') -> (the object holding it, its name)."""
    module_name, sep, path = target.partition(":")
    if not sep or not path:
        raise ValueError(f"switch {target!r}: write it as package.module:Class.attribute")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    if not hasattr(owner, name):
        raise ValueError(f"switch {target!r}: {owner!r} has no attribute {name!r}")
    return owner, name


def parse_value(text: str) -> Any:
    """A switch value from the command line: JSON (true, false, 3, 0.5, null, "text"); else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def compare(bench: Any, family: str, owner: Any, name: str, values: Sequence[Any], variants: Sequence[str],
            pairs: int, device: str = "cpu", warmup: int = 1) -> dict[str, Any]:
    """Profile each variant with the switch at each value, `pairs` times, alternating the order every pair; KSampler
    once per pair. Returns {"ksampler": [profiles], (variant, index of the value): [profiles]}. The switch is
    restored afterwards, errors included."""
    rows = FAMILY_ROWS[family]
    before = getattr(owner, name)
    own = name in vars(owner)
    runs: dict[Any, list[dict[str, float]]] = {"ksampler": []}
    runs.update({(v, k): [] for v in variants for k in range(len(values))})
    try:
        for _ in range(warmup):
            for v in ("ksampler", *variants):
                rows.profile_variant(bench, v, device, 1)
        for p in range(pairs):
            runs["ksampler"].append(rows.profile_variant(bench, "ksampler", device, 1))
            order = range(len(values)) if p % 2 == 0 else range(len(values) - 1, -1, -1)
            for v in variants:
                for k in order:
                    setattr(owner, name, values[k])
                    runs[(v, k)].append(rows.profile_variant(bench, v, device, 1))
    finally:
        if own:
            setattr(owner, name, before)
        else:
            delattr(owner, name)
    return runs


def markdown(runs: dict[Any, list[dict[str, float]]], switch: str, values: Sequence[Any], variants: Sequence[str],
             watch: Sequence[str], family: str) -> str:
    """A table: per variant and value, the median of the pack's pieces (ms and % of KSampler's median run) and of
    each watched piece (labels containing the given text); first KSampler's own watched pieces (such as the UNet's
    compute, which the pack's pieces do not count but a change of the pack can move)."""
    rows_module = FAMILY_ROWS[family]
    ks = runs["ksampler"]
    labels = {label for profile in ks for label in profile}
    baseline = {label: median(p.get(label, 0.0) for p in ks) for label in labels}
    total = baseline["total"]

    def piece(profiles: list[dict[str, float]], text: str) -> float:
        return median(sum(v for k, v in p.items() if text in k) for p in profiles)

    head = ["variant", switch, "pack's pieces, ms", "% of KSampler", *watch]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # KSampler's own watched pieces (the UNet's rows above all): what the pack's rows compare with
    lines.append("| " + " | ".join(["ksampler", "-", "-", "-", *(f"{piece(ks, text):.2f}" for text in watch)]) + " |")
    for v in variants:
        for k, value in enumerate(values):
            profiles = runs[(v, k)]
            pack = median(pack_pieces_ms(p, baseline, rows_module) for p in profiles)
            cells = [v, json.dumps(value), f"{pack:.2f}", f"{100 * pack / total:.2f}%",
                     *(f"{piece(profiles, text):.2f}" for text in watch)]
            lines.append("| " + " | ".join(cells) + " |")
    pairs = len(ks)
    lines.append("")
    lines.append(f"Medians of {pairs} profiled runs per row, alternating; KSampler's run {total:.1f} ms (median of "
                 f"{pairs}, one per pair). Pieces in ms per run.")
    return "\n".join(lines)
