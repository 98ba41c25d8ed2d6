"""Process groups per layout, created identically on every rank.

torch.distributed requires every rank of the world to call ``new_group`` for every group, in
the same order, even for groups it is not part of; a rank that skips one hangs the others.
:class:`GroupRegistry` enforces this: groups are created only through :meth:`GroupRegistry.build`,
which walks the layouts it is given in a fixed order and creates each distinct rank set once.
The same rank set is shared by every layout that needs it (a group is a communicator, not a role).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from lightning_real.layout import Layout

DEFAULT_TIMEOUT_S: dict[str, float] = {"cpu": 300.0, "cuda": 1800.0}
"""Collective timeout by device type when none is given: a CPU test that loses a rank fails in
minutes; a GPU step (generation of long responses, a large reallocation) may take many."""


def collective_timeout(timeout_s: float | None, device_type: str) -> datetime.timedelta:
    """The timeout of every process group: ``timeout_s``, else :data:`DEFAULT_TIMEOUT_S`."""
    if timeout_s is None:
        timeout_s = DEFAULT_TIMEOUT_S.get(device_type, DEFAULT_TIMEOUT_S["cuda"])
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r}; allowed: a number of seconds > 0, or None (the default)")
    return datetime.timedelta(seconds=float(timeout_s))


@dataclass
class LayoutGroups:
    """The groups one rank uses for one layout (``None`` where the rank is not a member)."""

    layout: Layout
    """The resolved layout these groups serve."""
    rank: int
    """Global rank of this process."""
    coords: tuple[int, int, int] | None
    """(dp, tp, pp) of this rank in the layout, or None if the rank is outside it."""
    tp: Any = None
    """Tensor-parallel group of this rank."""
    dp: Any = None
    """Data-parallel group of this rank."""
    pp: Any = None
    """Pipeline group of this rank."""
    mp: Any = None
    """Model-parallel (tp x pp) group of this rank: one replica."""
    embd: Any = None
    """First and last pipeline stage of this rank's pipeline (tied embeddings)."""
    pos_embd: Any = None
    """First pipeline stage alone (learned position embeddings)."""
    cp: Any = None
    """Context-parallel group (always this rank alone)."""
    all: Any = None
    """Every rank of the layout."""
    _pgc: Any = field(default=None, repr=False)

    @property
    def member(self) -> bool:
        """Whether this rank takes part in the layout."""
        return self.coords is not None

    @property
    def dp_rank(self) -> int:
        """Data-parallel index of this rank."""
        assert self.coords is not None
        return self.coords[0]

    @property
    def tp_rank(self) -> int:
        """Tensor-parallel index of this rank."""
        assert self.coords is not None
        return self.coords[1]

    @property
    def pp_rank(self) -> int:
        """Pipeline stage of this rank."""
        assert self.coords is not None
        return self.coords[2]

    @property
    def is_first_stage(self) -> bool:
        """This rank holds the embedding."""
        return self.member and self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank holds the output head."""
        return self.member and self.pp_rank == self.layout.pp - 1

    def pg_collection(self) -> Any:
        """megatron-core ``ProcessGroupCollection`` for models built on this layout."""
        if not self.member:
            raise RuntimeError(f"rank {self.rank} is not part of layout {self.layout}")
        if self._pgc is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            self._pgc = ProcessGroupCollection(
                tp=self.tp,
                pp=self.pp,
                mp=self.mp,
                embd=self.embd,
                pos_embd=self.pos_embd,
                cp=self.cp,
                tp_cp=self.tp,
                dp=self.dp,
                dp_cp=self.dp,
                tp_dp_cp=self.all,
                ep=self.cp,
                expt_tp=self.cp,
                tp_ep=self.tp,
                expt_dp=self.dp,
            )
        return self._pgc


class GroupRegistry:
    """Creates and caches process groups by rank set; every rank must call it the same way.

    ``timeout`` bounds every collective of the groups it creates (None: torch's default, 30
    minutes; RealStrategy passes its one timeout).
    """

    def __init__(self, backend: str | None = None, timeout: datetime.timedelta | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("GroupRegistry needs torch.distributed to be initialized first")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.backend = backend
        self.timeout = timeout
        self._groups: dict[tuple[int, ...], Any] = {}
        self._layouts: dict[Layout, LayoutGroups] = {}

    def group(self, ranks: tuple[int, ...]) -> Any:
        """The group over ``ranks`` (sorted), creating it collectively on first use."""
        key = tuple(sorted(ranks))
        if key not in self._groups:
            if len(key) == self.world_size:
                self._groups[key] = dist.group.WORLD
            else:
                self._groups[key] = dist.new_group(list(key), backend=self.backend, timeout=self.timeout)
        return self._groups[key]

    def _mine(self, sets: list[tuple[int, ...]]) -> Any:
        """Create all ``sets`` (collectively) and return the one holding this rank."""
        mine = None
        for s in sets:
            g = self.group(s)
            if self.rank in s:
                mine = g
        return mine

    def build(self, layouts: list[Layout]) -> list[LayoutGroups]:
        """Create the groups of each layout, in order; call with the same list on every rank."""
        return [self.for_layout(lay) for lay in layouts]

    def for_layout(self, layout: Layout) -> LayoutGroups:
        """Groups of one layout (collective on first call for that layout)."""
        lay = layout.resolve(self.world_size)
        if lay in self._layouts:
            return self._layouts[lay]
        pp_sets = lay.pp_groups()
        lg = LayoutGroups(layout=lay, rank=self.rank, coords=lay.coords(self.rank))
        lg.all = self._mine([tuple(lay.ranks or ())])
        lg.tp = self._mine(lay.tp_groups())
        lg.dp = self._mine(lay.dp_groups())
        lg.pp = self._mine(pp_sets)
        lg.mp = self._mine(lay.mp_groups())
        lg.embd = self._mine([tuple(sorted({s[0], s[-1]})) for s in pp_sets])
        lg.pos_embd = self._mine([(s[0],) for s in pp_sets])
        lg.cp = self._mine([(r,) for r in lay.ranks or ()])
        self._layouts[lay] = lg
        return lg
