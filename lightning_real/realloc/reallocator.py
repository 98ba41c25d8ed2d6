"""One model's copies across layouts on this rank, and the moves between them.

The runtime keeps one module per (model, layout) on each rank; a :class:`Reallocator` is that
cache for one model. :meth:`Reallocator.move` fills the destination layout's module from the
source layout's module (building it on first use, re-creating its storage after a release) and,
unless asked to keep it, frees the source's storage afterwards. Every rank of the world calls
``move`` with the same arguments in the same order; ranks outside both layouts return at once
(after the collective creation of the layout's process groups, the first time a layout is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.layout import Layout
from lightning_real.models.build import BuildOptions, zero_vocab_padding_
from lightning_real.models.shard import ModelShard
from lightning_real.models.spec import ModelSpec, check_layout
from lightning_real.realloc import memory
from lightning_real.realloc.execute import MoveHandle, MoveStats, execute
from lightning_real.realloc.geometry import dtype_size
from lightning_real.realloc.plan import DEFAULT_BUCKET_BYTES, ReallocPlan, plan_realloc


@dataclass(frozen=True)
class ReallocConfig:
    """How moves are planned and carried out."""

    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    """Staging memory one rank uses during a move; each message is at most half of it."""
    gpus_per_node: int = 8
    """Ranks per node: senders on the receiver's node are preferred."""
    dtype: torch.dtype = torch.float32
    """Parameter dtype of the model's shards (the working copy; bfloat16 in bf16 runs)."""
    attention: Literal["local", "sdpa"] = "sdpa"
    """Core attention of the copies built on other layouts."""

    def __post_init__(self) -> None:
        if not isinstance(self.bucket_bytes, int) or self.bucket_bytes <= 0:
            raise ValueError(f"ReallocConfig.bucket_bytes={self.bucket_bytes!r}; allowed: a positive integer")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node <= 0:
            raise ValueError(
                f"ReallocConfig.gpus_per_node={self.gpus_per_node!r}; allowed: a positive integer"
            )
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"ReallocConfig.dtype={self.dtype!r}; allowed: a floating-point torch dtype")


def key_tensors(shard: ModelShard) -> dict[str, torch.Tensor]:
    """This rank's parameters of ``shard`` by canonical key (one tensor per key on a rank)."""
    return {ps.key: p.data for ps, p in shard.params()}


class Reallocator:
    """Moves one model's parameters between layouts on this rank (see the module docstring)."""

    def __init__(
        self,
        spec: ModelSpec,
        registry: GroupRegistry,
        config: ReallocConfig | None = None,
        group: Any = None,
    ) -> None:
        """``group`` carries the messages (default: the world group); use a group of its own when
        moves run asynchronously beside other communication."""
        self.spec = spec
        self.registry = registry
        self.config = config or ReallocConfig()
        self.group = group
        self.rank = registry.rank
        self._shards: dict[Layout, ModelShard] = {}
        self._host: dict[Layout, memory.HostCopy] = {}
        self.last_stats: MoveStats | None = None
        """Stats of the latest completed move on this rank."""

    # ---- copies -----------------------------------------------------------------------------
    def resolve(self, layout: Layout | str) -> Layout:
        """``layout`` with explicit ranks, checked against the world and the model."""
        lay = Layout.parse(layout) if isinstance(layout, str) else layout
        return check_layout(self.spec, lay.resolve(self.registry.world_size))

    def adopt(self, shard: ModelShard) -> ModelShard:
        """Use ``shard`` (built elsewhere, e.g. the training copy) as this model's copy on its layout."""
        if shard.spec != self.spec:
            raise ValueError(f"shard of {shard.spec} given to the reallocator of {self.spec}")
        self._shards[shard.layout] = shard
        return shard

    def shard(self, layout: Layout | str, seed: int = 0) -> ModelShard:
        """This model's copy on ``layout`` (built on first use: collective over the world)."""
        lay = self.resolve(layout)
        if lay not in self._shards:
            groups = self.registry.for_layout(lay)
            options = BuildOptions(dtype=self.config.dtype, attention=self.config.attention)
            self._shards[lay] = ModelShard.build(self.spec, groups, seed=seed, options=options)
        return self._shards[lay]

    def holds(self, layout: Layout | str) -> bool:
        """Whether this rank's copy on ``layout`` exists and has its storage."""
        lay = self.resolve(layout)
        sh = self._shards.get(lay)
        return sh is not None and sh.module is not None and not memory.is_released(sh.module)

    def release(self, layout: Layout | str) -> int:
        """Free this rank's storage of the copy on ``layout`` (kept module, no values); bytes freed."""
        sh = self._shards.get(self.resolve(layout))
        return memory.release(sh.module) if sh is not None else 0

    def offload(self, layout: Layout | str) -> int:
        """Park the copy on ``layout`` in host memory and free its device storage; host bytes used."""
        lay = self.resolve(layout)
        sh = self._shards.get(lay)
        if sh is None or sh.module is None or memory.is_released(sh.module):
            return 0
        self._host[lay] = memory.offload(sh.module)
        return self._host[lay].nbytes

    def reload(self, layout: Layout | str) -> ModelShard:
        """Bring an offloaded copy back from host memory."""
        lay = self.resolve(layout)
        sh = self.shard(lay)
        if lay in self._host:
            memory.reload(sh.module, self._host.pop(lay))
        return sh

    # ---- moves ------------------------------------------------------------------------------
    def plan(self, src: Layout | str, dst: Layout | str) -> ReallocPlan:
        """The (cached) plan of moving this model from ``src`` to ``dst``."""
        return plan_realloc(
            self.spec,
            self.resolve(src),
            self.resolve(dst),
            gpus_per_node=self.config.gpus_per_node,
            bucket_bytes=self.config.bucket_bytes,
            element_size=dtype_size(self.config.dtype),
        )

    def move(self, src: Layout | str, dst: Layout | str, keep_source: bool = False) -> ModelShard:
        """Fill the copy on ``dst`` from the copy on ``src``; free ``src`` unless ``keep_source``.

        Keep the source of a trainable model (its training copy and optimizer state live there);
        drop a generation copy by moving back with the default, or just :meth:`release` it when
        the source copy is still current.
        """
        self._start(src, dst, keep_source, async_op=False).wait()
        return self.shard(dst)

    def move_async(self, src: Layout | str, dst: Layout | str, keep_source: bool = False) -> MoveHandle:
        """:meth:`move` on a background thread; ``wait()`` on the handle completes it."""
        return self._start(src, dst, keep_source, async_op=True)

    def _start(self, src: Layout | str, dst: Layout | str, keep_source: bool, async_op: bool) -> MoveHandle:
        s, d = self.resolve(src), self.resolve(dst)
        if s in self._host:  # an offloaded source comes back first
            self.reload(s)
        self._host.pop(d, None)  # an offloaded destination copy is about to be overwritten
        src_shard = self.shard(s)
        dst_shard = self.shard(d)
        if s == d:
            self.last_stats = MoveStats()
            return MoveHandle.finished(self.last_stats)
        if src_shard.member and memory.is_released(src_shard.module):
            raise RuntimeError(
                f"rank {self.rank}: the copy on {s} has been released; move from a layout that holds the model"
            )
        plan = self.plan(s, d)
        if dst_shard.module is not None and memory.materialize(dst_shard.module):
            # Fresh storage is uninitialised and a move never writes vocabulary padding rows.
            g = dst_shard.groups
            zero_vocab_padding_(dst_shard.module, self.spec, g.layout.tp, g.tp_rank)
        dtypes = {p.dtype for _, p in (*src_shard.params(), *dst_shard.params())}
        if dtypes - {self.config.dtype}:
            raise ValueError(
                f"parameters are {sorted(map(str, dtypes))} but ReallocConfig.dtype is {self.config.dtype}"
            )

        def finish(stats: MoveStats) -> None:
            if not keep_source and src_shard.member:
                memory.release(src_shard.module)
            self.last_stats = stats

        return execute(
            plan, self.rank, key_tensors(src_shard), key_tensors(dst_shard), self.group, async_op, finish
        )

    def bytes_sent(self) -> int:
        """Bytes this rank sent in the latest completed move (the runtime's trace records them)."""
        return 0 if self.last_stats is None else self.last_stats.bytes_sent
