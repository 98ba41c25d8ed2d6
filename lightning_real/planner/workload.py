"""What the planner prices: the runtime's own dataflow graph, each role's model, the runtime features.

A :class:`Workload` is exactly what a run executes: the :class:`~lightning_real.dataflow.DataflowGraph`
its module builds (the same calls, sizes and dependencies), the :class:`ModelSpec` of every role,
and the :class:`~lightning_real.features.RuntimeFeatures` the runtime builds its engines with.
There is no second description of a call or of an algorithm's graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lightning_real.dataflow import MFC, DataflowGraph
from lightning_real.features import RuntimeFeatures
from lightning_real.models.spec import ModelSpec

GPU_FEATURES = RuntimeFeatures(precision="bf16-mixed", optimizer="auto", attention="sdpa")
"""What a GPU run of the runtime uses and the presets assume: bf16 with fp32 master weights,
Adam states split over data-parallel replicas (ZeRO-1), SDPA attention, no recomputation,
the native generator."""


@dataclass(frozen=True)
class Workload:
    """One iteration as the runtime runs it: the graph, each role's model and the features."""

    graph: DataflowGraph
    """The calls, their sizes and dependencies (topological order)."""
    specs: Mapping[str, ModelSpec]
    """Model of each role the graph uses."""
    features: RuntimeFeatures = field(default_factory=RuntimeFeatures)
    """Precision, optimizer sharding, attention, recomputation, generation backend, offload."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form description (recipe name, sizes) for reports."""
    _features: dict[tuple[str, str | None, str | None], RuntimeFeatures] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        missing = [r for r in self.graph.roles() if r not in self.specs]
        if missing:
            raise ValueError(
                f"Workload: no ModelSpec for role {', '.join(repr(r) for r in missing)} of graph "
                f"{self.graph.name}; given: {', '.join(self.specs)}"
            )
        object.__setattr__(self, "specs", {r: self.specs[r] for r in self.graph.roles()})

    @property
    def calls(self) -> tuple[MFC, ...]:
        """Calls in topological order, each with its dependencies filled in."""
        return self.graph.calls

    @property
    def names(self) -> tuple[str, ...]:
        """Call names in order."""
        return self.graph.names

    def call(self, name: str) -> MFC:
        """The call named ``name``."""
        return self.graph.call(name)

    def spec(self, call: MFC | str) -> ModelSpec:
        """The model a call runs."""
        c = self.call(call) if isinstance(call, str) else call
        return self.specs[c.role]

    def roles(self) -> dict[str, ModelSpec]:
        """Model of each role."""
        return dict(self.specs)

    def trainable_roles(self) -> set[str]:
        """Roles whose parameters a train call updates."""
        return set(self.graph.trained_roles())

    def homes(self) -> dict[str, str]:
        """Role -> the call whose layout is its home (the runtime's rule)."""
        return self.graph.home_calls()

    def features_of(
        self, call: MFC | str, recompute: str | None = None, backend: str | None = None
    ) -> RuntimeFeatures:
        """The features ``call`` is priced with (its role's precision; recomputation in train
        calls and the generation backend of generate calls, ``recompute`` and ``backend`` being
        the plan's choices when the features leave them to the plan)."""
        c = self.call(call) if isinstance(call, str) else call
        key = (c.name, recompute, backend)
        if key not in self._features:  # the search asks for the same ones many thousand times
            self._features[key] = self.features.for_call(c.role, c.call_type, recompute, backend)
        return self._features[key]

    def choices_of(self, call: MFC | str) -> RuntimeFeatures:
        """The features the search prices ``call``'s options with: :meth:`features_of`, with
        ``'auto'`` left where the features leave a choice of this call to the plan
        (recomputation of a train call, the backend of a generate call); the options then
        carry the choice (:func:`~lightning_real.planner.space.options`)."""
        c = self.call(call) if isinstance(call, str) else call
        key = (c.name, "?", "?")
        if key not in self._features:
            f = self.features_of(c)
            if c.call_type == "train" and self.features.recompute == "auto":
                f = replace(f, recompute="auto")
            if c.call_type == "generate" and self.features.generation_backend == "auto":
                f = replace(f, generation_backend="auto")
            self._features[key] = f
        return self._features[key]

    def with_features(self, features: RuntimeFeatures) -> Workload:
        """The same iteration under other features."""
        return Workload(self.graph, self.specs, features, dict(self.meta))


def workload_from_graph(
    graph: DataflowGraph, specs: Mapping[str, ModelSpec], features: RuntimeFeatures | None = None
) -> Workload:
    """The workload of ``graph`` with ``specs`` (every role the graph uses) under ``features``
    (default: the runtime's defaults)."""
    return Workload(graph, dict(specs), features or RuntimeFeatures())


def ppo_workload(
    actor: ModelSpec,
    critic: ModelSpec | None = None,
    ref: ModelSpec | None = None,
    reward: ModelSpec | None = None,
    batch_size: int = 512,
    prompt_len: int = 128,
    gen_len: int = 128,
    ppo_minibatches: int = 1,
    features: RuntimeFeatures = GPU_FEATURES,
) -> Workload:
    """The PPO iteration of :func:`lightning_real.graphs.ppo.ppo_graph` with these models.

    Critic and reward default to the actor's trunk with a value head, the reference to the
    actor; ``features`` default to the GPU engine's (:data:`GPU_FEATURES`).
    """
    from lightning_real.graphs.ppo import ppo_graph

    critic = critic or actor.with_head("value")
    reward = reward or critic
    ref = ref or actor
    if critic.head != "value" or reward.head != "value":
        raise ValueError("ppo_workload: critic and reward models need head='value'")
    graph = ppo_graph(batch_size, minibatches=ppo_minibatches, prompt_len=prompt_len, gen_len=gen_len)
    meta = dict(
        actor_params=actor.num_params(),
        critic_params=critic.num_params(),
        batch_size=batch_size,
        prompt_len=prompt_len,
        gen_len=gen_len,
    )
    return Workload(graph, {"actor": actor, "ref": ref, "reward": reward, "critic": critic}, features, meta)
