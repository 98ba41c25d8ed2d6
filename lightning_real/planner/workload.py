"""What the planner needs to know about each model function call (MFC) of one RLHF iteration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_real.models.spec import ModelSpec

CallType = Literal["generate", "inference", "train"]
CALL_TYPES: tuple[str, ...] = ("generate", "inference", "train")


@dataclass(frozen=True)
class CallSpec:
    """One model function call: which model, what it does and how much data it sees."""

    name: str
    """Unique call name, the key of the plan ('actor_gen', 'critic_train', ...)."""
    role: str
    """Model the call runs ('actor', 'critic', 'ref', 'reward'); calls of one role share parameters."""
    call_type: CallType
    """'generate' (prefill + token-by-token decoding), 'inference' (one forward) or 'train'
    (forward, backward and optimizer step)."""
    spec: ModelSpec
    """Architecture of the model."""
    batch_size: int
    """Sequences per call (the global batch, split over data-parallel replicas)."""
    prompt_len: int
    """Prompt tokens per sequence."""
    gen_len: int
    """Generated tokens per sequence (every sequence is assumed to generate all of them)."""
    deps: tuple[str, ...] = ()
    """Calls whose outputs this call consumes; it starts after they end."""
    train_passes: int = 1
    """Optimizer steps the call takes over its batch (PPO minibatches); 1 for other calls."""
    group_size: int = 1
    """Sequences per prompt (GRPO groups): a data-parallel replica holds whole groups."""

    def __post_init__(self) -> None:
        if self.call_type not in CALL_TYPES:
            raise ValueError(f"CallSpec.call_type={self.call_type!r}; allowed: {', '.join(CALL_TYPES)}")
        for f in ("batch_size", "prompt_len", "train_passes", "group_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"CallSpec {self.name}: {f} must be >= 1, got {getattr(self, f)}")
        if self.gen_len < 0:
            raise ValueError(f"CallSpec {self.name}: gen_len must be >= 0, got {self.gen_len}")
        if self.call_type == "generate" and self.gen_len < 1:
            raise ValueError(f"CallSpec {self.name}: a generate call needs gen_len >= 1")
        if self.batch_size % self.group_size:
            raise ValueError(
                f"CallSpec {self.name}: batch_size={self.batch_size} is not a multiple of group_size={self.group_size}"
            )

    def dp_allowed(self, dp: int) -> bool:
        """Whether ``dp`` replicas can split the batch as the runtime requires: whole groups per
        replica, and for training a per-replica batch that splits into ``train_passes`` steps."""
        if (self.batch_size // self.group_size) % dp:
            return False
        return self.call_type != "train" or (self.batch_size // dp) % self.train_passes == 0

    @property
    def seq_len(self) -> int:
        """Tokens per sequence after generation (what inference and training see)."""
        return self.prompt_len + self.gen_len

    @property
    def out_bytes_per_token(self) -> int:
        """Bytes of output per token sent to consumers (ids and log-probs; values or rewards)."""
        return {"generate": 12, "inference": 4, "train": 0}[self.call_type]


@dataclass(frozen=True)
class Workload:
    """The calls of one iteration, in an order that respects their dependencies."""

    calls: tuple[CallSpec, ...]
    """Calls in dependency order (each call after the calls it depends on)."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form description (recipe name, sizes) for reports."""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        roles: dict[str, ModelSpec] = {}
        for c in self.calls:
            if c.name in seen:
                raise ValueError(f"Workload: call name {c.name!r} appears twice")
            for d in c.deps:
                if d not in seen:
                    raise ValueError(
                        f"Workload: call {c.name!r} depends on {d!r}, which is not an earlier call"
                    )
            # The head may differ between calls of a role only if the trunk is the same model.
            if c.role in roles and roles[c.role] != c.spec:
                raise ValueError(f"Workload: calls of role {c.role!r} use different model specs")
            roles[c.role] = c.spec
            seen.add(c.name)

    @property
    def names(self) -> tuple[str, ...]:
        """Call names in order."""
        return tuple(c.name for c in self.calls)

    def call(self, name: str) -> CallSpec:
        """The call named ``name``."""
        for c in self.calls:
            if c.name == name:
                return c
        raise KeyError(f"no call named {name!r}; calls: {', '.join(self.names)}")

    def roles(self) -> dict[str, ModelSpec]:
        """Model of each role."""
        return {c.role: c.spec for c in self.calls}

    def trainable_roles(self) -> set[str]:
        """Roles whose parameters a train call updates."""
        return {c.role for c in self.calls if c.call_type == "train"}


def ppo_workload(
    actor: ModelSpec,
    critic: ModelSpec | None = None,
    ref: ModelSpec | None = None,
    reward: ModelSpec | None = None,
    batch_size: int = 512,
    prompt_len: int = 128,
    gen_len: int = 128,
    ppo_minibatches: int = 1,
) -> Workload:
    """The standard PPO iteration.

    ``actor_gen -> {ref_inf, rew_inf, critic_inf} -> {actor_train, critic_train}``: every
    inference consumes the generated sequences and both trainings consume every inference.
    Critic and reward default to the actor's trunk with a value head, the reference to the actor.
    """
    critic = critic or actor.with_head("value")
    reward = reward or critic
    ref = ref or actor
    if critic.head != "value" or reward.head != "value":
        raise ValueError("ppo_workload: critic and reward models need head='value'")
    common = dict(batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len)
    infs = ("ref_inf", "rew_inf", "critic_inf")
    calls = (
        CallSpec("actor_gen", "actor", "generate", actor, **common),
        CallSpec("rew_inf", "reward", "inference", reward, deps=("actor_gen",), **common),
        CallSpec("ref_inf", "ref", "inference", ref, deps=("actor_gen",), **common),
        CallSpec("critic_inf", "critic", "inference", critic, deps=("actor_gen",), **common),
        CallSpec("actor_train", "actor", "train", actor, deps=infs, train_passes=ppo_minibatches, **common),
        CallSpec(
            "critic_train", "critic", "train", critic, deps=infs, train_passes=ppo_minibatches, **common
        ),
    )
    meta = dict(
        actor_params=actor.num_params(),
        critic_params=critic.num_params(),
        batch_size=batch_size,
        prompt_len=prompt_len,
        gen_len=gen_len,
    )
    return Workload(calls, meta)


def _attr(node: Any, *names: str) -> Any:
    for n in names:
        v = getattr(node, n, None)
        if v is not None:
            return v
    return None


def workload_from_graph(
    graph: Any, specs: dict[str, ModelSpec], prompt_len: int = 128, gen_len: int = 128
) -> Workload:
    """Adapter from the runtime's dataflow graph (``lightning_real.dataflow``) to a Workload.

    Reads the calls in ``graph.topological_order()`` (or the graph's own order; a plain list of
    calls works too) and, per call: ``name``, ``role``, ``call_type``, ``batch_size``,
    ``group_size``, ``minibatches`` (optimizer steps of a train call), ``prompt_len`` and
    ``gen_len`` (``prompt_len`` / ``gen_len`` given here when a call has none), and its
    dependencies: its ``deps`` plus the earlier calls that write one of its ``input_keys``.
    ``specs`` gives each role's architecture.
    """
    order = graph.topological_order() if hasattr(graph, "topological_order") else graph
    nodes = list(_attr(order, "calls", "nodes") or order)
    calls: list[CallSpec] = []
    writers: dict[str, str] = {}
    for n in nodes:
        role = _attr(n, "role", "model")
        if role not in specs:
            raise ValueError(
                f"workload_from_graph: no ModelSpec for role {role!r}; given: {', '.join(specs)}"
            )
        ctype = _attr(n, "call_type", "type")
        ctype = str(getattr(ctype, "value", ctype))
        deps = [getattr(d, "name", d) for d in (_attr(n, "deps", "parents") or ())]
        deps += [writers[k] for k in (_attr(n, "input_keys", "inputs") or ()) if k in writers]
        passes = _attr(n, "minibatches", "n_minibatches") or 1
        calls.append(
            CallSpec(
                name=n.name,
                role=role,
                call_type=ctype,  # type: ignore[arg-type]
                spec=specs[role],
                batch_size=int(_attr(n, "batch_size") or 1),
                prompt_len=int(_attr(n, "prompt_len") or prompt_len),
                gen_len=int(_attr(n, "gen_len") if _attr(n, "gen_len") is not None else gen_len),
                deps=tuple(dict.fromkeys(deps)),
                train_passes=int(passes) if ctype == "train" else 1,
                group_size=int(_attr(n, "group_size") or 1),
            )
        )
        for k in _attr(n, "output_keys", "outputs") or ():
            writers[k] = n.name
    return Workload(tuple(calls))
