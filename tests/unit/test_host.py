"""host.py: the counted reads the GPU-readiness test relies on. A pipelined read (HostCopy) is
early when it is taken before a model call was queued after it (it would then drain a GPU's queue
like a plain read); to_host counts every plain read; to_device keeps values and dtype."""

from __future__ import annotations

import torch

from asyndm.comfy_adapter import host


def test_a_pipelined_read_taken_after_the_next_model_call_is_not_early() -> None:
    before = (host.pipelined_reads(), host.early_waits(), host.host_reads())
    values = torch.arange(6.0).view(2, 3)
    copy = host.HostCopy(values * 2)
    host.model_call_queued()
    got = copy.wait()
    assert torch.equal(got, values * 2)
    assert host.pipelined_reads() == before[0] + 1
    assert host.early_waits() == before[1]
    assert host.host_reads() == before[2]  # not a plain read


def test_a_pipelined_read_taken_before_any_model_call_is_counted_early() -> None:
    early = host.early_waits()
    copy = host.HostCopy(torch.ones(3))
    assert torch.equal(copy.wait(), torch.ones(3))
    assert host.early_waits() == early + 1


def test_plain_reads_are_counted_and_uploads_keep_values() -> None:
    reads = host.host_reads()
    t = torch.tensor([1.5, -2.0], dtype=torch.float64)
    assert torch.equal(host.to_host(t, torch.float32), t.float())
    assert host.host_reads() == reads + 1
    up = host.to_device(t, torch.device("cpu"))
    assert up.dtype == torch.float64 and torch.equal(up, t)


def test_host_maths_marks_only_its_block() -> None:
    assert not host.in_host_maths()
    with host.host_maths():
        assert host.in_host_maths()
        with host.host_maths():
            assert host.in_host_maths()
        assert host.in_host_maths()
    assert not host.in_host_maths()
