"""The caller's thread-local torch state, carried into the lock-step sampler's instance threads.

torch keeps grad mode, inference mode, autocast, the current CUDA device and stream, and the
dispatch modes per thread. An instance of a sampler function runs in its own thread but must
compute exactly as if ComfyUI had called it in the sampling thread: on the same CUDA stream (else
its kernels race the model call's), under the same autocast, and seen by the same dispatch modes
(profilers and op counters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack, _pop_mode, _push_mode

__all__ = ["ThreadState"]

_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps")


@dataclass(frozen=True)
class ThreadState:
    """A snapshot of the calling thread's torch state; ``entered()`` applies it in another thread."""

    grad: bool
    inference: bool
    autocast: tuple[tuple[str, torch.dtype], ...]
    cuda_stream: Any
    dispatch_modes: tuple[Any, ...]

    @classmethod
    def capture(cls) -> ThreadState:
        autocast = []
        for device in _AUTOCAST_DEVICES:
            try:
                if torch.is_autocast_enabled(device):
                    autocast.append((device, torch.get_autocast_dtype(device)))
            except (RuntimeError, ValueError):  # a device type this build does not know
                continue
        stream = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stream = torch.cuda.current_stream()
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), tuple(autocast), stream,
                   tuple(_get_current_dispatch_mode_stack()))

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(self.inference))
            stack.enter_context(torch.set_grad_enabled(self.grad))
            if self.cuda_stream is not None:
                stack.enter_context(torch.cuda.device(self.cuda_stream.device))
                stack.enter_context(torch.cuda.stream(self.cuda_stream))
            for device, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            for mode in self.dispatch_modes:
                stack.enter_context(_on_dispatch_stack(mode))
            yield


@contextlib.contextmanager
def _on_dispatch_stack(mode: Any) -> Iterator[None]:
    """The mode on this thread's dispatch stack, without calling its __enter__ again (a mode's own
    __enter__ may have side effects meant for the thread that entered it, such as registering hooks)."""
    _push_mode(mode)
    try:
        yield
    finally:
        _pop_mode()
