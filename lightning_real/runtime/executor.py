"""Runs one iteration of a dataflow graph on this rank under a plan.

Every rank walks the calls in the same topological order and takes part only in the steps that
involve it: moving a model's parameters to the call's layout (source and destination ranks),
moving the call's input rows from their producers (producer and consumer ranks), and running the
call (ranks of its layout). Each step's communication is point to point among its participants
and in the same global order on every rank, so calls on disjoint ranks run at the same time and
nothing can deadlock. Calls on shared ranks run one after the other in graph order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.dataflow import MFC
from lightning_real.layout import Layout
from lightning_real.runtime.trace import Tracer
from lightning_real.runtime.transfer import post_sends, receive, row_range

CallFn = Callable[[Any, dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], dict[str, float]]]
"""A call's body on one rank of its layout: (model shard or None, input rows) -> (output rows, metrics)."""

Mover = Callable[[str, Layout], tuple[Any, int]]
"""Makes role ``r``'s parameters available on ``layout``: returns (shard on this rank, bytes sent)."""


@dataclass
class IterationResult:
    """What one iteration produced on this rank."""

    metrics: dict[str, float] = field(default_factory=dict)
    """Metrics reported by the calls this rank ran (train losses etc.)."""
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """This rank's rows of every key it produced or received (for tests and debugging)."""


class Executor:
    """Walks ``calls`` (already in topological order) under ``plan`` on this rank."""

    def __init__(
        self,
        calls: list[MFC],
        plan: dict[str, Layout],
        fns: dict[str, CallFn],
        move: Mover,
        rank: int,
        tracer: Tracer | None = None,
        device: torch.device | None = None,
        release: Callable[[str, Layout], None] | None = None,
        data_group: Any = None,
    ) -> None:
        missing = [c.name for c in calls if c.name not in plan]
        if missing:
            raise KeyError(f"the plan has no layout for calls {missing}")
        nofn = [c.name for c in calls if c.name not in fns]
        if nofn:
            raise KeyError(f"no implementation for calls {nofn}")
        self.calls = calls
        self.plan = plan
        self.fns = fns
        self.move = move
        self.release = release
        self.rank = rank
        self.tracer = tracer or Tracer(rank)
        self.device = device
        self.data_group = data_group
        """gloo group over all ranks for batch rows (the default group when it is gloo)."""

    def run(self, source: dict[str, torch.Tensor]) -> IterationResult:
        """One iteration. ``source`` holds the global rows of the source keys on every rank."""
        # key -> (index of its producer call or -1 for source keys, its global row count)
        origin: dict[str, tuple[int, int]] = {k: (-1, int(v.shape[0])) for k, v in source.items()}
        held: dict[str, torch.Tensor] = dict(source)  # this rank's rows of every key it has
        pending: list[Any] = []
        result = IterationResult()
        for ci, call in enumerate(self.calls):
            self._phase(f"preparing {call.name}")
            layout = self.plan[call.name]
            c = layout.coords(self.rank)
            inputs = self._receive_inputs(ci, call, layout, origin, held)
            with self.tracer.span(
                f"realloc:{call.role}", kind="realloc", label=f"realloc of {call.role} for {call.name}"
            ) as info:
                shard, info["nbytes"] = self.move(call.role, layout)
            outputs: dict[str, torch.Tensor] = {}
            if c is not None:
                with self.tracer.span(call.name, kind="call"):
                    outputs, metrics = self.fns[call.name](shard, inputs or {})
                result.metrics.update(metrics)
                missing = [k for k in call.output_keys if k not in outputs]
                if missing:
                    raise KeyError(f"call {call.name} did not produce its outputs {missing}")
                rows = int(next(iter(outputs.values())).shape[0]) * layout.dp if outputs else call.batch_size
                if rows != call.batch_size:
                    raise ValueError(
                        f"call {call.name} produced {rows} rows over dp={layout.dp}, declared {call.batch_size}"
                    )
                held.update(outputs)
                result.outputs.update(outputs)
            if self.release is not None:
                self.release(call.role, layout)
            for k in call.output_keys:
                origin[k] = (ci, int(call.batch_size))
            # Push this call's outputs to later consumers now, without waiting for them.
            for cj in range(ci + 1, len(self.calls)):
                keys = sorted(k for k in self.calls[cj].input_keys if origin.get(k, (None,))[0] == ci)
                if keys:
                    self._phase(f"sending rows of {call.name} to {self.calls[cj].name}")
                    h, n = post_sends(
                        {k: held[k] for k in keys} if c is not None else None,
                        layout,
                        self.plan[self.calls[cj].name],
                        call.batch_size,
                        self.rank,
                        self.data_group,
                        self._tag(ci, cj),
                    )
                    pending.extend(h)
                    result.metrics["data/bytes_sent"] = result.metrics.get("data/bytes_sent", 0.0) + n
        self._phase("waiting for rows sent to other ranks")
        for work, _ in pending:
            work.wait()
        return result

    def _phase(self, name: str) -> None:
        # what peers read when a collective fails; spans (calls, moves, receives) set their own
        if self.tracer.status is not None:
            self.tracer.status.enter(name, self.tracer.step)

    def _tag(self, producer: int, consumer: int) -> int:
        return (producer * len(self.calls) + consumer + 1) * 65536

    def _receive_inputs(
        self, ci: int, call: MFC, layout: Layout, origin: dict, held: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """This rank's input rows for ``call`` (None outside its layout)."""
        c = layout.coords(self.rank)
        by_producer: dict[int, list[str]] = {}
        for k in call.input_keys:
            if k not in origin:
                raise KeyError(f"call {call.name} needs key {k!r} that no earlier call produced")
            by_producer.setdefault(origin[k][0], []).append(k)
        if c is None:
            return None
        out: dict[str, torch.Tensor] = {}
        for pi, keys in by_producer.items():
            rows = origin[keys[0]][1]
            if pi < 0:
                lo, hi = row_range(rows, layout.dp, c[0])
                out.update({k: held[k][lo:hi] for k in keys})
                continue
            src = self.plan[self.calls[pi].name]
            mine = {k: held[k] for k in keys} if src.coords(self.rank) is not None else None
            with self.tracer.span(f"data:{call.name}", kind="data", label=f"rows for {call.name}"):
                got = receive(
                    sorted(keys),
                    mine,
                    src,
                    layout,
                    rows,
                    self.rank,
                    self.data_group,
                    self._tag(pi, ci),
                    self.device,
                )
            out.update(got or {})
        return out


def reduce_metrics(metrics: dict[str, float], group: Any = None) -> dict[str, float]:
    """Every rank's metrics on every rank; a key reported by several ranks is averaged."""
    if not dist.is_initialized():
        return dict(metrics)
    parts: list[dict[str, float] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, {k: float(v) for k, v in metrics.items()}, group=group)
    sums: dict[str, list[float]] = {}
    for p in parts:
        for k, v in (p or {}).items():
            sums.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}
