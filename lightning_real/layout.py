"""Layouts: which global ranks a model function call uses and how it splits the model there.

A layout string reads ``d{dp}t{tp}p{pp}[@ranks]``: ``d2t2p1@0-3`` is data parallel 2, tensor
parallel 2, pipeline parallel 1 on global ranks 0..3; ``d4t1p2`` uses every rank of the world.
The degree letters may come in any order (``d4p2t1`` is ReaL's spelling); the canonical form
is ``d..t..p..``. Ranks are ``a-b`` ranges and single ranks joined by commas (``0-1,4-5``).

Within a layout, local index ``i`` (position in ``ranks``) maps to coordinates with tensor
parallel fastest, then data parallel, then pipeline parallel, as megatron-core orders them
by default (``tp-dp-pp``): ``tp = i % tp``, ``dp = (i // tp) % dp``, ``pp = i // (tp * dp)``.

Ranks must be listed in increasing order. torch.distributed numbers the members of a group by
increasing global rank, and megatron-core splits heads and vocabulary by that group-local rank;
increasing ranks make it equal to the layout's tp (and dp, pp) coordinate in every group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class LayoutError(ValueError):
    """A layout that cannot run: its message names the layout and what is wrong."""


_DEGREE = re.compile(r"([dtp])(\d+)")


def _parse_ranks(text: str, layout: str) -> tuple[int, ...]:
    ranks: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise LayoutError(
                f"layout {layout!r}: cannot read ranks {text!r}; write ranges and ranks like '0-3' or '0-1,4-5'"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise LayoutError(f"layout {layout!r}: rank range {part!r} runs backwards")
        ranks.extend(range(lo, hi + 1))
    return tuple(ranks)


def format_ranks(ranks: tuple[int, ...]) -> str:
    """Compact form of a rank list: ``(0, 1, 2, 3, 6)`` -> ``'0-3,6'``."""
    parts: list[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class Layout:
    """Where and how one model function call runs."""

    dp: int
    """Data-parallel degree: replicas that each take a slice of the batch."""
    tp: int
    """Tensor-parallel degree: each weight matrix is split across this many ranks."""
    pp: int
    """Pipeline-parallel degree: the layers are split into this many consecutive stages."""
    ranks: tuple[int, ...] | None = None
    """Global ranks used, in increasing order; ``None`` means every rank of the world."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LayoutError(f"layout {self}: {name} must be a positive integer, got {v!r}")
        if self.ranks is not None:
            if len(set(self.ranks)) != len(self.ranks):
                raise LayoutError(f"layout {self}: a rank appears twice in {self.ranks}")
            if any(r < 0 for r in self.ranks):
                raise LayoutError(f"layout {self}: ranks must be >= 0")
            if list(self.ranks) != sorted(self.ranks):
                raise LayoutError(
                    f"layout {self}: the ranks after '@' must be in increasing order, got {format_ranks(self.ranks)}; "
                    f"allowed: increasing ranks such as '{format_ranks(tuple(sorted(self.ranks)))}' "
                    "(process groups number their members by increasing rank, so another order "
                    "would not match the layout's tensor/pipeline coordinates)"
                )
            if len(self.ranks) != self.size:
                raise LayoutError(
                    f"layout {self}: dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = {self.size} "
                    f"but {len(self.ranks)} ranks are given ({format_ranks(self.ranks)})"
                )

    # ---- text form -------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> Layout:
        """Read ``d2t2p1@0-3`` / ``d4p2t1`` / ``d8``; missing degrees default to 1."""
        if isinstance(text, Layout):
            return text
        if not isinstance(text, str) or not text.strip():
            raise LayoutError(f"layout {text!r}: expected a string like 'd2t2p1@0-3' or 'd4t1p2'")
        s = text.strip().replace(" ", "")
        body, _, rank_text = s.partition("@")
        degrees: dict[str, int] = {}
        pos = 0
        for m in _DEGREE.finditer(body):
            if m.start() != pos:
                break
            if m.group(1) in degrees:
                raise LayoutError(f"layout {text!r}: degree {m.group(1)!r} is given twice")
            degrees[m.group(1)] = int(m.group(2))
            pos = m.end()
        if pos != len(body) or not degrees:
            raise LayoutError(
                f"layout {text!r}: expected degrees like 'd2t2p1' (d=data, t=tensor, p=pipeline parallel), "
                "optionally followed by '@' and ranks like '0-3'"
            )
        ranks = _parse_ranks(rank_text, text) if rank_text else None
        return cls(dp=degrees.get("d", 1), tp=degrees.get("t", 1), pp=degrees.get("p", 1), ranks=ranks)

    def __str__(self) -> str:
        base = f"d{self.dp}t{self.tp}p{self.pp}"
        return base if self.ranks is None else f"{base}@{format_ranks(self.ranks)}"

    # ---- geometry ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of ranks the layout occupies."""
        return self.dp * self.tp * self.pp

    def resolve(self, world_size: int) -> Layout:
        """The same layout with explicit ranks, checked against ``world_size``."""
        if self.ranks is None:
            if self.size != world_size:
                raise LayoutError(
                    f"layout {self}: dp*tp*pp = {self.size} must equal the world size {world_size} "
                    f"when no ranks are given (or add ranks, e.g. '{self}@0-{self.size - 1}')"
                )
            return Layout(self.dp, self.tp, self.pp, tuple(range(world_size)))
        bad = [r for r in self.ranks if r >= world_size]
        if bad:
            raise LayoutError(f"layout {self}: ranks {bad} are out of range for world size {world_size}")
        return self

    def _ranks(self) -> tuple[int, ...]:
        if self.ranks is None:
            raise LayoutError(f"layout {self}: ranks are unknown; call resolve(world_size) first")
        return self.ranks

    def coords(self, rank: int) -> tuple[int, int, int] | None:
        """``(dp, tp, pp)`` coordinates of a global rank, or ``None`` if it is not in the layout."""
        ranks = self._ranks()
        if rank not in ranks:
            return None
        i = ranks.index(rank)
        return (i // self.tp) % self.dp, i % self.tp, i // (self.tp * self.dp)

    def rank_at(self, dp: int, tp: int, pp: int) -> int:
        """Global rank at the given coordinates."""
        return self._ranks()[tp + self.tp * (dp + self.dp * pp)]

    def tp_groups(self) -> list[tuple[int, ...]]:
        """Rank tuples of every tensor-parallel group."""
        return [
            tuple(self.rank_at(d, t, p) for t in range(self.tp))
            for p in range(self.pp)
            for d in range(self.dp)
        ]

    def dp_groups(self) -> list[tuple[int, ...]]:
        """Rank tuples of every data-parallel group."""
        return [
            tuple(self.rank_at(d, t, p) for d in range(self.dp))
            for p in range(self.pp)
            for t in range(self.tp)
        ]

    def pp_groups(self) -> list[tuple[int, ...]]:
        """Rank tuples of every pipeline group (first stage first)."""
        return [
            tuple(self.rank_at(d, t, p) for p in range(self.pp))
            for d in range(self.dp)
            for t in range(self.tp)
        ]

    def mp_groups(self) -> list[tuple[int, ...]]:
        """Rank tuples of every model-parallel (tp x pp) group: one full model replica each."""
        return [
            tuple(self.rank_at(d, t, p) for p in range(self.pp) for t in range(self.tp))
            for d in range(self.dp)
        ]

    def overlaps(self, other: Layout) -> bool:
        """Whether two resolved layouts share a rank."""
        return bool(set(self._ranks()) & set(other._ranks()))


def row_range(batch_size: int, dp: int, replica: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a global batch that data-parallel ``replica`` of ``dp`` processes
    (contiguous equal shares, replicas in order)."""
    if batch_size % dp:
        raise LayoutError(f"batch size {batch_size} is not divisible by dp={dp}")
    n = batch_size // dp
    return replica * n, (replica + 1) * n


def parse_layout(text: str | Layout) -> Layout:
    """Functional alias of :meth:`Layout.parse` that also passes a Layout through."""
    return text if isinstance(text, Layout) else Layout.parse(text)
