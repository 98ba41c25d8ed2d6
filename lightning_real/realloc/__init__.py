"""Parameter reallocation: move a model's shards from one parallel layout to another.

* :func:`plan_realloc` (pure, cached): every piece of every tensor, who sends it, in which message
  and round; :class:`ReallocPlan` exposes ``bytes_sent``, ``bytes_local``, ``lower_bound_bytes``.
* :func:`realloc_bytes` (pure, cached, a few ms for 70B on 128 GPUs): the same byte totals
  analytically, for the planner's search.
* :func:`execute`: one rank's part of a plan over torch.distributed, optionally asynchronous.
* :class:`Reallocator`: one model's copies per layout on this rank, moves, release, offload.
"""

from lightning_real.realloc.cost import ReallocCost, realloc_bytes
from lightning_real.realloc.execute import MoveHandle, MoveStats, execute
from lightning_real.realloc.memory import HostCopy, materialize, offload, release, reload
from lightning_real.realloc.plan import (
    DEFAULT_BUCKET_BYTES,
    Message,
    Piece,
    RankPlan,
    ReallocPlan,
    plan_realloc,
)
from lightning_real.realloc.reallocator import Reallocator, ReallocConfig, key_tensors

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "HostCopy",
    "Message",
    "MoveHandle",
    "MoveStats",
    "Piece",
    "RankPlan",
    "ReallocConfig",
    "ReallocCost",
    "ReallocPlan",
    "Reallocator",
    "execute",
    "key_tensors",
    "materialize",
    "offload",
    "plan_realloc",
    "realloc_bytes",
    "release",
    "reload",
]
