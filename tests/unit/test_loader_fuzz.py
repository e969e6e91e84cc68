"""Fuzzing asyndm.schedule_file.load_schedule: whatever the file holds, the loader either returns a
valid ScheduleTable or raises ScheduleFileError (a ValueError naming the file and the problem), never
another exception, and it never hangs or reads a huge amount.

Bounded: the hypothesis runs are derandomized (the same examples every run, no example database
written into the checkout) and capped in examples and per-example time; the whole file runs in a
few seconds. The node-level name checks (paths that would leave the model folders) are tested
in-process in tests/server/test_hardening.py and through the server there.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from asyndm.schedule_file import FORMAT, FORMAT_VERSION, ScheduleFileError, load_schedule, save_schedule
from asyndm.schedule_table import ScheduleTable, table_from_curve

META = {"format": FORMAT, "format_version": FORMAT_VERSION, "curve": "bin", "fitted_steps": "4", "description": "x"}
SLOW = 2.0  # seconds: one load of a file of at most a few kB must never take longer than this
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=SLOW), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="asyndm-fuzz-") as d:
        yield Path(d)


def good_tensors() -> dict[str, torch.Tensor]:
    return {
        "progress": torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]),
        "timesteps": torch.tensor([[1.0, 0.9, 0.6, 0.3, 0.0]]),
        "priorities": torch.tensor([0.7]),
    }


def good_bytes(scratch: Path) -> bytes:
    path = scratch / "good.safetensors"
    save_file(good_tensors(), str(path), metadata=META)
    return path.read_bytes()


def outcome(path: Path) -> ScheduleTable | ScheduleFileError:
    """Load; return the table or the ScheduleFileError. Any other exception (or a slow load) fails."""
    start = time.monotonic()
    try:
        result: ScheduleTable | ScheduleFileError = load_schedule(path)
    except ScheduleFileError as e:
        assert path.name in str(e), f"the message does not name the file: {e}"
        result = e
    elapsed = time.monotonic() - start
    assert elapsed < SLOW, f"load_schedule took {elapsed:.1f} s on a {path.stat().st_size}-byte file"
    if isinstance(result, ScheduleTable):  # whatever loads is a valid table
        assert torch.isfinite(result.timesteps).all() and result.timesteps.ndim == 2
    return result


def write_raw(path: Path, header: object, data: bytes = b"", claimed: int | None = None) -> Path:
    """A safetensors-like file: 8-byte little-endian header length, header bytes, data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if claimed is None else claimed) + text + data)
    return path


# ------------------------------------------------------------------------------------------------
# Deterministic corpus: every prefix, every single-byte corruption of the header, known traps.


def test_every_prefix_of_a_good_file_is_refused_cleanly(scratch: Path) -> None:
    data = good_bytes(scratch)
    full = scratch / "full.safetensors"
    full.write_bytes(data)
    assert isinstance(outcome(full), ScheduleTable)
    cut = scratch / "cut.safetensors"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        assert isinstance(outcome(cut), ScheduleFileError), f"a {n}-byte prefix of {len(data)} loaded"


def test_every_header_byte_overwritten(scratch: Path) -> None:
    """Each byte of the length field and of the JSON header replaced by a few values."""
    data = bytearray(good_bytes(scratch))
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    path = scratch / "flip.safetensors"
    for i in range(8 + header_len):
        for value in (0x00, 0x22, 0x5B, 0x7B, 0xFF):
            if data[i] == value:
                continue
            mutated = bytearray(data)
            mutated[i] = value
            path.write_bytes(bytes(mutated))
            outcome(path)


TRAPS: dict[str, tuple[object, bytes, int | None]] = {
    # header length field claiming gigabytes / exabytes
    "claims 8 GiB header": ({"__metadata__": META}, b"", 8 * 2**30),
    "claims 2^63 header": ({"__metadata__": META}, b"", 2**63),
    "claims max u64 header": ({"__metadata__": META}, b"", 2**64 - 1),
    # tensors claiming gigabytes of data
    "offsets claim GiB": ({"__metadata__": META,
                           "progress": {"dtype": "F32", "shape": [5], "data_offsets": [0, 2**33]},
                           "timesteps": {"dtype": "F32", "shape": [1, 5], "data_offsets": [0, 20]},
                           "priorities": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(20), None),
    "shape claims GiB": ({"__metadata__": META,
                          "progress": {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 20]},
                          "timesteps": {"dtype": "F32", "shape": [1, 5], "data_offsets": [0, 20]},
                          "priorities": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(20), None),
    "shape 2^40": ({"__metadata__": META,
                    "progress": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 20]},
                    "timesteps": {"dtype": "F32", "shape": [1, 5], "data_offsets": [0, 20]},
                    "priorities": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(20), None),
    # JSON that is not an object, or nested too deep for the parser
    "header is a list": (b"[1, 2, 3]", b"", None),
    "header is null": (b"null", b"", None),
    "nested arrays": (b"[" * 100_000 + b"]" * 100_000, b"", None),
    "nested objects": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"", None),
    "not utf-8": (b"\xff\xfe\xfd{", b"", None),
    "utf-16 JSON": ('{"__metadata__": {}}'.encode("utf-16"), b"", None),
    "NaN offsets": (b'{"progress": {"dtype": "F32", "shape": [1], "data_offsets": [NaN, 4]}}', bytes(4), None),
    "float offsets": ({"progress": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, bytes(4), None),
    # metadata of the wrong type, or with wrong value types
    "metadata is a list": ({"__metadata__": ["format", FORMAT]}, b"", None),
    "metadata is a string": ({"__metadata__": FORMAT}, b"", None),
    "metadata is a number": ({"__metadata__": 1}, b"", None),
    "metadata values not strings": ({"__metadata__": {**META, "format_version": 1}}, b"", None),
    "fitted_steps a list": ({"__metadata__": {**META, "fitted_steps": [4]}}, b"", None),
    # per-tensor entries of the wrong type
    "dtype a list": ({"__metadata__": META,
                      "progress": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
                      "timesteps": {"dtype": "F32", "shape": [1, 2], "data_offsets": [8, 16]},
                      "priorities": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}}, bytes(20), None),
    "dtype an object": ({"__metadata__": META,
                         "progress": {"dtype": {"F32": 1}, "shape": [2], "data_offsets": [0, 8]},
                         "timesteps": {"dtype": "F32", "shape": [1, 2], "data_offsets": [8, 16]},
                         "priorities": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}}, bytes(20), None),
    "shape a string": ({"__metadata__": META,
                        "progress": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
                        "timesteps": {"dtype": "F32", "shape": [1, 2], "data_offsets": [8, 16]},
                        "priorities": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}}, bytes(20), None),
    "shape of bools": ({"__metadata__": META,
                        "progress": {"dtype": "F32", "shape": [True, True], "data_offsets": [0, 8]},
                        "timesteps": {"dtype": "F32", "shape": [1, 2], "data_offsets": [8, 16]},
                        "priorities": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}}, bytes(20), None),
    "entry a list": ({"__metadata__": META, "progress": [0, 8]}, bytes(8), None),
    "offsets of strings": ({"__metadata__": META, "progress": {"dtype": "F32", "shape": [2],
                                                               "data_offsets": ["0", "8"]}}, bytes(8), None),
    "overlapping tensors": ({"__metadata__": META,
                             "progress": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "timesteps": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
                             "priorities": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                            struct.pack("<2f", 0.0, 1.0), None),
}


@pytest.mark.parametrize("case", list(TRAPS))
def test_known_traps_raise_schedule_file_error(scratch: Path, case: str) -> None:
    header, data, claimed = TRAPS[case]
    result = outcome(write_raw(scratch / "trap.safetensors", header, data, claimed))
    assert isinstance(result, ScheduleFileError), f"{case}: loaded {result!r}"


def test_sparse_file_of_gigabytes_is_refused_without_reading(scratch: Path) -> None:
    path = scratch / "huge.safetensors"
    with open(path, "wb") as f:  # sparse: costs no disk
        f.write(struct.pack("<Q", 100))
        f.truncate(3 * 2**30)
    try:
        result = outcome(path)
        assert isinstance(result, ScheduleFileError) and "too large" in str(result)
    finally:
        path.unlink()


# ------------------------------------------------------------------------------------------------
# Generated inputs.


@FUZZ
@given(blob=st.binary(max_size=4096))
def test_random_bytes(scratch: Path, blob: bytes) -> None:
    path = scratch / "random.safetensors"
    path.write_bytes(blob)
    assert isinstance(outcome(path), ScheduleFileError)


@FUZZ
@given(header=st.binary(max_size=2048), data=st.binary(max_size=256))
def test_random_header_bytes_behind_a_consistent_length(scratch: Path, header: bytes, data: bytes) -> None:
    outcome(write_raw(scratch / "rh.safetensors", header, data))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_corruptions_of_a_good_file(scratch: Path, flips: list[tuple[int, int]]) -> None:
    data = bytearray(good_bytes(scratch))
    for pos, value in flips:
        data[pos % len(data)] = value
    path = scratch / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    outcome(path)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4)), max_leaves=12)
dtypes = st.one_of(st.sampled_from(["F16", "BF16", "F32", "F64", "I32", "U8", "BOOL", "F8_E4M3", "f32", ""]),
                   json_values)
shapes = st.one_of(st.lists(st.integers(-3, 12), max_size=3), st.lists(st.sampled_from([0, 1, 2**31, 2**40]),
                                                                        max_size=3), json_values)
offsets = st.one_of(st.tuples(st.integers(-4, 300), st.integers(-4, 300)).map(list),
                    st.lists(st.integers(0, 2**64), max_size=3), json_values)
metadata = st.one_of(
    st.fixed_dictionaries({}, optional={
        "format": st.sampled_from([FORMAT, "pt", ""]) | json_values,
        "format_version": st.sampled_from([FORMAT_VERSION, "2", "1.0"]) | json_values,
        "curve": st.sampled_from(["bin", "learned", "x" * 500]) | json_values,
        "fitted_steps": st.sampled_from(["4", "-1", "0", "1e3", "9" * 30, ""]) | json_values,
        "description": st.text(max_size=40) | json_values,
    }),
    json_values,
)
entries = st.fixed_dictionaries({}, optional={"dtype": dtypes, "shape": shapes, "data_offsets": offsets})


@FUZZ
@given(meta=metadata,
       tensors=st.dictionaries(st.sampled_from(["progress", "timesteps", "priorities", "extra", "__metadata__x"]),
                               st.one_of(entries, json_values), max_size=4),
       data=st.binary(max_size=300))
def test_structured_headers(scratch: Path, meta: object, tensors: dict, data: bytes) -> None:
    header = {"__metadata__": meta, **tensors}
    outcome(write_raw(scratch / "structured.safetensors", header, data))


float_dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])
any_dtypes = st.one_of(float_dtypes, st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.bool]))
values = st.one_of(st.floats(width=16, allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0))


@st.composite
def real_tensors(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Valid safetensors content: a random subset of the names (sometimes extra ones), random shapes,
    dtypes and values (NaN, infinities, out of range, unsorted)."""
    names = draw(st.lists(st.sampled_from(["progress", "timesteps", "priorities", "weights"]), min_size=0,
                          max_size=4, unique=True))
    out = {}
    for name in names:
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
        n = 1
        for d in shape:
            n *= d
        dtype = draw(any_dtypes)
        flat = draw(st.lists(values, min_size=n, max_size=n))
        t = torch.tensor(flat, dtype=torch.float64).reshape(shape)
        if not dtype.is_floating_point:
            t = torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-5, 5)
        out[name] = t.to(dtype)
    return out


@FUZZ
@given(tensors=real_tensors(), meta=st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["format", "format_version", "curve", "fitted_steps", "description", "other"]),
    st.text(max_size=12), max_size=6), st.just(META)))
def test_valid_safetensors_with_wrong_content(scratch: Path, tensors: dict, meta: dict | None) -> None:
    path = scratch / "real.safetensors"
    save_file(tensors, str(path), metadata=meta)
    outcome(path)


@FUZZ
@given(levels=st.sets(st.integers(1, 20), min_size=1, max_size=4).map(lambda s: [v / 20 for v in s]),
       steps=st.integers(1, 60), curve=st.sampled_from(["bin", "lin", "exp"]),
       dtype=float_dtypes, tamper=st.sampled_from(["none", "nan", "inf", "up", "range", "order"]))
def test_tampered_real_tables(scratch: Path, levels: list[float], steps: int, curve: str, dtype: torch.dtype,
                              tamper: str) -> None:
    """Good tables in every float dtype load; the same table with one defect is refused."""
    table = table_from_curve(curve, sorted(levels), num_steps=steps)
    ts = table.timesteps.clone()
    pr = table.priorities.clone()
    j = ts.shape[1] // 2
    if tamper == "nan":
        ts[0, j] = float("nan")
    elif tamper == "inf":
        ts[-1, j] = float("inf")
    elif tamper == "up":
        ts[0, j] = 1.0  # the noise grows again (j > 0) or stays: make sure it grows
        ts[0, j - 1] = 0.5 if j >= 1 else ts[0, j - 1]
    elif tamper == "range":
        pr[-1] = 1.5
    elif tamper == "order":
        pr = pr.flip(0) if pr.numel() > 1 else pr - 2.0
    tensors = {"progress": table.progress.to(dtype), "timesteps": ts.to(dtype), "priorities": pr.to(dtype)}
    path = scratch / "tampered.safetensors"
    save_file(tensors, str(path), metadata=META)
    result = outcome(path)
    if tamper == "none":
        # fp16/bf16 rounding can merge priority levels or break the 0..1 end points: then refused cleanly
        assert isinstance(result, ScheduleTable) or dtype in (torch.float16, torch.bfloat16), result
    else:
        assert isinstance(result, ScheduleFileError), (tamper, dtype)


def test_a_saved_table_round_trips_after_all_that(scratch: Path) -> None:
    """Sanity: the fuzzed loader still loads what save_schedule writes."""
    table = table_from_curve("exp", [0.3, 0.7], num_steps=9)
    back = outcome(save_schedule(table, scratch / "ok.safetensors"))
    assert isinstance(back, ScheduleTable) and torch.equal(back.timesteps, table.timesteps)
    assert not [p for p in os.listdir(scratch) if p.endswith(".tmp")]
