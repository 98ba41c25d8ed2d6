"""One optimization step of a model shard under its layout.

:class:`TrainEngine` runs megatron-core's pipeline schedule (1F1B for pp > 1, a plain
microbatch loop for pp = 1) over ``n_mbs`` microbatches of this replica's batch, then
finishes the gradients (average over the data-parallel group, sum of the tied embedding's two
copies over the embedding group), clips them by the global norm and applies AdamW.

Loss normalisation: ``loss_fn(output, microbatch)`` returns the *sum* of its per-token (or
per-sequence) losses over the microbatch. The engine divides by the global normaliser: the sum
of ``batch[TrainConfig.norm_key]`` over the whole global batch (all microbatches, all
data-parallel replicas; the number of sequences when ``norm_key`` is None). The step's loss, and
its gradient, are therefore those of one device computing ``sum(losses) / normaliser`` over the
full batch, whatever the layout and microbatch count. Metrics returned by ``loss_fn`` are
normalised the same way.

``output`` is what the last stage produces: vocabulary-parallel logits ``[b, s, V/tp]`` (lm head)
or values ``[b, s, 1]`` (value head). Every tensor-parallel rank must compute the same loss:
use :func:`vocab_parallel_logprobs` and :func:`vocab_parallel_entropy` on logits.

Precision and optimizer sharding (:class:`TrainConfig`): parameters live in flat buffers
(:mod:`lightning_real.models.flat`) with fp32 main gradients ('32-true', 'bf16-mixed') or bf16
ones ('bf16-true'); the data-parallel average is one all-reduce, or a reduce-scatter when each
replica keeps 1/dp of the optimizer state (ZeRO-1), after which the updated parameters are
all-gathered; 'bf16-mixed' updates fp32 master weights and refreshes the bf16 working copy
(:class:`~lightning_real.models.optim.ShardedAdamW`). Gradients are finished here rather than by
megatron-core's ``finalize_model_grads`` and ``DistributedOptimizer``, which need CUDA tensors.

Packed sequences (``TrainConfig.token_budget``): the replica's rows are packed into rows of at most
that many tokens (:mod:`lightning_real.models.packing`), one packed row per microbatch, so the
microbatch count follows the budget; token-level losses and gradients are those of the padded batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from lightning_real.compat import cuda_to_cpu
from lightning_real.features import GRAD_BUCKET_ELEMS
from lightning_real.layout import row_range
from lightning_real.models.flat import FlatBuffers
from lightning_real.models.masks import has_padding, model_mask, position_ids
from lightning_real.models.optim import OptimConfig, ShardedAdamW, clip_, grad_norm, lr_at
from lightning_real.models.packing import pack
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import WORD_EMBEDDINGS

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
SEGMENT_IDS = "segment_ids"


@dataclass(frozen=True)
class TrainConfig:
    """How one training step of one model is run."""

    n_mbs: int = 1
    """Microbatches per step on each data-parallel replica (the pipeline schedule's microbatches)."""
    norm_key: str | None = "loss_mask"
    """Batch entry whose sum over the global batch divides the summed loss; None: the number of sequences."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, learning-rate schedule and clipping."""
    precision: Literal["32-true", "bf16-mixed", "bf16-true"] = "32-true"
    """'32-true': fp32 parameters, gradients and Adam states; 'bf16-mixed': bf16 parameters, fp32
    main gradients, fp32 master weights and Adam states; 'bf16-true': all bf16. The shard's
    parameters must already have the working dtype."""
    distributed_optimizer: bool = False
    """Split the optimizer state (and the gradient reduction) over the data-parallel group (ZeRO-1)."""
    token_budget: int | None = None
    """Pack the replica's rows into microbatches of at most this many tokens (one packed row each;
    ``n_mbs`` is then ignored); None: ``n_mbs`` microbatches of padded rows."""
    bucket_elems: int | None = GRAD_BUCKET_ELEMS
    """Gradient elements per data-parallel reduction bucket; each bucket's collective starts
    during the backward once its gradients are complete. None: one reduction after the backward."""

    def __post_init__(self) -> None:
        if not isinstance(self.n_mbs, int) or self.n_mbs < 1:
            raise ValueError(f"TrainConfig.n_mbs={self.n_mbs!r}; allowed: an integer >= 1")
        if self.norm_key is not None and not isinstance(self.norm_key, str):
            raise ValueError(f"TrainConfig.norm_key={self.norm_key!r}; allowed: a batch key or None")
        if not isinstance(self.optim, OptimConfig):
            raise ValueError(f"TrainConfig.optim={self.optim!r}; allowed: an OptimConfig")
        if self.bucket_elems is not None and (
            not isinstance(self.bucket_elems, int) or self.bucket_elems < 1
        ):
            raise ValueError(
                f"TrainConfig.bucket_elems={self.bucket_elems!r}; allowed: None or an integer >= 1"
            )
        if self.precision not in ("32-true", "bf16-mixed", "bf16-true"):
            raise ValueError(
                f"TrainConfig.precision={self.precision!r}; allowed: 32-true, bf16-mixed, bf16-true"
            )
        if self.token_budget is not None and (
            not isinstance(self.token_budget, int) or self.token_budget < 1
        ):
            raise ValueError(
                f"TrainConfig.token_budget={self.token_budget!r}; allowed: None or an integer >= 1"
            )

    @property
    def param_dtype(self) -> torch.dtype:
        """The working dtype of the parameters."""
        return torch.float32 if self.precision == "32-true" else torch.bfloat16


# ---- batches ------------------------------------------------------------------------------
def split_microbatches(batch: Batch, n_mbs: int) -> list[Batch]:
    """Cut every entry along dim 0 into ``n_mbs`` near-equal microbatches."""
    sizes = {k: v.shape[0] for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch entries disagree on the batch size: {sizes}")
    rows = next(iter(sizes.values()))
    if rows < n_mbs:
        raise ValueError(f"TrainConfig.n_mbs={n_mbs} exceeds the {rows} sequences of this replica's batch")
    parts = {k: torch.tensor_split(v, n_mbs, dim=0) for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n_mbs)]


def split_for_dp(batch: Batch, dp: int, dp_rank: int) -> Batch:
    """This data-parallel replica's contiguous share of a global batch (the rows the runtime
    hands the replica: :func:`lightning_real.layout.row_range`)."""
    lo, hi = row_range(int(next(iter(batch.values())).shape[0]), dp, dp_rank)
    return {k: v[lo:hi] for k, v in batch.items()}


# ---- the engine ---------------------------------------------------------------------------
class TrainEngine:
    """Trains one :class:`ModelShard` in place on its layout; AdamW state lives with the shard.

    All ranks of the layout call :meth:`step` together, each with its replica's batch (the tp
    ranks and pipeline stages of one replica pass the same batch). Ranks outside the layout get
    an empty dict at once. Gradients of the last step stay on the parameters until the next step
    or :meth:`zero_grad`.
    """

    def __init__(self, shard: ModelShard, loss_fn: LossFn, config: TrainConfig | None = None) -> None:
        self.shard = shard
        self.loss_fn = loss_fn
        self.config = config or TrainConfig()
        self.steps = 0
        """Optimizer steps taken."""
        g = shard.groups
        cfg = self.config
        self._params = shard.params()
        self._tied_pp = bool(
            shard.member and shard.spec.tied_embeddings and shard.spec.head == "lm" and g.layout.pp > 1
        )
        self.flat: FlatBuffers | None = None
        self.sharded: ShardedAdamW | None = None
        if shard.member:
            dtypes = {p.dtype for _, p in self._params}
            if dtypes != {cfg.param_dtype}:
                raise ValueError(
                    f"TrainConfig.precision={cfg.precision!r} trains {cfg.param_dtype} parameters; "
                    f"this shard's are {sorted(map(str, dtypes))} (build it with that dtype)"
                )
            shards = g.layout.dp if cfg.distributed_optimizer else 1
            grad_dtype = torch.bfloat16 if cfg.precision == "bf16-true" else torch.float32
            tied = frozenset({WORD_EMBEDDINGS}) if self._tied_pp else frozenset()
            self.flat = FlatBuffers(self._params, g, grad_dtype, shards, cfg.bucket_elems, tied)
            self.sharded = ShardedAdamW(self.flat, cfg.optim, master_weights=cfg.precision == "bf16-mixed")

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer of this rank (None outside the layout)."""
        return self.sharded.torch if self.sharded is not None else None

    @property
    def distributed(self) -> bool:
        """Whether Adam states are split over the data-parallel group (ZeRO-1)."""
        return self.flat is not None and self.flat.shards > 1

    @property
    def has_master_weights(self) -> bool:
        """Whether the optimizer updates fp32 master copies of 16-bit parameters."""
        return self.sharded is not None and self.sharded.master is not None

    def optimizer_state_bytes(self) -> int:
        """Bytes of this rank's optimizer state (Adam moments, master weights)."""
        return self.sharded.state_bytes() if self.sharded is not None else 0

    @property
    def tp_group(self) -> Any:
        """Tensor-parallel group of this rank (pass it to the vocabulary-parallel loss helpers)."""
        return self.shard.groups.tp

    @property
    def lr(self) -> float:
        """Learning rate the next step uses."""
        return lr_at(self.config.optim, self.steps)

    def release_grads(self) -> int:
        """Free the gradient buffer until the next step; the bytes freed (the runtime calls it
        after each train call: between calls a model's gradients only take memory)."""
        return self.flat.release_grads() if self.flat is not None else 0

    def zero_grad(self) -> None:
        """Drop the gradients from the parameters (the flat gradient buffer stays allocated)."""
        if self.flat is not None:
            self.flat.detach_grads()

    # ---- one step ---------------------------------------------------------------------------
    def step(self, batch: Batch) -> dict[str, float]:
        """Forward, backward and AdamW update on this replica's ``batch``; metrics equal on every rank.

        ``batch`` holds ``input_ids`` ``[b, s]``, optionally ``attention_mask`` (1 = token,
        default all ones), ``position_ids`` and ``segment_ids`` (packed sequences), plus whatever
        ``loss_fn`` reads. Returns the global ``loss``, ``grad_norm`` (before clipping), ``lr``
        and the loss function's metrics.
        """
        if not self.shard.member:
            return {}
        cfg, g = self.config, self.shard.groups
        module = self.shard.module
        flat, opt = self.flat, self.sharded
        assert module is not None and flat is not None and opt is not None
        if INPUT_IDS not in batch:
            raise KeyError(f"training batch needs '{INPUT_IDS}'; it has {sorted(batch)}")
        norm = self._global_normaliser(batch)
        dev = self._device()
        parts = pack(batch, cfg.token_budget)[0] if cfg.token_budget else split_microbatches(batch, cfg.n_mbs)
        # Asked once per step, of the batch as given (usually still on the host): a host sync
        # per microbatch otherwise. Packed rows always carry segment ids, and with them a mask.
        padded = has_padding(batch.get(ATTENTION_MASK))
        mbs = [{k: v.to(dev) for k, v in mb.items()} for mb in parts]
        module.train()
        flat.attach_grads()
        sums: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        # megatron divides each microbatch's loss by their number; that factor undoes it, and
        # dp makes the replicas' gradient *average* equal the gradient of sum / normaliser.
        scale = len(mbs) * g.layout.dp / norm
        flat.expect_backwards(len(mbs))  # buckets start reducing as their last gradients arrive
        self._run_schedule(mbs, scale, sums, padded)
        flat.reduce()
        norm_value = grad_norm(flat, self._tied_pp)
        clip_(flat, cfg.optim.max_grad_norm, norm_value)
        lr = self.lr
        opt.step(lr)
        self.steps += 1
        metrics = self._reduce_metrics(sums, norm)
        metrics.update(grad_norm=norm_value, lr=lr)
        return metrics

    def _global_normaliser(self, batch: Batch) -> float:
        key = self.config.norm_key
        if key is None:
            count = torch.tensor(float(batch[INPUT_IDS].shape[0]), dtype=torch.float64)
        else:
            if key not in batch:
                raise KeyError(
                    f"TrainConfig.norm_key={key!r} is not in the batch (keys: {sorted(batch)}); "
                    "allowed: one of the batch keys, or None to normalise by the number of sequences"
                )
            count = batch[key].detach().double().sum().cpu()
        g = self.shard.groups
        if g.layout.dp > 1:
            count = count.to(self._device())
            dist.all_reduce(count, group=g.dp)
        # A batch with nothing to learn from gives zero loss rather than a division by zero.
        return max(float(count), 1.0)

    def _device(self) -> torch.device:
        return self._params[0][1].device

    def _inputs(self, mb: Batch, padded: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        ids = mb[INPUT_IDS]
        pad = mb.get(ATTENTION_MASK)
        pad = torch.ones_like(ids) if pad is None else pad
        seg = mb.get(SEGMENT_IDS)
        pos = mb.get(POSITION_IDS)
        pos = position_ids(pad, seg) if pos is None else pos
        return ids, pos, model_mask(pad, seg, padded)

    def _run_schedule(
        self,
        mbs: list[Batch],
        scale: float,
        sums: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
        padded: bool,
    ) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        g = self.shard.groups
        module = self.shard.module
        assert module is not None
        first = g.is_first_stage
        loss_fn = self.loss_fn

        def loss_func(mb: Batch, output: torch.Tensor) -> tuple[torch.Tensor, dict]:
            loss_sum, metrics = loss_fn(output, mb)
            if loss_sum.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar loss sum, got shape {tuple(loss_sum.shape)}")
            sums.append((loss_sum.detach(), {k: v.detach() for k, v in metrics.items()}))
            return loss_sum * scale, {}

        def forward_step(data: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
            mb = next(data)
            ids, pos, mask = self._inputs(mb, padded)
            out = model(ids if first else None, pos, mask)
            return out, lambda output: loss_func(mb, output)

        pp = g.layout.pp
        seq = mbs[0][INPUT_IDS].shape[1]
        p2p = P2PCommunicator(pp_group=g.pp, config=module.config) if pp > 1 else None
        fb = get_forward_backward_func(pp_size=pp, vp_size=None)
        # Shapes travel with the tensors (variable_seq_lengths), so microbatches may differ in size.
        with cuda_to_cpu():
            fb(
                forward_step_func=forward_step,
                data_iterator=iter(mbs),
                model=module,
                num_microbatches=len(mbs),
                seq_length=seq,
                micro_batch_size=mbs[0][INPUT_IDS].shape[0],
                forward_only=False,
                p2p_communicator=p2p,
                pg_collection=g.pg_collection(),
            )

    def _reduce_metrics(
        self, sums: list[tuple[torch.Tensor, dict[str, torch.Tensor]]], norm: float
    ) -> dict[str, float]:
        """Global loss and metrics (sums / normaliser), computed on the last stage, sent to all."""
        g = self.shard.groups
        out: dict[str, float] | None = None
        if g.is_last_stage:
            keys = sorted(sums[0][1]) if sums else []
            vals = torch.stack(
                [
                    torch.stack([s.double() for s, _ in sums]).sum(),
                    *[torch.stack([m[k].double() for _, m in sums]).sum() for k in keys],
                ]
            )
            if g.layout.dp > 1:
                dist.all_reduce(vals, group=g.dp)
            means: list[float] = (vals / norm).tolist()
            out = {"loss": means[0], **dict(zip(keys, means[1:]))}
        if g.layout.pp > 1:
            box = [out]
            last = g.layout.rank_at(g.dp_rank, g.tp_rank, g.layout.pp - 1)
            dist.broadcast_object_list(box, src=last, group=g.pp)
            out = box[0]
        assert out is not None
        return out

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer shard and step count (empty outside the layout)."""
        if self.sharded is None:
            return {}
        return {
            "layout": str(self.shard.layout),
            "coords": self.shard.groups.coords,
            "params": [ps.local_name for ps, _ in self._params],
            "steps": self.steps,
            "precision": self.config.precision,
            "distributed": self.distributed,
            **self.sharded.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved on the same layout position."""
        if self.sharded is None:
            return
        want = (str(self.shard.layout), self.shard.groups.coords)
        have = (state.get("layout"), tuple(state.get("coords") or ()))
        if have != want:
            raise ValueError(
                f"optimizer state saved for layout {have[0]} at (dp, tp, pp)={have[1]} cannot load "
                f"into layout {want[0]} at {want[1]}"
            )
        names = [ps.local_name for ps, _ in self._params]
        if state["params"] != names:
            raise ValueError("optimizer state was saved for a different parameter list")
        saved = (state.get("precision", "32-true"), bool(state.get("distributed", False)))
        if saved != (self.config.precision, self.distributed):
            raise ValueError(
                f"optimizer state saved with precision={saved[0]!r}, distributed optimizer={saved[1]} "
                f"cannot load into precision={self.config.precision!r}, distributed optimizer={self.distributed}"
            )
        self.sharded.load_state_dict(state)
        self.steps = int(state["steps"])
