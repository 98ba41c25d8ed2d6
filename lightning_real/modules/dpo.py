"""Direct preference optimisation (DPO) of the actor against a frozen reference, through RealStrategy.

``ref_inf`` scores both answers of every pair with the reference model; ``actor_train`` takes one
optimizer step on the DPO loss of the policy's scores. Each pair travels as one row holding its
two answers as two packed segments (attention and positions restart at the second answer), so
microbatches never split a pair, one forward pass scores both answers, and the loss of a
microbatch is complete. The price is attention over both answers at once: twice the attention
score work of two separate rows (the cross-answer half is masked), a small share of the total.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_real.algorithms.dpo import DPOConfig
from lightning_real.dataflow import DataflowGraph
from lightning_real.graphs.common import PAIR_SOURCES
from lightning_real.graphs.dpo import dpo_graph
from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.models.source import ModelSource, spec_of
from lightning_real.module import RLHFModule
from lightning_real.runtime.build import CallFn, RuntimeContext
from lightning_real.runtime.roles import RoleDecl, Training

Batch = dict[str, torch.Tensor]


def pack_pairs(x: Mapping[str, torch.Tensor]) -> Batch:
    """Each pair as one row ``[b, 2S]``: the chosen answer, then the rejected one as a second segment.

    Returns ``input_ids``, ``attention_mask`` and ``segment_ids`` (0 on the chosen half, 1 on the
    rejected half). Both answers of a batch are padded to one length ``S`` (``collate_pairs``).
    """
    c, r = x["chosen_ids"], x["rejected_ids"]
    if c.shape != r.shape:
        raise ValueError(
            f"chosen_ids {tuple(c.shape)} and rejected_ids {tuple(r.shape)} must have one shape (collate_pairs pads them)"
        )
    return {
        "input_ids": torch.cat([c, r], 1),
        "attention_mask": torch.cat([x["chosen_attention_mask"], x["rejected_attention_mask"]], 1),
        "segment_ids": torch.cat([torch.zeros_like(c), torch.ones_like(r)], 1),
    }


def pair_logps(
    token_logp: torch.Tensor, chosen_loss_mask: torch.Tensor, rejected_loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probabilities ``[b]`` of both answers from packed next-token log-probs ``[b, 2S-1]``.

    Entry ``t`` scores token ``t + 1``: the chosen answer's tokens ``1..S-1`` are entries
    ``0..S-2``, the rejected answer's are ``S..2S-2`` (entry ``S-1`` crosses the two segments).
    """
    from lightning_real.algorithms.dpo import sequence_logps

    s = chosen_loss_mask.shape[1]
    if token_logp.shape[1] != 2 * s - 1:
        raise ValueError(f"packed log-probs have {token_logp.shape[1]} positions, expected {2 * s - 1}")
    dev = token_logp.device
    chosen = sequence_logps(token_logp[:, : s - 1], chosen_loss_mask[:, 1:].to(dev))
    rejected = sequence_logps(token_logp[:, s:], rejected_loss_mask[:, 1:].to(dev))
    return chosen, rejected


class DPOModule(RLHFModule):
    """DPO (Rafailov et al., 2023) on preference pairs (:class:`~lightning_real.data.modules.PreferenceDataModule`).

    The actor trains on ``actor_train``'s layout; the reference is frozen and lives on
    ``ref_inf``'s layout (its only call). Metrics carry TRL's names under ``dpo/``: ``dpo/loss``,
    ``dpo/rewards/{chosen,rejected,margins,accuracies}``, ``dpo/logps/{chosen,rejected}``, plus
    ``actor/grad_norm`` and ``actor/lr``.

    Args:
        actor: HF checkpoint folder or ModelSpec (random init) of the policy.
        ref: the reference model; None: a frozen copy of ``actor``'s source (the usual DPO set-up).
        batch_size: preference pairs per step (the data module's batch size).
        dpo: beta and label smoothing.
        optim: AdamW settings of the actor.
        n_mbs: microbatches per data-parallel replica, for every call or per call name.
        seed: seed of a random init.
    """

    progress_bar_keys = ("dpo/loss", "dpo/rewards/accuracies")

    def __init__(
        self,
        actor: ModelSource,
        ref: ModelSource | None = None,
        *,
        batch_size: int,
        dpo: DPOConfig | None = None,
        optim: OptimConfig | None = None,
        n_mbs: int | Mapping[str, int] = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.actor_source = actor
        self.ref_source = actor if ref is None else ref
        self.batch_size = batch_size
        self.dpo = dpo or DPOConfig()
        self.optim = optim or OptimConfig(lr=1e-6)
        self.n_mbs = n_mbs
        self.seed = seed
        self.spec = spec_of(actor, "lm")
        self.ref_spec = spec_of(self.ref_source, "lm")
        if self.ref_spec.vocab_size != self.spec.vocab_size:
            raise ValueError(
                f"actor and reference vocabularies differ ({self.spec.vocab_size} vs {self.ref_spec.vocab_size})"
            )
        self.real_graph()  # checks batch_size and n_mbs now rather than at setup

    def real_graph(self) -> DataflowGraph:
        return dpo_graph(self.batch_size, self.n_mbs)

    def real_roles(self) -> tuple[RoleDecl, ...]:
        # norm_key None: the summed loss and metrics are divided by the number of pairs (rows).
        # Each row already holds a pair as two segments: rows are not packed further.
        training = Training(self._loss, self.optim, norm_key=None, packable=False)
        return (
            RoleDecl("actor", self.actor_source, self.spec, self.seed, training=training),
            RoleDecl("ref", self.ref_source, self.ref_spec, self.seed),
        )

    def make_source(self, batch: Any) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in PAIR_SOURCES}

    def _loss(self, out: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from lightning_real.algorithms.dpo import dpo_loss
        from lightning_real.models.vocab_parallel import next_token_logprobs

        lp = next_token_logprobs(out, mb["input_ids"], self.engines["actor"].tp_group)
        chosen, rejected = pair_logps(lp, mb["chosen_loss_mask"], mb["rejected_loss_mask"])
        loss, m = dpo_loss(
            chosen, rejected, mb["ref_chosen_logp"], mb["ref_rejected_logp"], self.dpo, reduction="sum"
        )
        metrics = {k if k.startswith("dpo/") else f"dpo/{k}": v for k, v in m.items()}
        metrics["dpo/logps/chosen"] = chosen.detach().sum()
        metrics["dpo/logps/rejected"] = rejected.detach().sum()
        return loss, metrics

    def real_calls(self, ctx: RuntimeContext) -> dict[str, CallFn]:
        from lightning_real.models.forward import forward_logprobs

        engine, ref_mbs = ctx.engine("actor"), ctx.microbatches("ref_inf")

        def ref_inf(shard: ModelShard | None, x: Batch) -> tuple[Batch, dict[str, float]]:
            assert shard is not None
            p = pack_pairs(x)
            lp = forward_logprobs(shard, p["input_ids"], p["attention_mask"], ref_mbs, p["segment_ids"])
            chosen, rejected = pair_logps(lp, x["chosen_loss_mask"], x["rejected_loss_mask"])
            return {"ref_chosen_logp": chosen, "ref_rejected_logp": rejected}, {}

        def actor_train(shard: ModelShard | None, x: Batch) -> tuple[Batch, dict[str, float]]:
            batch = {
                **pack_pairs(x),
                "chosen_loss_mask": x["chosen_loss_mask"],
                "rejected_loss_mask": x["rejected_loss_mask"],
                "ref_chosen_logp": x["ref_chosen_logp"],
                "ref_rejected_logp": x["ref_rejected_logp"],
            }
            m = engine.step(batch)
            metrics = {k: v for k, v in m.items() if k.startswith("dpo/")}
            metrics.update({"actor/grad_norm": m["grad_norm"], "actor/lr": m["lr"]})
            return {}, metrics

        return {"ref_inf": ref_inf, "actor_train": actor_train}
