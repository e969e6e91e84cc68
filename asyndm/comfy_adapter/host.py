"""Host-side maths: numbers the sampler decides on before or between model calls, kept on the CPU.

On a GPU, reading a device tensor's value stalls the launch queue (every kernel queued before it
must finish first). The track tables (each track's sigma sequence, where it holds still, which
pixels share a track) are small, so they are computed on CPU copies, read back in one copy each
(``to_host``), and the sampler's decisions read those. ``host_maths()`` marks a block that works on
CPU tensors and Python numbers only: the op counter of the benchmarks and tests
(benchmarks/bench/dispatch_count.py) counts what runs inside it as host work, checks that it
touches no accelerator tensor, and counts every ``to_host`` as one host sync.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["host_maths", "in_host_maths", "host_reads", "to_host"]

_STATE = threading.local()  # per thread: host_maths depth, to_host count


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
