"""A training loader that starts where the fit loop stands in its epoch (exact mid-epoch resume)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


class EpochPositionLoader:
    """A training loader whose iteration starts at the batch the fit loop has reached in the epoch.

    ``position()`` is read when the first batch is requested, after Lightning has restored and
    reset its counters: 0 at an epoch's start, the consumed batches after a mid-epoch resume.
    Those batches are read and dropped; the order itself is the sampler's, a function of its
    seed and the epoch Lightning sets (``sampler`` and ``batch_sampler`` are passed through).
    """

    def __init__(self, loader: Any, position: Callable[[], int]) -> None:
        self.loader = loader
        self.position = position

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        skip = self.position()
        # A DataLoader iterator draws its worker seed from the global RNG; drawing it from a
        # fork keeps the global RNG where a restored checkpoint put it.
        with torch.random.fork_rng(devices=[]):
            it = iter(self.loader)
        for _ in range(skip):
            if next(it, _END) is _END:
                return
        yield from it

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "position"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning may set loader attributes (worker_init_fn); they belong to the loader.
        if name in ("loader", "position"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.loader, name, value)


_END = object()
