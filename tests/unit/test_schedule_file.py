"""Schedule files: save/load round trip, refusal of damaged or foreign files, the shipped files."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from asyndm.schedule_file import FORMAT, FORMAT_VERSION, ScheduleFileError, load_schedule, save_schedule
from asyndm.schedule_table import ScheduleTable, table_from_curve
from asyndm.schedules import step

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "schedules"
META = {"format": FORMAT, "format_version": FORMAT_VERSION, "curve": "bin", "fitted_steps": "4", "description": "x"}


def good_tensors() -> dict[str, torch.Tensor]:
    return {
        "progress": torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]),
        "timesteps": torch.tensor([[1.0, 0.9, 0.6, 0.3, 0.0]]),
        "priorities": torch.tensor([0.7]),
    }


def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = META) -> Path:
    save_file(tensors, str(path), metadata=meta)
    return path


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", claimed: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if claimed is None else claimed) + text + data)
    return path


def assert_tables_equal(a: ScheduleTable, b: ScheduleTable) -> None:
    assert torch.equal(a.progress, b.progress)
    assert torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(a.priorities, b.priorities)
    assert (a.curve, a.fitted_steps, a.description) == (b.curve, b.fitted_steps, b.description)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    table = table_from_curve("exp", [0.3, 0.7, 1.0], num_steps=13, description="three levels, ünïcode")
    path = save_schedule(table, tmp_path / "s.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    back = load_schedule(path)
    assert_tables_equal(back, table)
    assert back.fitted_steps == 13 and back.curve == "exp"


def test_good_hand_written_file_loads(tmp_path: Path) -> None:
    t = load_schedule(write(tmp_path / "g.safetensors", good_tensors()))
    assert t.fitted_steps == 4 and t.description == "x"
    assert torch.equal(t.timesteps, good_tensors()["timesteps"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScheduleFileError, match="does not exist"):
        load_schedule(tmp_path / "nope.safetensors")


def test_unreadable_file_is_our_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the server may not read (permissions, NFS errors) is a clear error, not a raw OSError.

    The tests run as root, where chmod 000 does not stop a read, so the OS's answer is simulated."""
    import asyndm.schedule_file as schedule_file

    path = write(tmp_path / "locked.safetensors", good_tensors())

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(schedule_file, "open", denied, raising=False)
    with pytest.raises(ScheduleFileError, match=r"locked.safetensors: cannot be read \(Permission denied\).*permissions"):
        load_schedule(path)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -4])
def test_truncated_files_are_refused(tmp_path: Path, keep: int) -> None:
    full = write(tmp_path / "full.safetensors", good_tensors()).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full[:keep] if keep >= 0 else full[:keep])
    with pytest.raises(ScheduleFileError):
        load_schedule(cut)


def test_other_safetensors_files_are_refused(tmp_path: Path) -> None:
    other = write(tmp_path / "lora.safetensors", {"lora_up.weight": torch.zeros(4, 4)}, meta=None)
    with pytest.raises(ScheduleFileError, match="not an AsynDM schedule"):
        load_schedule(other)
    other = write(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, meta={"format": "pt"})
    with pytest.raises(ScheduleFileError, match="not an AsynDM schedule"):
        load_schedule(other)
    text = tmp_path / "t.safetensors"
    text.write_text("this is not a safetensors file at all")
    with pytest.raises(ScheduleFileError):
        load_schedule(text)


def test_wrong_version_and_tensor_sets(tmp_path: Path) -> None:
    with pytest.raises(ScheduleFileError, match="version"):
        load_schedule(write(tmp_path / "v.safetensors", good_tensors(), {**META, "format_version": "9"}))
    extra = {**good_tensors(), "more": torch.zeros(1)}
    with pytest.raises(ScheduleFileError, match="expected exactly the tensors"):
        load_schedule(write(tmp_path / "e.safetensors", extra))
    fewer = good_tensors()
    del fewer["priorities"]
    with pytest.raises(ScheduleFileError, match="expected exactly the tensors"):
        load_schedule(write(tmp_path / "f.safetensors", fewer))
    ints = {**good_tensors(), "priorities": torch.tensor([1], dtype=torch.int32)}
    with pytest.raises(ScheduleFileError, match="float type"):
        load_schedule(write(tmp_path / "i.safetensors", ints))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tables_are_refused(tmp_path: Path, bad: float) -> None:
    t = good_tensors()
    t["timesteps"][0, 2] = bad
    with pytest.raises(ScheduleFileError, match="NaN or infinite"):
        load_schedule(write(tmp_path / "n.safetensors", t))


def test_invalid_tables_are_refused(tmp_path: Path) -> None:
    t = good_tensors()
    t["timesteps"] = torch.tensor([[1.0, 0.5, 0.6, 0.3, 0.0]])  # noise grows again
    with pytest.raises(ScheduleFileError, match="non-increasing"):
        load_schedule(write(tmp_path / "a.safetensors", t))
    t = good_tensors()
    t["priorities"] = torch.tensor([1.5])
    with pytest.raises(ScheduleFileError, match="priorities"):
        load_schedule(write(tmp_path / "b.safetensors", t))
    t = good_tensors()
    t["progress"] = torch.tensor([0.0, 0.5, 0.25, 0.75, 1.0])
    with pytest.raises(ScheduleFileError, match="progress"):
        load_schedule(write(tmp_path / "c.safetensors", t))
    with pytest.raises(ScheduleFileError, match="fitted_steps"):
        load_schedule(write(tmp_path / "d.safetensors", good_tensors(), {**META, "fitted_steps": "many"}))


def test_huge_claimed_headers_are_refused_without_reading(tmp_path: Path) -> None:
    with pytest.raises(ScheduleFileError, match="corrupt or truncated"):
        load_schedule(raw_file(tmp_path / "h.safetensors", {"__metadata__": META}, claimed=2**62))
    with pytest.raises(ScheduleFileError, match="corrupt or truncated"):
        load_schedule(raw_file(tmp_path / "h2.safetensors", {"__metadata__": META}, claimed=10_000))
    with pytest.raises(ScheduleFileError, match="not JSON"):
        load_schedule(raw_file(tmp_path / "j.safetensors", b"\xff\xfe{not json"))


def test_offsets_outside_the_file_and_absurd_shapes(tmp_path: Path) -> None:
    header = {
        "__metadata__": META,
        "progress": {"dtype": "F32", "shape": [5], "data_offsets": [0, 20]},
        "timesteps": {"dtype": "F32", "shape": [1, 5], "data_offsets": [20, 40]},
        "priorities": {"dtype": "F32", "shape": [1], "data_offsets": [40, 10**12]},
    }
    with pytest.raises(ScheduleFileError, match="outside the file"):
        load_schedule(raw_file(tmp_path / "o.safetensors", header, data=bytes(44)))
    header["priorities"] = {"dtype": "F32", "shape": [10**9], "data_offsets": [40, 44]}
    with pytest.raises(ScheduleFileError, match="absurd shape"):
        load_schedule(raw_file(tmp_path / "s.safetensors", header, data=bytes(44)))


def test_oversized_files_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.truncate(17 * 1024 * 1024)
    with pytest.raises(ScheduleFileError, match="too large"):
        load_schedule(big)


# ------------------------------------------------------------------------------------------------
# The shipped files.


@pytest.mark.parametrize("curve", ["bin", "lin", "exp"])
def test_shipped_files_are_the_paper_curves(curve: str) -> None:
    path = SHIPPED / f"asyndm-{curve}-k0.7.safetensors"
    table = load_schedule(path)
    want = table_from_curve(curve, [0.7], num_steps=50)
    assert torch.equal(table.progress, want.progress)
    assert torch.equal(table.timesteps, want.timesteps)
    assert torch.equal(table.priorities, want.priorities)
    assert table.curve == curve and table.fitted_steps == 50
    assert curve in table.description and "k = 0.7" in table.description and "2510.04504" in table.description
    # independent of table_from_curve: the states of method.md's curve, normalized
    s = torch.tensor([1001.0], dtype=torch.float64)
    for i in range(50):
        s = step(s, 50 - i, curve=curve, k=0.7, num_steps=50)
        want_tau = max(0.0, (float(s) - 1) / 1000) if i < 49 else 0.0
        assert abs(float(table.timesteps[0, i + 1]) - want_tau) < 1e-6, (curve, i)


def test_make_schedules_is_up_to_date_and_reproducible(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_schedules
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert make_schedules.main(["--check"]) == 0
    assert make_schedules.main(["--out", str(tmp_path)]) == 0
    for path in sorted(SHIPPED.glob("*.safetensors")):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in SHIPPED.glob("*.safetensors")) == [
        "asyndm-bin-k0.7.safetensors", "asyndm-exp-k0.7.safetensors", "asyndm-lin-k0.7.safetensors"]
