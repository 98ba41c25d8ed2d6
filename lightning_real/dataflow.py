"""Model function calls (MFCs) and the dataflow graph that connects them through named keys.

An RLHF iteration is a handful of calls of a few models: the actor generates, the reference,
reward and critic models score the samples, the actor and critic train. Each call declares the
batch keys it reads and writes; :class:`DataflowGraph` links a call to the producers of its
input keys. Keys that no call produces are *source* keys, which the data loader supplies
(``prompts``); they must be declared, so that a misspelled key fails at construction time.

Every key holds one row per sequence of the call's batch (a generate call with ``group_size``
G reads P prompt rows and writes P x G sequence rows, each prompt's samples consecutive). The
algorithms' graphs and the keys they exchange are in :mod:`lightning_real.graphs`.

The same graph is what the runtime executes and what the planner prices: a call's sizes
(``batch_size``, ``prompt_len``, ``gen_len``, ``minibatches``) are its workload, and each
model's *home* (:meth:`DataflowGraph.home_calls`) is where the runtime keeps its persistent copy
and where the planner keeps its resident memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Literal

CallType = Literal["generate", "inference", "train"]
Role = Literal["actor", "critic", "reward", "ref"]
CALL_TYPES: tuple[str, ...] = ("generate", "inference", "train")
ROLES: tuple[str, ...] = ("actor", "critic", "reward", "ref")


class GraphError(ValueError):
    """A dataflow graph that cannot run: its message names the call and the key at fault."""


@dataclass(frozen=True)
class MFC:
    """One model function call: which model runs, how, on which keys and how many sequences."""

    name: str
    """Unique call name; plans map it to a layout ('actor_gen', 'critic_train', ...)."""
    role: Role
    """Model the call runs: 'actor', 'critic', 'reward' or 'ref'. Calls of one role share parameters."""
    call_type: CallType
    """'generate' (sample responses), 'inference' (one forward pass) or 'train' (forward,
    backward and optimizer steps)."""
    input_keys: tuple[str, ...]
    """Batch keys the call reads."""
    output_keys: tuple[str, ...]
    """Batch keys the call writes (none for a train call)."""
    batch_size: int
    """Sequences the call processes (and produces), split evenly over its data-parallel replicas."""
    n_mbs: int = 1
    """Microbatches per data-parallel replica (pipeline schedule microbatches); a plan may override it."""
    group_size: int = 1
    """Sequences per prompt. A generate call samples this many per input prompt, so it reads
    ``batch_size / group_size`` prompt rows; other calls keep each run of ``group_size``
    consecutive rows on one replica (GRPO normalises rewards within a group)."""
    minibatches: int = 1
    """Optimizer steps a train call takes over its batch (PPO minibatches); 1 for other calls."""
    greedy: bool = False
    """Generate by arg-max decoding instead of sampling (ReMax's baseline)."""
    prompt_len: int = 128
    """Prompt tokens per sequence, as the planner prices the call."""
    gen_len: int = 128
    """Generated tokens per sequence, as the planner prices the call."""
    deps: tuple[str, ...] = ()
    """Calls that must end before this one starts. :class:`DataflowGraph` adds the producers of
    the input keys; names given here are kept as extra ordering constraints without data."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise GraphError(f"MFC name={self.name!r}; allowed: a non-empty string")
        if self.role not in ROLES:
            raise GraphError(f"call {self.name}: role={self.role!r}; allowed: {', '.join(ROLES)}")
        if self.call_type not in CALL_TYPES:
            raise GraphError(
                f"call {self.name}: call_type={self.call_type!r}; allowed: {', '.join(CALL_TYPES)}"
            )
        for f in ("input_keys", "output_keys", "deps"):
            v = getattr(self, f)
            if isinstance(v, str) or not all(isinstance(k, str) for k in v):
                raise GraphError(f"call {self.name}: {f}={v!r}; allowed: a tuple of strings")
            object.__setattr__(self, f, tuple(v))
            if len(set(v)) != len(v):
                raise GraphError(f"call {self.name}: {f} names a key twice: {v!r}")
        for f in ("batch_size", "n_mbs", "group_size", "minibatches", "prompt_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GraphError(f"call {self.name}: {f}={v!r}; allowed: an integer >= 1")
        if not isinstance(self.gen_len, int) or self.gen_len < 0:
            raise GraphError(f"call {self.name}: gen_len={self.gen_len!r}; allowed: an integer >= 0")
        if self.batch_size % self.group_size:
            raise GraphError(
                f"call {self.name}: batch_size={self.batch_size} is not a multiple of group_size={self.group_size}"
            )
        if self.call_type == "train" and self.output_keys:
            raise GraphError(f"call {self.name}: a train call has no output keys, got {self.output_keys}")
        if self.call_type != "generate" and self.greedy:
            raise GraphError(f"call {self.name}: greedy=True needs call_type='generate'")
        if self.call_type != "train" and self.minibatches != 1:
            raise GraphError(f"call {self.name}: minibatches={self.minibatches} needs call_type='train'")
        if self.call_type == "generate" and self.gen_len < 1:
            raise GraphError(f"call {self.name}: a generate call needs gen_len >= 1, got {self.gen_len}")

    @property
    def input_rows(self) -> int:
        """Rows of each input key: prompts for a generate call with groups, else ``batch_size``."""
        return self.batch_size // self.group_size if self.call_type == "generate" else self.batch_size

    @property
    def seq_len(self) -> int:
        """Tokens per sequence after generation (what inference and training see)."""
        return self.prompt_len + self.gen_len

    @property
    def out_bytes_per_token(self) -> int:
        """Bytes of output per token sent to consumers (ids and log-probs; values or rewards)."""
        return {"generate": 12, "inference": 4, "train": 0}[self.call_type]

    def dp_allowed(self, dp: int) -> bool:
        """Whether ``dp`` replicas can split the call as the runtime requires: whole groups per
        replica, and for training a per-replica batch that splits into ``minibatches`` steps."""
        if (self.batch_size // self.group_size) % dp:
            return False
        return self.call_type != "train" or (self.batch_size // dp) % self.minibatches == 0


class DataflowGraph:
    """Calls linked by keys: producers, consumers, a topological order and levels.

    Construction checks that call names are unique, every input key has exactly one producer
    or is a declared source key, no call produces a source key, and the calls form no cycle.
    """

    def __init__(self, calls: Iterable[MFC], sources: Iterable[str] = ("prompts",), name: str = "graph"):
        given = list(calls)
        self.name = name
        self.sources: tuple[str, ...] = tuple(sources)
        if not given:
            raise GraphError(f"graph {name}: no calls")
        names = [c.name for c in given]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise GraphError(f"graph {name}: call names {dup} appear more than once")
        producer: dict[str, str] = {}
        for c in given:
            for k in c.output_keys:
                if k in self.sources:
                    raise GraphError(f"call {c.name} writes key {k!r}, which is a source key of the graph")
                if k in producer:
                    raise GraphError(f"key {k!r} is written by two calls: {producer[k]} and {c.name}")
                producer[k] = c.name
        for c in given:
            for k in c.input_keys:
                if k not in producer and k not in self.sources:
                    srcs = ", ".join(self.sources) or "none"
                    raise GraphError(
                        f"call {c.name} reads key {k!r}, which no call writes and which is not a source key "
                        f"(sources: {srcs})"
                    )
            for d in c.deps:
                if d not in names:
                    raise GraphError(f"call {c.name} depends on {d!r}, which is not a call of the graph")
        self._producer = producer
        deps: dict[str, tuple[str, ...]] = {}
        for c in given:
            data = [producer[k] for k in c.input_keys if k in producer]
            deps[c.name] = tuple(dict.fromkeys([*data, *c.deps]))
        loop = _cycle_or_none(names, deps)
        if loop:
            hops = []
            for a, b in pairwise(loop):
                ks = [k for k in self._by_input(given, b) if producer.get(k) == a]
                hops.append(f"{a} -({', '.join(ks) or 'deps'})-> ")
            raise GraphError(f"graph {name}: calls form a cycle: {''.join(hops)}{loop[-1]}")
        order = _topological(names, deps)
        filled = {c.name: replace(c, deps=deps[c.name]) for c in given}
        self._calls: tuple[MFC, ...] = tuple(filled[n] for n in order)
        self._by_name = {c.name: c for c in self._calls}
        level: dict[str, int] = {}
        for c in self._calls:
            level[c.name] = 1 + max((level[d] for d in c.deps), default=-1)
        self._level = level

    @staticmethod
    def _by_input(calls: list[MFC], name: str) -> tuple[str, ...]:
        return next(c.input_keys for c in calls if c.name == name)

    # ---- queries ----------------------------------------------------------------------------
    @property
    def calls(self) -> tuple[MFC, ...]:
        """Calls in topological order, each with ``deps`` filled in."""
        return self._calls

    @property
    def names(self) -> tuple[str, ...]:
        """Call names in topological order."""
        return tuple(c.name for c in self._calls)

    def topological_order(self) -> list[MFC]:
        """Calls so that each comes after every call it depends on; ties keep the given order."""
        return list(self._calls)

    def call(self, name: str) -> MFC:
        """The call named ``name``."""
        if name not in self._by_name:
            raise KeyError(f"graph {self.name} has no call {name!r}; calls: {', '.join(self.names)}")
        return self._by_name[name]

    def producer(self, key: str) -> str | None:
        """Name of the call that writes ``key``; None for a source key."""
        if key in self.sources:
            return None
        if key not in self._producer:
            raise KeyError(f"graph {self.name}: no call writes key {key!r}")
        return self._producer[key]

    def consumers(self, key: str) -> tuple[str, ...]:
        """Names of the calls that read ``key``, in topological order."""
        return tuple(c.name for c in self._calls if key in c.input_keys)

    def parents(self, name: str) -> tuple[str, ...]:
        """Calls that ``name`` waits for."""
        return self.call(name).deps

    def children(self, name: str) -> tuple[str, ...]:
        """Calls that wait for ``name``."""
        self.call(name)
        return tuple(c.name for c in self._calls if name in c.deps)

    def level(self, name: str) -> int:
        """Length of the longest chain of calls before ``name`` (0 for calls reading only sources)."""
        self.call(name)
        return self._level[name]

    def levels(self) -> list[tuple[str, ...]]:
        """Calls grouped by level: calls of one level do not depend on each other."""
        out: list[list[str]] = [[] for _ in range(max(self._level.values()) + 1)]
        for c in self._calls:
            out[self._level[c.name]].append(c.name)
        return [tuple(x) for x in out]

    def roles(self) -> tuple[str, ...]:
        """Models the graph uses, in order of first use."""
        return tuple(dict.fromkeys(c.role for c in self._calls))

    def home_calls(self) -> dict[str, str]:
        """Role -> the call whose layout is the role's *home*: its train call (where its optimizer
        state lives), or its first call when it is not trained. The runtime keeps each model's
        persistent copy there and the planner its resident memory; other calls get moved copies."""
        out: dict[str, str] = {}
        for c in self._calls:
            if c.call_type == "train":
                out.setdefault(c.role, c.name)
        for c in self._calls:
            out.setdefault(c.role, c.name)
        return {r: out[r] for r in self.roles()}

    def trained_roles(self) -> tuple[str, ...]:
        """Roles a train call updates, in order of first use."""
        return tuple(dict.fromkeys(c.role for c in self._calls if c.call_type == "train"))

    def keys(self) -> tuple[str, ...]:
        """Every key: sources first, then outputs in call order."""
        return (*self.sources, *(k for c in self._calls for k in c.output_keys))

    def edges(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """``(producer, consumer, keys)`` per linked pair; the producer is ``'<source>'`` for source keys."""
        out: list[tuple[str, str, tuple[str, ...]]] = []
        for c in self._calls:
            by: dict[str, list[str]] = {}
            for k in c.input_keys:
                by.setdefault(self._producer.get(k, "<source>"), []).append(k)
            out.extend((p, c.name, tuple(ks)) for p, ks in by.items())
        return out

    def __iter__(self) -> Iterator[MFC]:
        return iter(self._calls)

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __repr__(self) -> str:
        return f"DataflowGraph({self.name}: {' -> '.join('{' + ', '.join(lv) + '}' for lv in self.levels())})"

    # ---- rendering --------------------------------------------------------------------------
    def to_text(self) -> str:
        """One line per call, by level: ``L1 ref_inf [ref inference, 512 seqs, 1 mbs]: seq -> ref_logp``."""
        lines = [f"graph {self.name} (sources: {', '.join(self.sources)})"]
        for c in self._calls:
            extra = [f"{c.batch_size} seqs", f"{c.n_mbs} mbs"]
            if c.group_size > 1:
                extra.append(f"groups of {c.group_size}")
            if c.minibatches > 1:
                extra.append(f"{c.minibatches} minibatches")
            if c.greedy:
                extra.append("greedy")
            outs = ", ".join(c.output_keys) or "(updates " + c.role + ")"
            lines.append(
                f"L{self._level[c.name]} {c.name} [{c.role} {c.call_type}, {', '.join(extra)}]: "
                f"{', '.join(c.input_keys)} -> {outs}"
            )
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz source: calls as boxes coloured by role, edges labelled with the keys they carry."""
        colours = {"actor": "#f4a582", "critic": "#92c5de", "reward": "#b8e186", "ref": "#d9d9d9"}
        out = [f'digraph "{self.name}" {{', "  rankdir=LR;", '  node [fontname="Helvetica"];']
        if any(p == "<source>" for p, _, _ in self.edges()):
            out.append('  "<source>" [shape=ellipse, label="data"];')
        for c in self._calls:
            label = f"{c.name}\\n{c.role} {c.call_type}"
            out.append(
                f'  "{c.name}" [shape=box, style=filled, fillcolor="{colours[c.role]}", label="{label}"];'
            )
        for p, name, ks in self.edges():
            out.append(f'  "{p}" -> "{name}" [label="{", ".join(ks)}"];')
        out.append("}")
        return "\n".join(out)


def _kahn(names: list[str], deps: Mapping[str, tuple[str, ...]]) -> tuple[list[str], dict[str, set[str]]]:
    """Kahn's order (ties by position in ``names``) and the calls it could not place."""
    pending = {n: set(deps[n]) for n in names}
    order: list[str] = []
    while pending:
        ready = [n for n in names if n in pending and not pending[n]]
        if not ready:
            break
        n = ready[0]
        order.append(n)
        del pending[n]
        for rest in pending.values():
            rest.discard(n)
    return order, pending


def _topological(names: list[str], deps: Mapping[str, tuple[str, ...]]) -> list[str]:
    order, pending = _kahn(names, deps)
    assert not pending
    return order


def _cycle_or_none(names: list[str], deps: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """One cycle in data-flow order (first call repeated at the end), or None."""
    _, pending = _kahn(names, deps)
    if not pending:
        return None
    # Every unplaced call waits for another unplaced call, so following the waits revisits one.
    path = [next(n for n in names if n in pending)]
    while True:
        nxt = min(pending[path[-1]], key=names.index)
        if nxt in path:
            return list(reversed([*path[path.index(nxt) :], nxt]))
        path.append(nxt)
