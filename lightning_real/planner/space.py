"""The search space: device meshes, parallel strategies and microbatch counts per call.

Device meshes follow ReaL: contiguous device ranges that are either a whole number of adjacent
nodes or a power-of-two slice of one node aligned to its size. Tensor parallelism stays inside a
node (tp divides the devices per node) and must divide the attention and key/value heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from lightning_real.dataflow import MFC
from lightning_real.features import GenerationBackend, Recompute, RuntimeFeatures
from lightning_real.layout import Layout
from lightning_real.models.spec import ModelSpec
from lightning_real.planner.cost import CallCost, call_cost
from lightning_real.planner.hardware import Cluster
from lightning_real.planner.memory import call_memory

MICROBATCH_CHOICES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GENERATE_ROUNDS = 3
"""Round counts a generate call keeps per strategy: the fewest that fit on their own, and the next
two (the whole plan's memory may need more than one call alone)."""


@dataclass(frozen=True)
class Mesh:
    """A contiguous range of devices."""

    start: int
    """First device."""
    size: int
    """Number of devices."""

    @property
    def ranks(self) -> tuple[int, ...]:
        """The devices, in order."""
        return tuple(range(self.start, self.start + self.size))

    def __str__(self) -> str:
        return f"{self.start}" if self.size == 1 else f"{self.start}-{self.start + self.size - 1}"


@dataclass(frozen=True)
class Option:
    """A parallel strategy and microbatch count for a call on a mesh of some size, with its cost."""

    dp: int
    """Data-parallel degree."""
    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline-parallel degree."""
    m: int
    """Microbatches per replica."""
    cost: CallCost
    """Time and memory under this strategy."""
    recompute: str = "none"
    """Activation recomputation of a train call (a choice when the features say 'auto')."""
    backend: str = "native"
    """Engine of a generate call, 'native' or 'vllm' (a choice when the features say 'auto')."""

    def layout(self, mesh: Mesh) -> Layout:
        """This strategy placed on ``mesh``."""
        return _placed(self.dp, self.tp, self.pp, mesh)


@lru_cache(maxsize=1 << 16)
def _placed(dp: int, tp: int, pp: int, mesh: Mesh) -> Layout:
    # The search builds the same layouts over and over; Layout validates on construction.
    return Layout(dp, tp, pp, mesh.ranks)


def meshes(cluster: Cluster) -> tuple[Mesh, ...]:
    """Every device mesh a call may use, sub-node slices first, then multi-node ranges."""
    g = cluster.gpus_per_node
    out: list[Mesh] = []
    size = 1
    while size < g:
        if g % size == 0:
            for node in range(cluster.nodes):
                for off in range(0, g, size):
                    out.append(Mesh(node * g + off, size))
        size *= 2
    for k in range(1, cluster.nodes + 1):
        for a in range(cluster.nodes - k + 1):
            out.append(Mesh(a * g, k * g))
    return tuple(out)


def strategies(call: MFC, spec: ModelSpec, n: int, gpus_per_node: int) -> list[tuple[int, int, int]]:
    """``(dp, tp, pp)`` with ``dp * tp * pp == n`` that this call of ``spec`` can use (dp must split
    its batch evenly, as the runtime requires)."""
    out = []
    for tp in range(1, n + 1):
        if n % tp or gpus_per_node % tp or spec.num_heads % tp or spec.num_kv_heads % tp:
            continue
        for pp in range(1, n // tp + 1):
            if (n // tp) % pp or pp > spec.num_layers:
                continue
            dp = n // (tp * pp)
            if not call.dp_allowed(dp):
                continue
            out.append((dp, tp, pp))
    return out


def microbatch_choices(call: MFC, dp: int, pp: int) -> list[int]:
    """Microbatch counts worth trying: powers of two up to the sequences a replica sees per step.

    For generation they are rounds (the rows generated one group after another, each with its
    own KV cache): more rounds are slower, so only a KV cache that does not fit makes them win.
    """
    per_step = -(-call.batch_size // dp)
    if call.call_type == "train":
        per_step = -(-per_step // call.minibatches)
    return [m for m in MICROBATCH_CHOICES if m <= per_step]


def backend_choices(call: MFC, features: RuntimeFeatures) -> tuple[GenerationBackend, ...]:
    """Generation engines a call may run on: both for a generate call whose features say
    'auto', else the one they name ('native' for calls that generate nothing)."""
    if call.call_type != "generate":
        return ("native",)
    if features.generation_backend == "auto":
        return ("native", "vllm")
    return (features.generation_backend,)


def vllm_unavailable(call: MFC, spec: ModelSpec, n: int, pp: int, cluster: Cluster) -> str | None:
    """Why the vllm backend cannot run ``call`` on ``n`` devices with ``pp`` stages (None: it can).

    The runtime's rules (``runtime/vllm_generation.py``, ``check_vllm_layout``): one engine per
    data-parallel replica, tensor-parallel over its ranks, no pipeline parallelism, and a layout
    over every rank of the world (an in-process engine adopts the whole torch.distributed world).
    """
    if pp != 1:
        return f"pp={pp}: vLLM engines run no pipeline parallelism"
    if n != cluster.n_devices:
        return f"{n} of the {cluster.n_devices} devices: a vLLM generate call spans the whole world"
    if spec.head != "lm":
        return f"a {spec.head!r} head: vLLM generates from 'lm' heads"
    return None


@lru_cache(maxsize=4096)
def options(
    call: MFC, spec: ModelSpec, n: int, cluster: Cluster, features: RuntimeFeatures
) -> tuple[Option, ...]:
    """Every strategy of ``call`` (running ``spec``) on ``n`` devices that fits in memory on its
    own under ``features``, fastest first.

    "On its own" counts the call's full memory (parameters included), the case of a call that
    does not run at its model's home; the simulator checks the whole plan. Where the features
    leave a choice to the plan ('auto'), every choice is an option of its own: recomputation of
    train calls, the engine of generate calls (vLLM options: ``dNtTp1`` over all ``n`` devices
    of the cluster only, one microbatch: continuous batching does not take the plan's rounds).
    """
    usable = cluster.hw.usable_mem
    choices: tuple[Recompute, ...] = (
        ("none", "selective", "full") if features.recompute == "auto" else (features.recompute,)
    )
    engines = backend_choices(call, features)
    native = replace(features, generation_backend="native")
    on_vllm = replace(features, generation_backend="vllm")
    vllm_fits = "vllm" in engines and call.seq_len <= features.vllm.model_len(spec.max_position_embeddings)
    out = []
    for dp, tp, pp in strategies(call, spec, n, cluster.gpus_per_node):
        if "native" in engines:
            rounds = 0
            for m in microbatch_choices(call, dp, pp):
                if call.call_type == "generate" and rounds == GENERATE_ROUNDS:
                    break  # more rounds are only slower: the fewest that fit (and two more) suffice
                for rc in choices:
                    f = replace(native, recompute=rc)
                    # Memory is cheap to price, time is not: skip what cannot fit first.
                    if call_memory(call, spec, dp, tp, pp, m, f).total > usable:
                        continue
                    out.append(Option(dp, tp, pp, m, call_cost(call, spec, dp, tp, pp, m, cluster, f), rc))
                    rounds += 1
        if vllm_fits and vllm_unavailable(call, spec, n, pp, cluster) is None:
            if call_memory(call, spec, dp, tp, pp, 1, on_vllm).total > usable:
                continue
            cost = call_cost(call, spec, dp, tp, pp, 1, cluster, on_vllm)
            if cost.time < float("inf"):  # not one sequence's KV cache fits: not an option
                out.append(Option(dp, tp, pp, 1, cost, on_vllm.recompute, "vllm"))
    out.sort(key=lambda o: (o.cost.time, o.cost.memory.total))
    return tuple(out)


def no_vllm_option_why(call: MFC, spec: ModelSpec, cluster: Cluster, features: RuntimeFeatures) -> str:
    """Why a generate call fixed to the vllm backend has no option on this cluster (for errors)."""
    n = cluster.n_devices
    f = replace(features, generation_backend="vllm")
    limit = f.vllm.model_len(spec.max_position_embeddings)
    if call.seq_len > limit:
        return f"its {call.seq_len} tokens per sequence exceed the engine's max_model_len {limit}"
    flat = [s for s in strategies(call, spec, n, cluster.gpus_per_node) if s[2] == 1]
    if not flat:
        return f"no dNtTp1 strategy over all {n} devices suits the call (dp must split its batch)"
    reasons = []
    for dp, tp, pp in flat:
        mem = call_memory(call, spec, dp, tp, pp, 1, f)
        if mem.total > cluster.hw.usable_mem:
            reasons.append(f"d{dp}t{tp}p1 needs {mem.describe()}")
        else:
            reasons.append(
                f"d{dp}t{tp}p1: not one sequence's KV cache fits vllm.kv_cache_bytes={f.vllm.kv_cache_bytes}"
            )
    return "; ".join(reasons)
