"""The runtime features that change what a step costs and how much memory it needs.

One declaration, read by both sides: the runtime builds models, optimizers and generation
engines with exactly these features, and the planner prices exactly these (a plan searched for
other features would be a plan for another framework). ``lightning-real plan <recipe>`` and
``lightning-real run <recipe>`` derive them from the recipe with one function
(:func:`lightning_real.recipes.features.recipe_features`); ``RealStrategy`` takes them as an
argument, with the precision from the Trainer.

The module imports nothing heavy, so the planner's command line starts fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal, cast, get_args

Precision = Literal["32-true", "bf16-mixed", "bf16-true"]
Optimizer = Literal["auto", "replicated", "distributed"]
Attention = Literal["local", "sdpa"]
Recompute = Literal["none", "selective", "full", "auto"]
GenerationBackend = Literal["native", "vllm", "auto"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
RECOMPUTES: tuple[str, ...] = get_args(Recompute)
GENERATION_BACKENDS: tuple[str, ...] = get_args(GenerationBackend)
ROLES: tuple[str, ...] = ("actor", "critic", "ref", "reward")

GRAD_BUCKET_ELEMS = 1 << 22
"""Default gradient elements per data-parallel reduction bucket (16 MB in fp32): large enough that
each collective moves megabytes, small enough that a 7B model's layers give dozens of buckets to
overlap with the backward."""

LIGHTNING_PRECISIONS: dict[str, str] = {
    "32": "32-true",
    "32-true": "32-true",
    "bf16-mixed": "bf16-mixed",
    "bf16-true": "bf16-true",
}
"""Lightning's precision names (``Trainer(precision=...)``) and the precision each one means here."""


class FeatureError(ValueError):
    """A feature value the runtime cannot run: the message names the option and the allowed values."""


def _check_int(label: str, value: object, low: int, nullable: bool = False) -> None:
    """Refuse ``value`` unless it is an integer >= ``low`` (or None, when ``nullable``)."""
    if value is None and nullable:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        allowed = f"null or an integer >= {low}" if nullable else f"an integer >= {low}"
        raise FeatureError(f"{label}={value!r}; allowed: {allowed}")


def _check_bool(label: str, value: object) -> None:
    if not isinstance(value, bool):
        raise FeatureError(f"{label}={value!r}; allowed: true, false")


@dataclass(frozen=True)
class VllmConfig:
    """How the ``vllm`` generation backend starts and keeps its engines (a recipe's ``engine.vllm``)."""

    max_model_len: int | None = None
    """Longest prompt + response the engine serves; null: the model's max_position_embeddings."""
    max_num_seqs: int = 64
    """Most sequences in one continuous batch (vLLM's ``max_num_seqs``)."""
    kv_cache_bytes: int = 1 << 30
    """Memory of the paged KV cache on each rank (vLLM's ``kv_cache_memory_bytes`` of the rank's
    engine object; a tensor-parallel replica holds ``tp`` of them, each with its share of the KV
    heads), instead of a fraction of the device: the engine shares its device with training. The
    planner prices generation in waves when the replica's rows do not fit."""
    enforce_eager: bool = True
    """Run the model eagerly (no CUDA graphs, no torch.compile): fast start, what CPU supports."""
    block_size: int | None = None
    """Tokens per KV-cache block; null: vLLM's default for the device (128 on CPU)."""
    seed: int = 0
    """vLLM's own seed (its sampling streams are not the native generator's)."""
    release: bool = True
    """Release the engine's weights and KV cache while other calls run on its devices and
    restore them for the next generate call, weights first, cache second (vLLM's sleep mode
    where the platform has it; on CPU the storages of the parameters and of the KV cache are
    freed, vLLM's packed copies of its linear weights stay)."""

    def __post_init__(self) -> None:
        _check_int("VllmConfig.max_model_len", self.max_model_len, 2, nullable=True)
        _check_int("VllmConfig.max_num_seqs", self.max_num_seqs, 1)
        _check_int("VllmConfig.kv_cache_bytes", self.kv_cache_bytes, 1)
        _check_int("VllmConfig.block_size", self.block_size, 1, nullable=True)
        _check_bool("VllmConfig.enforce_eager", self.enforce_eager)
        _check_bool("VllmConfig.release", self.release)

    def model_len(self, max_position_embeddings: int) -> int:
        """Longest prompt + response the engine serves for a model of this many positions."""
        return self.max_model_len or max_position_embeddings


@dataclass(frozen=True)
class RuntimeFeatures:
    """What the runtime runs, as far as it changes time and memory."""

    precision: Precision = "32-true"
    """'32-true': fp32 everywhere; 'bf16-mixed': bf16 parameters and activations with fp32 master
    weights, fp32 gradient reduction and fp32 Adam states; 'bf16-true': bf16 parameters,
    gradients and Adam states (no master copy). Generation and inference run in the working
    dtype (bf16 for both bf16 modes), and reallocation moves the working copy."""
    optimizer: Optimizer = "auto"
    """Adam states over the data-parallel group: 'replicated' (every replica keeps them all),
    'distributed' (ZeRO-1: each replica keeps 1/dp of them; gradients are reduce-scattered and
    the updated parameters all-gathered), 'auto' (distributed when dp > 1)."""
    attention: Attention = "sdpa"
    """Core attention: 'sdpa' (``torch.nn.functional.scaled_dot_product_attention``: flash or
    memory-efficient kernels on CUDA, no score matrix kept), or 'local' (megatron-core's unfused
    attention, which materialises the scores)."""
    recompute: Recompute = "none"
    """Activation recomputation of train calls: 'none', 'selective' (the attention core, as
    megatron-core's selective recompute), 'full' (every layer's activations, recomputed in
    backward), or 'auto' (the plan chooses per train call; the planner searches it, a hand plan
    without a choice means none)."""
    generation_backend: GenerationBackend = "native"
    """Engine of generate calls: 'native' (this package's generator: any tp/pp, the same tokens
    under any split), 'vllm' (vLLM in this process, one engine per data-parallel replica), or
    'auto' (the plan chooses per generate call; the planner searches it, a hand plan without a
    choice means native)."""
    vllm: VllmConfig = field(default_factory=VllmConfig)
    """How the vLLM engines start (read when a generate call uses vLLM)."""
    offload_idle: bool = False
    """Park the parameters of a model's call copies in host memory between its calls; False keeps
    them on the device until the call is over and then drops them."""
    token_budget: int | None = None
    """Pack the rows of train calls into microbatches of at most this many tokens (padding is not
    computed; the microbatch count follows the budget); null: padded rows in the plan's
    microbatches. Needs token-level losses (PPO, SFT, token-mean GRPO)."""
    grad_bucket_elems: int | None = GRAD_BUCKET_ELEMS
    """Gradient elements per data-parallel reduction bucket of train calls: a bucket's collective
    starts during the last microbatch's backward once its gradients are complete, so the
    reduction overlaps the backward; null: one reduction after the backward (not overlapped)."""
    actor_precision: Precision | None = None
    """Precision of the actor's models; null: ``precision``."""
    critic_precision: Precision | None = None
    """Precision of the critic's models; null: ``precision``."""
    ref_precision: Precision | None = None
    """Precision of the reference model; null: ``precision``."""
    reward_precision: Precision | None = None
    """Precision of the reward model; null: ``precision``."""

    def __post_init__(self) -> None:
        if isinstance(self.vllm, dict):  # from a plan file or report (``to_dict``)
            object.__setattr__(self, "vllm", VllmConfig(**self.vllm))
        if not isinstance(self.vllm, VllmConfig):
            raise FeatureError(f"vllm={self.vllm!r}; allowed: a VllmConfig or a mapping of its fields")
        allowed = {
            "precision": PRECISIONS,
            "optimizer": OPTIMIZERS,
            "attention": ATTENTIONS,
            "recompute": RECOMPUTES,
            "generation_backend": GENERATION_BACKENDS,
        }
        for name, values in allowed.items():
            v = getattr(self, name)
            if v not in values:
                raise FeatureError(f"{name}={v!r}; allowed: {', '.join(values)}")
        _check_bool("offload_idle", self.offload_idle)
        _check_int("token_budget", self.token_budget, 1, nullable=True)
        _check_int("grad_bucket_elems", self.grad_bucket_elems, 1, nullable=True)
        for role in ROLES:
            v = getattr(self, f"{role}_precision")
            if v is not None and v not in PRECISIONS:
                raise FeatureError(f"{role}_precision={v!r}; allowed: null, {', '.join(PRECISIONS)}")

    def for_call(
        self, role: str, call_type: str, recompute: str | None = None, backend: str | None = None
    ) -> RuntimeFeatures:
        """The features one call runs with: its role's precision, recomputation only in train
        calls and a generation backend (``recompute``, ``backend``: the plan's choices when the
        features leave them to the plan)."""
        engine: GenerationBackend = self.generation_backend
        if engine == "auto":
            if backend not in (None, "native", "vllm"):
                raise FeatureError(f"generation backend={backend!r}; allowed: native, vllm")
            engine = cast(GenerationBackend, backend or "native")
        chosen: Recompute = self.recompute
        if call_type != "train":
            chosen = "none"
        elif chosen == "auto":
            if recompute not in (None, "none", "selective", "full"):
                raise FeatureError(f"recompute={recompute!r}; allowed: none, selective, full")
            chosen = cast(Recompute, recompute or "none")
        return replace(self.for_role(role), recompute=chosen, generation_backend=engine)

    def for_role(self, role: str) -> RuntimeFeatures:
        """The features of one role's models: its precision, with no per-role overrides left."""
        own = getattr(self, f"{role}_precision", None) if role in ROLES else None
        cleared = {f"{r}_precision": None for r in ROLES}
        return replace(self, precision=own or self.precision, **cleared)  # type: ignore[arg-type]

    # ---- what the features mean in bytes ------------------------------------------------------
    @property
    def param_bytes(self) -> int:
        """Bytes of one working parameter (and activation) element."""
        return 4 if self.precision == "32-true" else 2

    @property
    def grad_bytes(self) -> int:
        """Bytes of one gradient element (fp32 main gradients except in bf16-true)."""
        return 2 if self.precision == "bf16-true" else 4

    @property
    def master_bytes(self) -> int:
        """Bytes of the fp32 master copy of one parameter (bf16-mixed only)."""
        return 4 if self.precision == "bf16-mixed" else 0

    @property
    def moment_bytes(self) -> int:
        """Bytes of Adam's two moments of one parameter (they follow the optimizer's dtype)."""
        return 4 if self.precision == "bf16-true" else 8

    def distributed_optimizer(self, dp: int) -> bool:
        """Whether Adam states are split over a data-parallel group of ``dp`` replicas."""
        return dp > 1 and self.optimizer in ("auto", "distributed")

    @property
    def flash_attention(self) -> bool:
        """Whether attention keeps no score matrix (SDPA's fused kernels)."""
        return self.attention == "sdpa"

    def describe(self) -> str:
        """One line for reports: ``bf16-mixed, distributed Adam (dp > 1), sdpa attention, ...``."""
        opt = {"auto": "distributed Adam when dp > 1", "replicated": "replicated Adam"}.get(
            self.optimizer, "distributed Adam"
        )
        roles = [f"{r} {getattr(self, r + '_precision')}" for r in ROLES if getattr(self, r + "_precision")]
        parts = [
            self.precision + (f" ({', '.join(roles)})" if roles else ""),
            opt,
            f"{self.attention} attention",
            f"recompute {self.recompute}",
            f"{self.generation_backend} generation",
        ]
        if self.offload_idle:
            parts.append("idle copies offloaded")
        if self.token_budget:
            parts.append(f"packed to {self.token_budget} tokens")
        if self.grad_bucket_elems is None:
            parts.append("gradient reduction not overlapped")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, object]:
        """Field -> value, as reports and plan files write them (``vllm`` as a mapping)."""
        return {
            f.name: asdict(self.vllm) if f.name == "vllm" else getattr(self, f.name) for f in fields(self)
        }


REFERENCE = RuntimeFeatures(precision="32-true", optimizer="replicated", attention="local")
"""The CPU reference engine: fp32, replicated AdamW, megatron-core's unfused attention."""


def precision_of(name: str | int | None) -> str:
    """This package's precision for a Lightning precision name (``Trainer(precision=...)``)."""
    key = "32-true" if name is None else str(name)
    if key not in LIGHTNING_PRECISIONS:
        raise FeatureError(
            f"precision={name!r}; allowed: {', '.join(sorted(set(LIGHTNING_PRECISIONS)))} "
            "(16-bit float and fp64 are not supported)"
        )
    return LIGHTNING_PRECISIONS[key]
