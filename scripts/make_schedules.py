#!/usr/bin/env python3
"""Write the schedule files shipped with the pack: the paper's three curve families, tabulated.

    python scripts/make_schedules.py [--out DIR] [--check]

DIR (default: the pack's schedules/ folder) receives

    asyndm-bin-k0.7.safetensors   quadratic ("bin") curve, k = 0.7
    asyndm-lin-k0.7.safetensors   piecewise-linear ("lin") curve, k = 0.7
    asyndm-exp-k0.7.safetensors   exponential ("exp") curve, k = 0.7

each asyndm.schedule_table.table_from_curve(curve, [0.7], num_steps=50) (one level, 51 progress
points: the normalized timestep after each of 50 steps, as method.md's curves give it from 1001
towards the offset 1), written with asyndm.schedule_file.save_schedule, header keys then sorted.
The bytes are a pure function of the code (no randomness, no time stamps). A file that already loads equal to what would be written is
left alone, so running the script again changes nothing; --check only compares and exits 1 when a
file is missing or differs.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from asyndm.schedule_file import ScheduleFileError, load_schedule, save_schedule  # noqa: E402
from asyndm.schedule_table import ScheduleTable, table_from_curve  # noqa: E402

CURVES = ("bin", "lin", "exp")
K = 0.7
STEPS = 50
NAMES = {
    "bin": "quadratic 'bin' curve (the paper's default)",
    "lin": "piecewise-linear 'lin' curve",
    "exp": "exponential 'exp' curve",
}


def filename(curve: str) -> str:
    return f"asyndm-{curve}-k{K:g}.safetensors"


def shipped_table(curve: str) -> ScheduleTable:
    description = (
        f"AsynDM {NAMES[curve]} from arXiv 2510.04504 at priority k = {K:g}, tabulated for {STEPS} steps "
        f"(T = 1000, offset 1): normalized timestep of a key-object pixel after each step. "
        f"Made by scripts/make_schedules.py."
    )
    return table_from_curve(curve, [K], num_steps=STEPS, description=description)


def canonicalize(path: Path) -> None:
    """Rewrite the safetensors header with sorted keys: safetensors writes its metadata in hash
    order, which changes from run to run; sorted, the file's bytes are reproducible."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    os.replace(tmp, path)


def same(a: ScheduleTable, b: ScheduleTable) -> bool:
    return (
        torch.equal(a.progress, b.progress)
        and torch.equal(a.timesteps, b.timesteps)
        and torch.equal(a.priorities, b.priorities)
        and (a.curve, a.fitted_steps, a.description) == (b.curve, b.fitted_steps, b.description)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "schedules", help="folder to write to")
    parser.add_argument("--check", action="store_true", help="only verify the files; exit 1 if any differs")
    args = parser.parse_args(argv)
    out: Path = args.out
    if not args.check:
        out.mkdir(parents=True, exist_ok=True)
    status = 0
    for curve in CURVES:
        path = out / filename(curve)
        want = shipped_table(curve)
        try:
            current = load_schedule(path) if path.exists() else None
        except ScheduleFileError as e:
            print(f"{path}: unreadable ({e})")
            current = None
        if current is not None and same(current, want):
            print(f"{path}: up to date")
            continue
        if args.check:
            print(f"{path}: {'missing' if not path.exists() else 'differs'}")
            status = 1
            continue
        save_schedule(want, path)
        canonicalize(path)
        if not same(load_schedule(path), want):
            raise SystemExit(f"{path}: does not load back equal after writing")
        print(f"{path}: written")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
