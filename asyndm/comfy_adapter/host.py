"""Host-side maths: numbers the sampler decides on before or between model calls, kept on the CPU.

On a GPU, reading a device tensor's value stalls the launch queue (every kernel queued before it
must finish first). The track tables (each track's sigma sequence, where it holds still, which
pixels share a track) are small, so they are computed on CPU copies, read back in one copy each
(``to_host``), and the sampler's decisions read those. ``host_maths()`` marks a block that works on
CPU tensors and Python numbers only: the op counter of the benchmarks and tests
(benchmarks/bench/dispatch_count.py) counts what runs inside it as host work, checks that it
touches no accelerator tensor, and counts every ``to_host`` as one host sync.

Dynamic masks need one value read per step (the priorities the latest attention gave, which decide
how the pixels are re-partitioned into tracks). ``HostCopy`` makes it a pipelined read: the copy is
queued behind the kernels that produce the values, and waited for only after the next model call
has been queued (``model_call_queued``), so the wait never drains the launch queue (on CUDA: a
pinned buffer, a non-blocking copy and an event). ``to_device`` uploads host tables without a
stream sync (pinned memory, non-blocking), where a plain ``.to(device)`` would wait for the queue.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["HostCopy", "early_waits", "host_maths", "in_host_maths", "host_reads", "model_call_queued",
           "pipelined_reads", "to_device", "to_host"]

_STATE = threading.local()  # per thread: host_maths depth, read counts, model calls queued


@contextlib.contextmanager
def host_maths() -> Iterator[None]:
    """A block that works on CPU tensors and Python numbers only."""
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth


def in_host_maths() -> bool:
    return getattr(_STATE, "depth", 0) > 0


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU copy of a (device) tensor: one read of device values, counted (host_reads)."""
    _STATE.reads = getattr(_STATE, "reads", 0) + 1
    return t.detach().to("cpu", dtype or t.dtype)


def host_reads() -> int:
    """How many to_host copies this thread made so far."""
    return getattr(_STATE, "reads", 0)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t (CPU) on `device`. To a CUDA device through pinned memory, non-blocking: a plain copy from
    pageable memory synchronises the stream (the launch queue drains) before it copies."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def model_call_queued() -> None:
    """Called once per model call, after its kernels were queued (the clock of HostCopy.wait)."""
    _STATE.calls = getattr(_STATE, "calls", 0) + 1


class HostCopy:
    """A read of a device tensor's values, started now and taken (``wait``) after the next model call
    was queued: on a GPU the copy then lands while that call runs and the queue never drains. On
    CUDA the copy goes to pinned memory behind an event; on the CPU it is the tensor itself; other
    devices are read when waited for (a plain read, counted by host_reads)."""

    def __init__(self, t: torch.Tensor) -> None:
        _STATE.pipelined = getattr(_STATE, "pipelined", 0) + 1
        self._queued_at = getattr(_STATE, "calls", 0)
        self._event: torch.cuda.Event | None = None
        self._source: torch.Tensor | None = None
        t = t.detach()
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif t.device.type == "cpu":
            self._host = t
        else:
            self._source = t

    def wait(self) -> torch.Tensor:
        """The values on the CPU. Counted as an early wait when no model call was queued since the copy
        began (then the wait would drain the queue like a plain read)."""
        if getattr(_STATE, "calls", 0) == self._queued_at:
            _STATE.early = getattr(_STATE, "early", 0) + 1
        if self._source is not None:
            self._host, self._source = to_host(self._source), None
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host


def pipelined_reads() -> int:
    """How many HostCopy reads this thread started so far."""
    return getattr(_STATE, "pipelined", 0)


def early_waits() -> int:
    """How many HostCopy reads this thread took before a model call was queued after them."""
    return getattr(_STATE, "early", 0)
