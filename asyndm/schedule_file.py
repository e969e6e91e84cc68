"""Schedule files: a ScheduleTable stored as safetensors (never pickle), validated on load.

Format "asyndm-schedule", version 1:
  tensors   progress (P,) float, timesteps (L, P) float, priorities (L,) float
  metadata  format = "asyndm-schedule", format_version = "1", curve, fitted_steps, description
Every problem is reported as ScheduleFileError (a ValueError) naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .schedule_table import ScheduleTable

__all__ = ["ScheduleFileError", "save_schedule", "load_schedule", "FORMAT", "FORMAT_VERSION", "MAX_FILE_BYTES"]

FORMAT = "asyndm-schedule"
FORMAT_VERSION = "1"
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
TENSORS = ("progress", "timesteps", "priorities")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


class ScheduleFileError(ValueError):
    """A schedule file that cannot be used, with the reason."""


def save_schedule(table: ScheduleTable, path: str | os.PathLike[str]) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written schedule."""
    path = Path(path)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "curve": str(table.curve),
        "fitted_steps": str(int(table.fitted_steps)),
        "description": str(table.description),
    }
    tensors = {
        "progress": table.progress.detach().to(torch.float32).contiguous().cpu(),
        "timesteps": table.timesteps.detach().to(torch.float32).contiguous().cpu(),
        "priorities": table.priorities.detach().to(torch.float32).contiguous().cpu(),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _read_header(path: Path) -> dict[str, Any]:
    """Parse the safetensors header ourselves first, so absurd sizes are refused before any read."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ScheduleFileError(f"{path.name}: {size} bytes is too large for a schedule file (limit {MAX_FILE_BYTES})")
    if size < 8:
        raise ScheduleFileError(f"{path.name}: not a safetensors file (only {size} bytes)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise ScheduleFileError(f"{path.name}: corrupt or truncated safetensors header (claims {header_len} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not text, or nested too deep to parse
        raise ScheduleFileError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ScheduleFileError(f"{path.name}: corrupt safetensors header")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2:
            raise ScheduleFileError(f"{path.name}: tensor {name!r} has a corrupt header entry")
        start, end = info["data_offsets"]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise ScheduleFileError(f"{path.name}: tensor {name!r} points outside the file (truncated file?)")
    return header


def load_schedule(path: str | os.PathLike[str]) -> ScheduleTable:
    """Read and validate a schedule file; raise ScheduleFileError with the reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleFileError(f"schedule file {str(path)!r} does not exist")
    try:
        header = _read_header(path)
    except OSError as e:  # permissions, a folder named like a file, a disk error
        raise ScheduleFileError(f"{path.name}: cannot be read ({e.strerror or e}); check the file's permissions") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ScheduleFileError(f"{path.name}: corrupt safetensors header (__metadata__ is not a mapping)")
    if meta.get("format") != FORMAT:
        raise ScheduleFileError(
            f"{path.name}: not an AsynDM schedule (metadata format is {meta.get('format')!r}, expected {FORMAT!r}); "
            "save schedules with the 'Save Schedule (AsynDM)' node"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ScheduleFileError(
            f"{path.name}: schedule format version {meta.get('format_version')!r} is not supported "
            f"(this pack reads version {FORMAT_VERSION}); update the pack"
        )
    names = sorted(k for k in header if k != "__metadata__")
    if names != sorted(TENSORS):
        raise ScheduleFileError(f"{path.name}: expected exactly the tensors {', '.join(TENSORS)}, found {', '.join(names) or 'none'}")
    for name in TENSORS:
        info = header[name]
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
            raise ScheduleFileError(f"{path.name}: tensor {name!r} has dtype {info.get('dtype')!r}, expected a float type")
        shape = info.get("shape")
        if not isinstance(shape, list) or any(not isinstance(d, int) or d < 0 or d > 100_000 for d in shape):
            raise ScheduleFileError(f"{path.name}: tensor {name!r} has an absurd shape {shape!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name).to(torch.float32) for name in TENSORS}
    except Exception as e:  # safetensors raises its own error types for corrupt data, and OSError
        raise ScheduleFileError(f"{path.name}: unreadable safetensors data ({e})") from None
    try:
        fitted = int(meta.get("fitted_steps", "0"))
    except ValueError:
        raise ScheduleFileError(f"{path.name}: metadata fitted_steps must be a whole number") from None
    try:
        return ScheduleTable(progress=tensors["progress"], timesteps=tensors["timesteps"],
                             priorities=tensors["priorities"], curve=str(meta.get("curve", "learned"))[:64],
                             fitted_steps=fitted, description=str(meta.get("description", ""))[:2000])
    except ValueError as e:
        raise ScheduleFileError(f"{path.name}: {e}") from None
