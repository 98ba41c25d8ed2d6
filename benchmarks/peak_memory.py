"""Peak memory of a block of code: exact on CUDA, sampled from glibc's heap on CPU.

On CPU, torch's tensors live in glibc's heap; its in-use bytes (``mallinfo2``: ``uordblks`` +
``hblkhd``) are sampled every 0.2 ms on a side thread and the peak above the level at entry is
reported. On CUDA, ``torch.cuda.max_memory_allocated``.

Do not time code inside it on CPU: the sampler's thread takes the GIL and malloc's lock every
0.2 ms and slowed the engine's training step 2-3x (docs/benchmarks.md); measure memory in a run
of its own.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import torch

from lightning_real.compat import has_cuda


class _MallInfo(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_fn() -> Any:
    if has_cuda():
        return torch.cuda.memory_allocated
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo

    def used() -> int:
        m = libc.mallinfo2()
        return int(m.uordblks + m.hblkhd)

    return used


class PeakMemory:
    """Peak bytes in use above the level at entry (sampled on CPU, exact on CUDA)."""

    def __init__(self) -> None:
        self.used = _heap_fn()
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        self.base = self.used()
        self.top = self.base
        self._stop = threading.Event()
        if has_cuda():
            torch.cuda.reset_peak_memory_stats()
        else:
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.top = max(self.top, self.used())
            time.sleep(0.0002)

    def __exit__(self, *exc: Any) -> None:
        if has_cuda():
            self.top = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._t.join()
            self.top = max(self.top, self.used())
        self.peak = self.top - self.base
