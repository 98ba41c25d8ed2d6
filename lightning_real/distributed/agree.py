"""Run a step on every rank and fail on every rank when it failed on any.

A collective write (a checkpoint, an HF export) whose step failed on one rank must not leave the
others waiting at the next collective: each rank runs its part, all ranks exchange their
errors, and every rank raises the same error when any failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def on_every_rank(fn: Callable[[], Any], failure: str, error: type[Exception] = RuntimeError) -> Any:
    """``fn()`` on this rank; raises ``error("<failure>: rank r: ...")`` on every rank if any failed.

    Collective over the default group when one is initialised. Returns ``fn``'s result.
    """
    result, message = None, None
    try:
        result = fn()
    except Exception as e:  # reported to every rank, or the others would wait forever
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        message = f"rank {rank}: {type(e).__name__}: {e}"
    messages: list[Any] = [message]
    if dist.is_available() and dist.is_initialized():
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
    failed = [m for m in messages if m is not None]
    if failed:
        raise error(f"{failure}: {'; '.join(failed)}")
    return result
