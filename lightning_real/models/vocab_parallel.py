"""Log-probabilities and entropy from logits split over tensor-parallel ranks, without gathering them.

megatron-core's ``vocab_parallel_cross_entropy`` reads its process-wide tensor-parallel group;
models here carry their own groups, so these versions take the group explicitly.

Padding columns of a padded vocabulary arrive as -inf (see :func:`lightning_real.models.build.
mask_padded_logits`): they get no probability mass, and nothing here multiplies them, so they
produce no NaN in values or gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["gather_vocab", "vocab_parallel_entropy", "vocab_parallel_logprobs"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the tensor-parallel group; backward is the identity.

    The result feeds a loss every tp rank computes identically, so each rank's gradient with
    respect to its own contribution is the upstream gradient itself (megatron's
    ``reduce_from_tensor_model_parallel_region``, with an explicit group).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _tp_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    return x if _tp_size(group) == 1 else _AllReduceSum.apply(x, group)


def _row_max(z: torch.Tensor, group: Any) -> torch.Tensor:
    """The row maximum over the whole (split) vocabulary, ``[..., 1]``, as a constant."""
    m = z.detach().max(dim=-1, keepdim=True).values
    if _tp_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return m


def _shifted(logits: torch.Tensor, group: Any) -> torch.Tensor:
    """Logits minus their (global, constant) row maximum, in fp32."""
    logits = logits.float()
    return logits - _row_max(logits, group)


class _LogProbs(torch.autograd.Function):
    """``log softmax(z)[label]`` over a vocabulary split across ``group``, with its own backward.

    megatron-core's ``_VocabParallelCrossEntropy`` in form: the forward keeps only the softmax
    (one fp32 tensor of the logits' size, normalised in place) and the backward turns it into
    the gradient ``onehot - softmax`` in place, where autograd through the composed ops would
    keep the shifted logits and their exponential and write several logit-sized temporaries.
    The saved softmax is consumed by the first backward, so a second one is refused.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, group: Any) -> torch.Tensor:
        z = logits.float()
        # A bf16 input was copied to fp32 here: that copy becomes the exponential in place. (An
        # fp32 result from the bf16 logits in one op is no cheaper on CPU: torch casts the bf16
        # operand to an fp32 temporary first.)
        owned = z.data_ptr() != logits.data_ptr()
        m = _row_max(z, group)
        tp = _tp_size(group)
        part = z.shape[-1]
        lo = 0 if group is None else dist.get_rank(group) * part
        local = labels - lo
        inside = (local >= 0) & (local < part)
        idx = local.clamp(0, part - 1).unsqueeze(-1)
        # A label held elsewhere may be clamped onto a -inf padding column: select, do not multiply.
        picked = torch.where(inside, z.gather(-1, idx).squeeze(-1) - m.squeeze(-1), 0.0)
        # the one logit-sized fp32 tensor; padding columns (-inf) give 0
        e = (z.sub_(m) if owned else z - m).exp_()
        sumexp = e.sum(-1)
        if tp > 1:
            both = torch.stack([picked, sumexp])
            dist.all_reduce(both, group=group)
            picked, sumexp = both[0], both[1]
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(e.div_(sumexp.unsqueeze(-1)), idx, inside)
            ctx.dtype = logits.dtype
            ctx.spent = False
        return picked - sumexp.log()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.spent:
            raise RuntimeError(
                "vocab_parallel_logprobs: backward ran twice through the same graph; its saved "
                "softmax becomes the gradient in place (run the forward again instead of retain_graph)"
            )
        ctx.spent = True
        probs, idx, inside = ctx.saved_tensors
        # d lp / d z = onehot(label) - softmax; every tp rank computes the same loss, so the
        # upstream gradient is each rank's own (megatron's reduce_from_tensor_model_parallel_region).
        g = grad.float().unsqueeze(-1)
        out = probs.mul_(-g)
        out.scatter_add_(-1, idx, g * inside.unsqueeze(-1))
        return out.to(ctx.dtype), None, None


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """``log softmax(logits)[labels]`` for logits split over the vocabulary, ``[b, s]`` fp32.

    ``logits`` is this rank's ``[b, s, P/tp]`` slice of the (padded) vocabulary, tp rank r
    holding columns r*P/tp ...; ``labels`` holds global token ids. Every tp rank gets the same
    result and gradients flow to each rank's own slice. ``tp_group`` None means the logits are
    complete. One backward per forward (see :class:`_LogProbs`).
    """
    out: torch.Tensor = _LogProbs.apply(logits, labels, tp_group)
    return out


def vocab_parallel_entropy(logits: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position for logits split over the vocabulary, ``[b, s]``."""
    z = _shifted(logits, tp_group)
    e = z.exp()
    sumexp = _tp_sum(e.sum(-1), tp_group)
    # p log p -> 0 for masked (-inf) columns; 0 * -inf would be NaN, in the backward too.
    finite_z = z.masked_fill(z == float("-inf"), 0.0)
    weighted = _tp_sum((e * finite_z).sum(-1), tp_group)
    # H = log S - sum_j p_j z_j with z shifted by a constant (which H does not depend on).
    return sumexp.log() - weighted / sumexp


def gather_vocab(logits: torch.Tensor, group: Any = None, vocab_size: int | None = None) -> torch.Tensor:
    """Full-vocabulary logits from the tensor-parallel slices (tests and debugging only).

    ``vocab_size``: keep only the first ``vocab_size`` columns (drops a padded vocabulary's padding).
    """
    tp = 1 if group is None else dist.get_world_size(group)
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, -1)
    return logits if vocab_size is None else logits[..., :vocab_size]


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """``log p(token t+1 | tokens <= t)``, ``[b, s - 1]`` fp32, from ``[b, s, P/tp]`` logits.

    The values of ``vocab_parallel_logprobs(logits[:, :-1], input_ids[:, 1:], tp_group)``, without
    slicing the logits: the last position is scored against a stand-in label and dropped, so the
    backward hands back the logits' gradient whole (0 at that position), where the slice's
    backward would zero-fill a logit-sized tensor and copy the gradient into it.
    """
    labels = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    return vocab_parallel_logprobs(logits, labels, tp_group)[:, :-1]
