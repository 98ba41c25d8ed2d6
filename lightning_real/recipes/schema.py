"""The recipe schema: what a recipe YAML may say, as frozen dataclasses.

Hyper-parameters of the algorithms, generation, the optimizer and the data loader are the
package's own dataclasses, nested as sections (``ppo:``, ``generation:``, ``optim:``, ``data:``),
so a recipe key means exactly what the Python argument means. The field docstrings are the
reference (``lightning-real run --help-config`` prints them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from lightning_real.algorithms.dpo import DPOConfig
from lightning_real.algorithms.grpo import GRPOConfig
from lightning_real.algorithms.ppo import PPOConfig
from lightning_real.data.modules import DataConfig
from lightning_real.features import RuntimeFeatures
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.optim import OptimConfig
from lightning_real.registry import GRPO_FAMILY

Algorithm = Literal[
    "sft",
    "rw",
    "ppo",
    "grpo",
    "remax",
    "dpo",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "gspo",
    "dapo",
    "dr_grpo",
]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
"""The names of :data:`lightning_real.registry.ALGORITHMS` (a test keeps the two equal)."""
Role = Literal["actor", "critic", "reward", "ref"]
ROLES: tuple[str, ...] = ("actor", "critic", "reward", "ref")
MISSING = "???"
"""OmegaConf's mark of a value the user must give (``actor.path: ???``)."""


@dataclass(frozen=True)
class ModelSourceConfig:
    """Where a role's model comes from: give exactly one of ``path``, ``tiny`` and ``rule``."""

    path: str | None = None
    """Local HF checkpoint folder (config.json and safetensors; llama, qwen2 or gpt2)."""
    tiny: Literal["llama", "qwen2", "gpt2"] | None = None
    """A randomly initialised tiny model of this family (``tiny_spec``; tests and CPU demos)."""
    rule: Literal["task"] | None = None
    """Reward of PPO, GRPO and ReMax only: a rule instead of a model; 'task' scores the shipped
    'say the letter' task (``lightning_real.data.task``)."""
    fn: str | None = None
    """Reward of PPO, GRPO and ReMax only: a verifiable reward, 'module:function' called as
    fn(prompt, response, ground_truth) -> float, the ground truth being each row's data.answer_key
    field (e.g. lightning_real.data.arithmetic:exact_match)."""

    @property
    def given(self) -> bool:
        """Whether the recipe names a source for this role."""
        return any(v is not None for v in (self.path, self.tiny, self.rule, self.fn))


@dataclass(frozen=True)
class DataSection(DataConfig):
    """The data files and tokenizer, with the loader settings of :class:`DataConfig`."""

    train: str = MISSING
    """Training rows: a JSONL file or a folder written by ``datasets.Dataset.save_to_disk``
    (prompts for PPO/GRPO/ReMax, prompt/response for SFT, prompt/chosen/rejected for DPO and RW)."""
    val: str | None = None
    """Validation rows, same format as ``train``; null: no validation."""
    tokenizer: str | None = None
    """Local tokenizer folder; null: the built-in byte tokenizer (259 tokens, fits tiny models)."""
    answer_key: str = "answer"
    """Field of each prompt row holding its ground truth, read when the reward is reward.fn."""


@dataclass(frozen=True)
class TrainerConfig:
    """The Lightning Trainer, its loggers and checkpoints."""

    devices: int | None = None
    """Processes per node; null: one per visible GPU (one on CPU). Under torchrun (or fabric run)
    the processes it started per node, whatever this says."""
    num_nodes: int | None = None
    """Nodes; null: 1. Under torchrun its world size over its processes per node, whatever this says."""
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    """Lightning accelerator; CPU runs use gloo, GPUs NCCL."""
    precision: Literal["32-true", "32", "bf16-mixed", "bf16-true"] | None = None
    """Lightning's precision name (``Trainer(precision=...)``); null: ``engine.precision``."""
    max_steps: int = 100
    """Training iterations (one dataflow iteration, i.e. one batch of the data module, each)."""
    log_every_n_steps: int = 1
    """Log metrics every this many steps."""
    val_every_n_steps: int = 0
    """Run the validation loop on data.val every this many steps (rollout algorithms: greedy
    responses to the held-out prompts, scored: val/reward, val/accuracy); 0: at the end of each
    epoch, Lightning's default."""
    val_before_training: bool = False
    """Also evaluate data.val before the first step, logged at step 0 (rollout algorithms)."""
    seed: int = 0
    """Seed of every process (``seed_everything``) and of randomly initialised models."""
    logger: Literal["csv", "wandb", "none"] = "csv"
    """'csv': output_dir/logs/version_N/metrics.csv; 'wandb': Weights & Biases (and the CSV file);
    'none': no logger."""
    wandb_project: str = "lightning-real"
    """W&B project (logger='wandb')."""
    wandb_name: str | None = None
    """W&B run name; null lets W&B choose."""
    wandb_offline: bool = False
    """Log W&B runs offline into output_dir/wandb (``wandb sync`` uploads them later)."""
    output_dir: str = "outputs"
    """Folder of logs, checkpoints, traces and the resolved recipe (created once the recipe is valid)."""
    checkpoint_every_n_steps: int = 0
    """Write a checkpoint (one folder of per-rank shards) every this many steps; 0: none."""
    keep_checkpoints: int = 1
    """Checkpoints kept, newest first; -1 keeps all."""
    resume_from: str | None = None
    """A checkpoint folder to resume from (written under any plan and number of processes: see docs/reliability.md)."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    start_method: Literal["auto", "popen", "spawn"] = "auto"
    """How local processes start when not under torchrun: 'popen' re-runs this command line per
    rank (Lightning's default for scripts), 'spawn' forks workers from this process; 'auto'
    picks popen when this process was started by the recipe's command line, else spawn."""


@dataclass(frozen=True)
class StrategyConfig:
    """RealStrategy options besides the plan."""

    search_steps: int = 2000
    """MCMC steps of the planner when plan='search'."""
    gpus_per_node: int | None = None
    """Devices per node as the planner and the reallocation see them (senders on the receiver's
    node are preferred); null: torchrun's LOCAL_WORLD_SIZE, else trainer.devices."""
    trace: bool = False
    """Write a Chrome trace of every logged step to output_dir/traces."""
    timeout_s: float | None = None
    """Seconds any collective may wait for the other ranks (every process group of the run); a
    rank that died or stopped answering fails the run within this; null: 300 on CPU, 1800 on GPU."""


@dataclass(frozen=True)
class ExportConfig:
    """The HF checkpoints written at the end of training."""

    dir: str | None = None
    """Folder receiving one HF checkpoint per exported role (dir/actor, dir/critic, dir/reward);
    null: no export."""
    roles: tuple[str, ...] | None = None
    """Roles to export; null: the trained model (actor; reward for 'rw'). 'critic' is PPO only."""
    tokenizer: bool = True
    """Also write the data tokenizer into each exported folder, so it loads as a complete HF model."""
    overwrite: bool = False
    """Replace existing export folders; False refuses to start when one exists."""


@dataclass(frozen=True)
class Recipe:
    """One training run: the algorithm, its models, data, plan and hyper-parameters."""

    algorithm: Algorithm
    """sft, rw (reward model), ppo, grpo, remax, dpo, or one of GRPO's family (rloo,
    reinforce_pp, reinforce_pp_baseline, gspo, dapo, dr_grpo: presets of the grpo section)."""
    actor: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    """The policy (trained by sft, ppo, grpo, remax, dpo)."""
    critic: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    """PPO's value model; unset: the actor's architecture and weights with a value head."""
    reward: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    """The reward model (frozen in ppo/grpo/remax, trained by rw), or a rule."""
    ref: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    """The frozen reference policy; unset: a frozen copy of the actor."""
    data: DataSection = field(default_factory=DataSection)
    """Data files, tokenizer, batch size and length limits."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Processes, steps, logging, checkpoints."""
    plan: str | dict[str, str] = "symmetric"
    """A layout per call: 'symmetric', 'disjoint', 'search', a plan YAML file, or a mapping from
    call name to layout string ('d2t2p1@0-3')."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """RealStrategy options besides the plan."""
    engine: RuntimeFeatures = field(default_factory=RuntimeFeatures)
    """What the runtime runs and the planner prices: precision (or trainer.precision), optimizer
    sharding, attention, recomputation, generation backend, offload."""
    n_mbs: int | dict[str, int] = 1
    """Microbatches per data-parallel replica: one count for every call, or call name -> count."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW of the trained model (the actor; the reward model for 'rw')."""
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW of PPO's critic."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling of ppo, grpo and remax (eos_token_id and pad_token_id default to the tokenizer's)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO hyper-parameters (also ReMax's KL penalty and reward settings)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Hyper-parameters of GRPO and its family (group_size responses per prompt, adv_estimator,
    policy_loss, loss_agg, dynamic sampling). The defaults below are GRPO's; algorithm rloo,
    reinforce_pp, reinforce_pp_baseline, gspo, dapo or dr_grpo starts from that algorithm's
    preset instead (docs/rlhf.md lists them), and the keys given here override it."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO hyper-parameters."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """HF checkpoints written at the end."""


@dataclass(frozen=True)
class AlgorithmUse:
    """What one algorithm reads from a recipe."""

    roles: tuple[str, ...]
    """Roles it may have."""
    required: tuple[str, ...]
    """Roles the recipe must give."""
    trained: tuple[str, ...]
    """Roles it trains (the ones that can be exported)."""
    sections: tuple[str, ...]
    """Hyper-parameter sections it reads."""
    data: Literal["prompts", "sft", "preference"]
    """Kind of data rows."""


USES: dict[str, AlgorithmUse] = {
    "sft": AlgorithmUse(("actor",), ("actor",), ("actor",), ("optim",), "sft"),
    "rw": AlgorithmUse(("reward",), ("reward",), ("reward",), ("optim",), "preference"),
    "ppo": AlgorithmUse(
        ROLES,
        ("actor", "reward"),
        ("actor", "critic"),
        ("optim", "critic_optim", "generation", "ppo"),
        "prompts",
    ),
    "grpo": AlgorithmUse(
        ("actor", "reward", "ref"),
        ("actor", "reward"),
        ("actor",),
        ("optim", "generation", "grpo"),
        "prompts",
    ),
    "remax": AlgorithmUse(
        ("actor", "reward", "ref"), ("actor", "reward"), ("actor",), ("optim", "generation", "ppo"), "prompts"
    ),
    "dpo": AlgorithmUse(("actor", "ref"), ("actor",), ("actor",), ("optim", "dpo"), "preference"),
}
for _name in GRPO_FAMILY[1:]:
    USES[_name] = USES["grpo"]
"""Roles and sections of each algorithm."""
SECTIONS: tuple[str, ...] = ("optim", "critic_optim", "generation", "ppo", "grpo", "dpo")
"""Hyper-parameter sections, used by some algorithms only."""
