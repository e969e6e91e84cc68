"""Count the aten ops and the host syncs of a sampling run (what a GPU's launch queue would see).

A TorchDispatchMode sees every aten op a run dispatches, in every thread that enters it (the
lock-step sampler's instance threads enter the caller's dispatch modes, lockstep.py). A *host
sync* is an op whose result the host must read back before it can go on, so that on a GPU it
waits for every kernel queued before it: reading a value (.item(), float(t), bool(t), which reach
aten._local_scalar_dense), comparing whole tensors (torch.equal), and the ops whose output shape
depends on tensor values (unique, nonzero, boolean indexing, repeat_interleave without an output
size). A copy from a CUDA tensor to the CPU is one too; on a CPU-only run it cannot happen.

The pack computes its track tables on CPU copies (asyndm/comfy_adapter/host.py): ops inside a
``host_maths()`` block are counted as host ops, not device ops, and must touch no accelerator
tensor (counted as ``host_violations``); each ``to_host`` copy counts as one host sync of the pack
(on a CPU-only run such a copy dispatches nothing, so it is counted where it is made). A pipelined
read (``HostCopy``: dynamic masks' one read per step, taken only after the next model call was
queued, so it never drains the queue) is counted apart, as ``pipelined_reads``; one taken before a
model call was queued after it is an ``early_waits`` (it would stall like a sync).

Each sync is attributed to the innermost frame of ComfyUI or of this pack on the Python stack
(site "pack" or "comfy", with file:line), so that a test can tell the pack's own host reads from
the sampler functions' (ComfyUI's samplers read their sigmas, e.g. ``if sigmas[i + 1] == 0``).
Per-step figures are the slope between two step counts, so set-up and tear-down cancel.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DispatchCounter", "RunCount", "count_run", "per_step", "SYNC_OPS"]

_ATEN = torch.ops.aten
# Ops that always read device values back to the host.
SYNC_OPS = frozenset({
    "_local_scalar_dense", "equal", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "nonzero", "masked_select", "allclose",
})
_PACK_DIRS = (os.sep + "asyndm" + os.sep, os.sep + "nodes" + os.sep)
_COMFY_DIRS = (os.sep + "comfy" + os.sep, os.sep + "comfy_extras" + os.sep)


def _op_name(func: Any) -> str:
    return func._schema.name.split("::")[-1]


def _is_sync(name: str, func: Any, args: tuple, kwargs: dict) -> bool:
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave" and torch.is_tensor(args[0] if args else None) and kwargs.get("output_size") is None \
            and (len(args) < 4 or args[3] is None):
        return func is _ATEN.repeat_interleave.Tensor or func is _ATEN.repeat_interleave.self_Tensor
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices") or ()
        return any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices or ())
    if name in ("_to_copy", "copy_"):
        src = args[1] if name == "copy_" else args[0]
        dst_device = args[0].device if name == "copy_" else kwargs.get("device")
        return torch.is_tensor(src) and src.device.type != "cpu" and dst_device is not None \
            and torch.device(dst_device).type == "cpu"
    return False


def _site() -> str:
    """'pack file:line' or 'comfy file:line' of the innermost frame of either on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "benchmarks" not in path and any(d in path for d in _PACK_DIRS):
            return f"pack {os.path.basename(path)}:{frame.f_lineno}"
        if any(d in path for d in _COMFY_DIRS):
            return f"comfy {os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "other"


@dataclass
class RunCount:
    """Ops and host syncs of one run: totals, syncs per site, ops per name."""

    ops: int = 0
    syncs: int = 0
    host_ops: int = 0
    host_violations: int = 0
    pipelined_reads: int = 0
    early_waits: int = 0
    sync_sites: Counter = field(default_factory=Counter)
    op_names: Counter = field(default_factory=Counter)

    def pack_syncs(self) -> int:
        return sum(n for site, n in self.sync_sites.items() if site.startswith("pack"))


class DispatchCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (in every thread that entered it)."""

    def __init__(self, op_sites: bool = False) -> None:
        """op_sites: also count every op by its site (slow; for finding where ops come from)."""
        super().__init__()
        self.op_sites = op_sites
        self.sites: Counter = Counter()
        self.count = RunCount()
        self._lock = threading.Lock()
        self._host_modules: list[Any] = []
        self._reads_before = (0, 0, 0)
        self._owner: int | None = None

    def __enter__(self) -> DispatchCounter:
        # Entered again in the lock-step instance threads (same object): only the owner's entry counts.
        if self._owner is None:
            self._owner = threading.get_ident()
            # The pack may be imported under two names (the repository's folder, and asyndm itself).
            self._host_modules = [m for name, m in list(sys.modules.items())
                                  if name.endswith("asyndm.comfy_adapter.host") and hasattr(m, "pipelined_reads")]
            self._reads_before = self._read_counts()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if threading.get_ident() == self._owner:
            reads, pipelined, early = (now - before for now, before in zip(self._read_counts(), self._reads_before, strict=True))
            self.count.syncs += reads
            if reads:
                self.count.sync_sites["pack to_host"] += reads
            self.count.pipelined_reads += pipelined
            self.count.early_waits += early
            self._owner = None
        super().__exit__(*exc)

    def _read_counts(self) -> tuple[int, int, int]:
        """(to_host copies, pipelined reads, early waits) of this thread so far."""
        return (sum(m.host_reads() for m in self._host_modules),
                sum(m.pipelined_reads() for m in self._host_modules),
                sum(m.early_waits() for m in self._host_modules))

    def _in_host_maths(self) -> bool:
        return any(m.in_host_maths() for m in self._host_modules)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _op_name(func)
        if self._in_host_maths():
            flat = [*args, *kwargs.values()]
            device_args = any(torch.is_tensor(a) and a.device.type not in ("cpu", "meta") for a in flat)
            with self._lock:
                self.count.host_ops += 1
                self.count.host_violations += int(device_args)
            return func(*args, **kwargs)
        sync = _is_sync(name, func, args, kwargs)
        site = _site() if sync or self.op_sites else ""
        if self.op_sites:
            self.sites[site] += 1
        with self._lock:
            self.count.ops += 1
            self.count.op_names[name] += 1
            if sync:
                self.count.syncs += 1
                self.count.sync_sites[site] += 1
        return func(*args, **kwargs)


def count_run(run: Callable[[], Any]) -> tuple[RunCount, Any]:
    """(what `run()` dispatched, its result)."""
    counter = DispatchCounter()
    with counter:
        out = run()
    return counter.count, out


def per_step(short: RunCount, long: RunCount, extra_steps: int) -> dict[str, Any]:
    """Per-step ops and syncs: the slope between a short and a long run of the same job."""
    sites = Counter(long.sync_sites)
    sites.subtract(short.sync_sites)
    return {
        "ops": (long.ops - short.ops) / extra_steps,
        "host_ops": (long.host_ops - short.host_ops) / extra_steps,
        "host_violations": long.host_violations + short.host_violations,
        "syncs": (long.syncs - short.syncs) / extra_steps,
        "pack_syncs": (long.pack_syncs() - short.pack_syncs()) / extra_steps,
        "pipelined_reads": (long.pipelined_reads - short.pipelined_reads) / extra_steps,
        "early_waits": long.early_waits + short.early_waits,
        "sync_sites": {site: n / extra_steps for site, n in sites.items() if n},
    }
