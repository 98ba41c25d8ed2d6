"""How per-token losses ``[B, T]`` become one number: verl's ``loss_agg_mode`` over a masked batch.

Four modes, with ``m`` the action mask, ``n_i = sum_t m[i, t]`` the response length of row ``i``,
``B`` the number of sequences and ``L`` a constant length (``loss_agg_len``):

============================ ================================================== ===============
mode                         verl's value on one batch                          normaliser
============================ ================================================== ===============
``token-mean``               ``sum_{i,t} m x / sum_{i,t} m``                    tokens
``seq-mean-token-mean``      ``1/B sum_i (sum_t m x / n_i)``                     sequences
``seq-mean-token-sum``       ``1/B sum_i sum_t m x``                            sequences
``seq-mean-token-sum-norm``  ``1/B sum_i sum_t m x / L`` (Dr. GRPO)              sequences
============================ ================================================== ===============

:class:`~lightning_real.models.train.TrainEngine` takes the *sum* of a loss over each
microbatch and divides by one global normaliser, the sum of ``batch[norm_key]`` over the global
batch (the number of sequences when ``norm_key`` is None). So each mode splits into a numerator
that adds up over rows (:func:`agg_loss` with ``reduction="sum"``) and a normaliser
(:func:`agg_norm_key` for the engine's config, :func:`agg_normaliser` for its value on a batch):

* ``token-mean``: ``sum_{i,t} m x`` over ``norm_key = "action_mask"`` (the token count);
* ``seq-mean-token-mean``: ``sum_i (sum_t m x / n_i)`` over ``norm_key = None``;
* ``seq-mean-token-sum``: ``sum_{i,t} m x`` over ``norm_key = None``;
* ``seq-mean-token-sum-norm``: ``sum_{i,t} m x / L`` over ``norm_key = None`` (so the result
  is the token sum divided by ``B x L``: Dr. GRPO's constant normaliser, ``L`` typically the
  generation's ``max_new_tokens``).

Rows with an empty mask add 0 to every numerator; the sequence modes still count them in ``B``
(verl leaves them out of its count). Generated responses always hold at least one token (the
first sampled one, EOS included), so on rollout batches the two agree.
"""

from __future__ import annotations

from typing import Literal

import torch

from lightning_real.algorithms.masked import REDUCTIONS, Reduction, masked_mean, masked_sum

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def check_loss_agg(mode: str, loss_agg_len: int | None = None, owner: str = "loss_agg") -> None:
    """ValueError naming ``owner`` unless ``mode`` is a known mode with the constant it needs."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"{owner}={mode!r}; allowed: {', '.join(LOSS_AGG_MODES)}")
    if mode == "seq-mean-token-sum-norm" and (
        not isinstance(loss_agg_len, int) or isinstance(loss_agg_len, bool) or loss_agg_len < 1
    ):
        raise ValueError(
            f"{owner}='seq-mean-token-sum-norm' needs loss_agg_len, the constant length it divides by "
            f"(e.g. max_new_tokens); got loss_agg_len={loss_agg_len!r}; allowed: an integer >= 1"
        )


def agg_norm_key(mode: str, mask_key: str = "action_mask") -> str | None:
    """The ``TrainConfig.norm_key`` that turns :func:`agg_loss`'s sum into ``mode``'s mean.

    ``mask_key`` for 'token-mean' (divide by the global token count), None for the sequence modes
    (divide by the number of sequences).
    """
    check_loss_agg(mode, 1)
    return mask_key if mode == "token-mean" else None


def agg_packable(mode: str) -> bool:
    """Whether ``mode``'s numerator is a sum over tokens (every mode but 'seq-mean-token-mean'),
    which packed rows keep: a per-sequence mean needs its rows apart."""
    check_loss_agg(mode, 1)
    return mode != "seq-mean-token-mean"


def agg_normaliser(mode: str, mask: torch.Tensor) -> torch.Tensor:
    """What the engine divides by for ``mode`` on a batch with action mask ``mask`` ``[B, T]``:
    its token count, or its number of rows; at least 1 (as the engine's)."""
    check_loss_agg(mode, 1)
    if mode == "token-mean":
        n = mask.to(torch.float32).sum()
    else:
        n = torch.tensor(float(mask.shape[0]))
    return n.clamp(min=1.0)


def agg_loss(
    x: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAgg = "token-mean",
    reduction: Reduction = "mean",
    loss_agg_len: int | None = None,
) -> torch.Tensor:
    """Aggregate per-token values ``x`` ``[B, T]`` under ``mask`` as ``mode`` (see the module doc).

    ``reduction="sum"`` gives the numerator, to be divided by the global normaliser
    (:func:`agg_norm_key`); ``"mean"`` divides by this batch's :func:`agg_normaliser`, i.e. the
    value of verl's ``agg_loss`` on the batch.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    check_loss_agg(mode, loss_agg_len)
    m = mask.to(torch.float32)
    xf = x.float()
    if mode == "token-mean":
        if reduction == "mean":
            return masked_mean(xf, m)
        return masked_sum(xf, m)
    if mode == "seq-mean-token-mean":
        total = masked_mean(xf, m, dim=-1).sum()
    elif mode == "seq-mean-token-sum":
        total = masked_sum(xf, m)
    else:
        assert loss_agg_len is not None
        total = masked_sum(xf, m) / float(loss_agg_len)
    if reduction == "sum":
        return total
    return total / agg_normaliser(mode, m)
