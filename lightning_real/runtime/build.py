"""Build the runtime of one run on this rank: models, reallocators and training engines.

The module declares (graph, roles, call bodies); this builds, with the strategy's configuration:

* every role's *home* shard on the layout of its home call (collective: every rank builds the
  roles in declaration order), from its HF folder or random init, in the working dtype;
* a :class:`~lightning_real.realloc.Reallocator` per role for moves to its other calls' layouts,
  planned with the run's node size (senders on the receiver's node are preferred);
* a :class:`~lightning_real.models.train.TrainEngine` per trained role, with the plan's
  microbatch count of its train call.

Features the runtime does not run yet are refused here, with the option at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lightning_real.dataflow import DataflowGraph
from lightning_real.distributed.groups import GroupRegistry
from lightning_real.features import FeatureError, RuntimeFeatures
from lightning_real.layout import Layout
from lightning_real.models.build import BuildOptions
from lightning_real.models.shard import ModelShard
from lightning_real.models.source import load_shard
from lightning_real.models.train import TrainConfig, TrainEngine
from lightning_real.plans import Plan
from lightning_real.realloc import Reallocator, ReallocConfig
from lightning_real.runtime.generation import Generator, make_generator
from lightning_real.runtime.pool import ModelPool, PooledModel
from lightning_real.runtime.roles import RoleDecl, Training

Rows = dict[str, torch.Tensor]
CallFn = Callable[[ModelShard | None, Rows], tuple[Rows, dict[str, float]]]
"""A call's body on one rank of its layout: (model shard or None, input rows) -> (output rows, metrics)."""


@dataclass(frozen=True)
class RuntimeConfig:
    """How the strategy asks the runtime to be built."""

    node_size: int
    """Devices per node: reallocation prefers senders on the receiver's node."""
    features: RuntimeFeatures = field(default_factory=RuntimeFeatures)
    """Precision, optimizer sharding, attention, recomputation, generation backend, offload."""

    def __post_init__(self) -> None:
        if not isinstance(self.node_size, int) or self.node_size < 1:
            raise ValueError(f"RuntimeConfig.node_size={self.node_size!r}; allowed: an integer >= 1")


@dataclass
class RuntimeContext:
    """What a module's ``real_setup`` receives: the built runtime of this rank."""

    graph: DataflowGraph
    """The graph the runtime executes."""
    plan: Plan
    """Every call's layout (explicit ranks) and microbatch count."""
    config: RuntimeConfig
    """Node size and features the runtime was built with."""
    rank: int
    """Global rank of this process."""
    pool: ModelPool
    """Every role's home shard and its moves to other layouts."""
    engines: dict[str, TrainEngine] = field(default_factory=dict)
    """Training engine of each trained role."""
    generators: dict[str, Generator] = field(default_factory=dict)
    """Engine of each generate call."""

    @property
    def features(self) -> RuntimeFeatures:
        """The features the runtime runs."""
        return self.config.features

    def microbatches(self, call: str) -> int:
        """Microbatches per data-parallel replica of ``call`` (the plan's, else the graph's)."""
        return self.plan.n_mbs(self.graph, call)

    def after_call(self, role: str, layout: Layout) -> None:
        """What follows a call of ``role`` on ``layout``: its moved copy is dropped, and after a
        train call at home the gradient buffer is freed (the planner prices it as transient)."""
        self.pool.release(role, layout)
        engine = self.engines.get(role)
        if engine is not None and layout == engine.shard.layout:
            engine.release_grads()

    def generator(self, call: str) -> Generator:
        """The engine of generate call ``call``."""
        if call not in self.generators:
            raise KeyError(
                f"no generation engine for call {call!r}; generate calls: {', '.join(self.generators)}"
            )
        return self.generators[call]

    def engine(self, role: str) -> TrainEngine:
        """The training engine of ``role``."""
        if role not in self.engines:
            raise KeyError(f"no training engine for role {role!r}; trained roles: {', '.join(self.engines)}")
        return self.engines[role]


RUNNABLE: dict[str, tuple[object, ...]] = {
    "generation_backend": ("native", "vllm", "auto"),
    "offload_idle": (False,),
}
"""Feature values this runtime builds, where it builds fewer than the declaration allows."""


def check_features(features: RuntimeFeatures) -> None:
    """Refuse features this runtime cannot run, naming the option and the values it can."""
    for name, value in features.to_dict().items():
        if name in RUNNABLE and value not in RUNNABLE[name]:
            allowed = ", ".join(repr(v) for v in RUNNABLE[name])
            raise FeatureError(f"{name}={value!r} is not available in this runtime; allowed: {allowed}")


def check_plan_backends(features: RuntimeFeatures, plan: Plan) -> None:
    """Refuse a plan whose generation backends the features fix otherwise."""
    fixed = features.generation_backend
    for call, b in plan.backends.items():
        if fixed != "auto" and b != fixed:
            raise FeatureError(
                f"plan {plan.name} runs {call} on the {b} backend, but engine.generation_backend is "
                f"{fixed!r}; allowed: engine.generation_backend=auto (the plan chooses), or a plan "
                "without backends"
            )


def build_options(features: RuntimeFeatures, trained: bool) -> BuildOptions:
    """How a role's models are built under ``features`` (already the role's own, ``for_role``):
    the working dtype, the attention kernel, and recomputation for a trained role's home copy."""
    dtype = torch.float32 if features.precision == "32-true" else torch.bfloat16
    recompute = features.recompute if trained and features.recompute != "auto" else "none"
    return BuildOptions(dtype, features.attention, recompute)


def train_config(
    features: RuntimeFeatures, training: Training, n_mbs: int, dp: int, role: str
) -> TrainConfig:
    """The training engine's configuration of a role under ``features`` (the role's own)."""
    if features.token_budget is not None and not training.packable:
        raise FeatureError(
            f"token_budget={features.token_budget}: the {role} loss averages per sequence, which packed rows "
            "do not keep apart; allowed: null, or a token-level loss (e.g. grpo.loss_agg=token-mean)"
        )
    return TrainConfig(
        n_mbs=n_mbs,
        norm_key=training.norm_key,
        optim=training.optim,
        precision=features.precision,
        distributed_optimizer=features.distributed_optimizer(dp),
        token_budget=features.token_budget,
        bucket_elems=features.grad_bucket_elems,
    )


def build_runtime(
    graph: DataflowGraph,
    roles: Sequence[RoleDecl],
    plan: Plan,
    registry: GroupRegistry,
    config: RuntimeConfig,
) -> RuntimeContext:
    """Build every declared role that the graph uses (collective over the world)."""
    check_features(config.features)
    check_plan_backends(config.features, plan)
    homes = graph.home_calls()
    trained = set(graph.trained_roles())
    ctx = RuntimeContext(graph, plan, config, registry.rank, ModelPool())
    for decl in roles:
        if decl.role not in homes:
            continue  # declared but not run (e.g. no reference call when the KL weight is 0)
        if decl.trained != (decl.role in trained):
            raise ValueError(
                f"role {decl.role!r}: declared {'trained' if decl.trained else 'frozen'} but the graph "
                f"{'does not train' if decl.trained else 'trains'} it"
            )
        home_call = homes[decl.role]
        layout = plan.layouts[home_call]
        groups = registry.for_layout(layout)
        # The home call's features: its role's precision, and for a train call the recomputation
        # the features or (when they leave it to the plan) the plan chose.
        features = config.features.for_call(
            decl.role, graph.call(home_call).call_type, plan.recompute.get(home_call)
        )
        options = build_options(features, decl.trained)
        home = load_shard(decl.source, decl.spec, groups, decl.seed, decl.init_value_head, options)
        # Moved copies serve generation and inference: the working dtype, no recomputation.
        realloc = ReallocConfig(
            gpus_per_node=config.node_size, dtype=options.dtype, attention=options.attention
        )
        reallocator = Reallocator(decl.spec, registry, realloc)
        ctx.pool.add(PooledModel(decl.role, home, reallocator, keep_copies=not decl.trained))
        if decl.training is not None:
            cfg = train_config(features, decl.training, plan.n_mbs(graph, home_call), layout.dp, decl.role)
            ctx.engines[decl.role] = TrainEngine(home, decl.training.loss, cfg)
        elif home.module is not None:
            home.module.eval().requires_grad_(False)
    for c in graph.calls:
        if c.call_type == "generate":
            rounds = plan.n_mbs(graph, c.name)
            feats = config.features.for_call(c.role, c.call_type, backend=plan.backends.get(c.name))
            backend = feats.generation_backend
            if backend == "vllm":
                from lightning_real.runtime.vllm_generation import check_vllm_layout

                check_vllm_layout(plan.layouts[c.name], registry.world_size, c.name)
            ctx.generators[c.name] = make_generator(backend, rounds, feats.vllm)
    missing = [r for r in homes if r not in ctx.pool.models and r in trained]
    if missing:
        raise ValueError(f"the graph trains roles {missing} that the module does not declare")
    return ctx
