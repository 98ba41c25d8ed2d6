"""Each model's home copy and its moves to the layouts of its calls.

A model's *home* is the layout of its training call (where its optimizer state lives), or of its
first call when it is not trained. Before a call on another layout, the pool moves the current
parameters from home to that layout (keeping home), and afterwards drops the call's copy, so a
trained model never serves a stale copy and memory holds at most one extra copy per model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lightning_real.layout import Layout
from lightning_real.models.shard import ModelShard
from lightning_real.realloc import MoveStats, Reallocator


@dataclass
class PooledModel:
    """One model of the pool on this rank."""

    role: str
    """actor, critic, reward or ref."""
    home: ModelShard
    """The copy that persists across iterations (training copy for trained models)."""
    reallocator: Reallocator | None
    """Moves copies to other layouts (None: the model only ever runs on its home layout)."""
    keep_copies: bool = False
    """Keep call copies between iterations (only for frozen models: their copies never go stale)."""
    _live: set[Layout] = field(default_factory=set)


@dataclass(frozen=True)
class MoveRecord:
    """One move this rank took part in."""

    role: str
    """The model moved."""
    src: Layout
    """Its home layout."""
    dst: Layout
    """The call's layout."""
    stats: MoveStats
    """What this rank sent, received and copied, and where its bytes went."""


class ModelPool:
    """Models by role; ``move``/``release`` have the runtime's Mover/release signatures."""

    def __init__(self) -> None:
        self.models: dict[str, PooledModel] = {}
        self.bytes_moved = 0
        self.moves: deque[MoveRecord] = deque(maxlen=1024)
        """The latest moves of this rank, oldest first."""

    def add(self, model: PooledModel) -> None:
        """Register a role's model (its home shard already built and loaded on every rank)."""
        if model.reallocator is not None:
            model.reallocator.adopt(model.home)
        self.models[model.role] = model

    def move(self, role: str, layout: Layout) -> tuple[ModelShard | None, int]:
        """The role's shard on ``layout`` (moving parameters there if needed), and bytes sent."""
        m = self.models.get(role)
        if m is None:  # a call without a model (e.g. a rule-based reward)
            return None, 0
        if layout == m.home.layout:
            return m.home, 0
        if m.reallocator is None:
            raise RuntimeError(f"model {role!r} has no reallocator but its call runs on {layout}")
        if m.keep_copies and layout in m._live:
            return m.reallocator.shard(layout), 0
        shard = m.reallocator.move(m.home.layout, layout, keep_source=True)
        m._live.add(layout)
        stats = m.reallocator.last_stats or MoveStats()
        self.moves.append(MoveRecord(role, m.home.layout, layout, stats))
        self.bytes_moved += stats.bytes_sent
        return shard, stats.bytes_sent

    def release(self, role: str, layout: Layout) -> None:
        """Drop the call's copy on ``layout`` after the call (home copies stay)."""
        m = self.models.get(role)
        if m is None or m.reallocator is None or layout == m.home.layout or m.keep_copies:
            return
        m.reallocator.release(layout)
        m._live.discard(layout)
