"""Per-rank timing of model function calls, reallocations and data moves; Chrome-trace export.

Every rank records wall-clock intervals (``time.time`` so ranks on one host share a clock).
:func:`gather_events` collects all ranks' events; :func:`to_chrome_trace` writes the JSON format
that Perfetto (ui.perfetto.dev) and chrome://tracing open: one row per rank, one bar per event.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lightning_real.distributed.status import StatusBoard


@dataclass(frozen=True)
class Event:
    """One timed interval on one rank."""

    name: str
    """Call name (``actor_gen``), or ``realloc:<model>`` / ``data:<key>``."""
    kind: str
    """'call', 'realloc' or 'data'."""
    rank: int
    """Global rank that recorded it."""
    start: float
    """Wall-clock start (seconds since the epoch)."""
    end: float
    """Wall-clock end."""
    nbytes: int = 0
    """Bytes this rank sent (realloc and data moves)."""
    step: int = 0
    """Training step the event belongs to."""

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.end - self.start


@dataclass
class Tracer:
    """Records events of this rank; cheap enough to stay on in production runs."""

    rank: int
    """Global rank of this process."""
    step: int = 0
    """Current training step, stamped on new events."""
    events: list[Event] = field(default_factory=list)
    """Everything recorded so far (cleared by :meth:`pop`)."""
    status: StatusBoard | None = None
    """Where this rank's current span is written for its peers (None: nowhere)."""

    @contextlib.contextmanager
    def span(
        self, name: str, kind: str = "call", nbytes: int = 0, label: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Time a block; the yielded dict may set ``nbytes`` after the fact. ``label`` is the
        phase the status board shows during the block (default: ``name``)."""
        info: dict[str, Any] = {"nbytes": nbytes}
        phase = (
            self.status.phase(label or name, self.step)
            if self.status is not None
            else contextlib.nullcontext()
        )
        t0 = time.time()
        try:
            with phase:
                yield info
        finally:
            self.events.append(Event(name, kind, self.rank, t0, time.time(), int(info["nbytes"]), self.step))

    def pop(self) -> list[Event]:
        """Return and forget the recorded events."""
        out, self.events = self.events, []
        return out


def gather_events(events: list[Event], group: Any = None) -> list[Event]:
    """All ranks' events on every rank (collective over ``group``)."""
    if not dist.is_initialized():
        return list(events)
    out: list[list[Event] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, list(events), group=group)
    return [e for part in out for e in (part or [])]


def summarize(events: list[Event]) -> dict[str, float]:
    """``timing_s/<call>`` (longest rank, per step on average), ``timing_s/realloc`` and bytes."""
    steps = max(1, len({e.step for e in events}))
    per_call: dict[tuple[str, int], tuple[float, float]] = {}
    for e in events:
        if e.kind != "call":
            continue
        lo, hi = per_call.get((e.name, e.step), (e.start, e.end))
        per_call[(e.name, e.step)] = (min(lo, e.start), max(hi, e.end))
    out: dict[str, float] = {}
    for (name, _), (lo, hi) in per_call.items():
        out[f"timing_s/{name}"] = out.get(f"timing_s/{name}", 0.0) + (hi - lo) / steps
    realloc = [e for e in events if e.kind == "realloc"]
    if realloc:
        by_rank: dict[int, float] = {}
        for e in realloc:
            by_rank[e.rank] = by_rank.get(e.rank, 0.0) + e.duration
        out["timing_s/realloc"] = max(by_rank.values()) / steps
        out["realloc/bytes"] = float(sum(e.nbytes for e in realloc)) / steps
    data = [e for e in events if e.kind == "data"]
    if data:
        out["data/bytes"] = float(sum(e.nbytes for e in data)) / steps
    return out


def to_chrome_trace(events: list[Event], path: str | Path) -> Path:
    """Write events as a Chrome trace (JSON); returns the path."""
    t0 = min((e.start for e in events), default=0.0)
    colors = {"call": "thread_state_running", "realloc": "bad", "data": "generic_work"}
    trace = []
    for e in events:
        trace.append(
            {
                "name": e.name,
                "cat": e.kind,
                "ph": "X",
                "ts": (e.start - t0) * 1e6,
                "dur": max(e.duration, 1e-6) * 1e6,
                "pid": 0,
                "tid": e.rank,
                "cname": colors.get(e.kind, "generic_work"),
                "args": {"bytes": e.nbytes, "step": e.step},
            }
        )
    for r in sorted({e.rank for e in events}):
        trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms"}))
    return path
