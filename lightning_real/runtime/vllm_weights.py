"""The tensors a generate shard hands to its vLLM engine: each rank its own tensor-parallel part.

vLLM's checkpoint-format loaders take full-shape HF tensors and narrow each to the slice of
their tensor-parallel rank (``QKVParallelLinear`` per q/k/v part, ``MergedColumnParallelLinear``
per gate/up part, ``RowParallelLinear`` on the input dimension, the vocabulary layers on their
row range). So a rank never needs the other ranks' parts, only tensors of the full shape:

* **direct path**: per canonical tensor, a full-shape tensor holding this rank's slice of its
  shard and zeros elsewhere, turned into HF tensors by the same permutation as an HF export
  (:func:`~lightning_real.models.hf_convert.from_canonical`: megatron's fused per-group qkv into
  q/k/v, fc1 into gate/up). No communication. It serves a tensor when the rows vLLM's rank reads
  are all rows this rank holds: true for every linear layer (megatron and vLLM both split heads,
  ffn and input columns into ``tp`` contiguous parts in rank order), and for a vocabulary tensor
  only where the two pad the vocabulary alike (megatron to ``pad_vocab_to_multiple_of * tp``,
  vLLM to a multiple of 64, each then split evenly);
* **full-tensor path** (the fallback, and the reference tests check the direct path against):
  the canonical tensor gathered over the tensor-parallel group.

Tensors are built and handed over one canonical tensor at a time; vLLM's in-place reload keeps a
layer's tensors until all its parameters have arrived, so the peak is about one fused layer's
full-shape tensors (q, k and v; gate and up), not the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from lightning_real.models.hf_convert import from_canonical, hf_names
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import ParamSpec


@dataclass(frozen=True)
class WeightUpdate:
    """What one weight update of a vLLM engine did on this rank."""

    path: Literal["direct", "full", "mixed"]
    """``direct``: every tensor from this rank's shard alone; ``full``: every tensor gathered over
    the tensor-parallel group; ``mixed``: the tensors in ``gathered`` gathered, the rest direct."""
    bytes_sent: int
    """Bytes this rank sent to other ranks for the update (0 on the direct path)."""
    bytes_local: int
    """Bytes of this rank's own shard written into the tensors handed to the engine."""
    bytes_loaded: int
    """Bytes of the full-shape HF tensors handed to vLLM's loaders (each reads its rank's slice)."""
    seconds: float
    """Wall time of building, loading and vLLM's repacking."""
    gathered: tuple[str, ...] = ()
    """HF names of the tensors that took the full-tensor path."""


def vllm_vocab_rows(rows_per_rank: int, vocab: int, tp_rank: int) -> tuple[int, int]:
    """Canonical rows vLLM's vocabulary layer reads on ``tp_rank``: its even split of the padded
    vocabulary, clipped to the real rows."""
    return min(tp_rank * rows_per_rank, vocab), min((tp_rank + 1) * rows_per_rank, vocab)


def direct_serves(ps: ParamSpec, tp: int, vocab_rows_per_rank: int | None) -> bool:
    """Whether every rank's vLLM loader reads only rows that rank's shard of ``ps`` holds.

    ``vocab_rows_per_rank``: rows per rank of vLLM's padded vocabulary layer for a vocabulary
    tensor (None when the engine has no such layer under the tensor's name).
    """
    if ps.pad_multiple is None or tp == 1:
        return True
    if vocab_rows_per_rank is None:
        return False
    vocab = ps.view_shape[0]
    for r in range(tp):
        lo, hi = vllm_vocab_rows(vocab_rows_per_rank, vocab, r)
        mlo, mhi = ps.chunk(r, tp)
        if lo < hi and not (mlo <= lo and hi <= mhi):
            return False
    return True


def gathered_keys(shard: ModelShard, vocab_rows_per_rank: dict[str, int]) -> frozenset[str]:
    """Canonical keys of ``shard`` the direct path cannot serve (``vocab_rows_per_rank`` by HF name)."""
    tp = shard.layout.tp
    out = set()
    for ps, _ in shard.params():
        (name, *_) = hf_names(shard.spec, ps.key)
        if not direct_serves(ps, tp, vocab_rows_per_rank.get(name)):
            out.add(ps.key)
    return frozenset(out)


def _own_rows(ps: ParamSpec, local: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's canonical rows of ``local`` (vocabulary padding dropped), as a view of the
    canonical view's shape."""
    view = list(ps.view_shape)
    assert ps.tp_dim is not None
    view[ps.tp_dim] = ps.split_length(tp) // tp
    lo, hi = ps.chunk(tp_rank, tp)
    return local.reshape(view).narrow(ps.tp_dim, 0, hi - lo)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _placed(ps: ParamSpec, local: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """The canonical-shape tensor with this rank's slice filled and zeros elsewhere (what vLLM
    does not read on this rank)."""
    if ps.tp_dim is None:
        return local  # replicated: this rank holds it all (vLLM copies from it)
    if tp == 1:
        return local if ps.pad_multiple is None else ps.from_locals([local])  # padding dropped
    lo, hi = ps.chunk(tp_rank, tp)
    full = local.new_zeros(ps.canonical_shape)
    full.view(ps.view_shape).narrow(ps.tp_dim, lo, hi - lo).copy_(_own_rows(ps, local, tp_rank, tp))
    return full


def _gathered(ps: ParamSpec, local: torch.Tensor, group: Any, tp: int) -> tuple[torch.Tensor, int]:
    """The canonical tensor from every tensor-parallel rank's slice; (it, bytes this rank sent)."""
    if ps.tp_dim is None or tp == 1:
        return _placed(ps, local, 0, tp), 0
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return ps.from_locals(parts), (tp - 1) * _nbytes(local)


class EngineFeed:
    """The tensors of one weight update and what building them cost on this rank.

    Iterating yields the shard's model as full-shape HF tensors, one canonical tensor at a time:
    the keys in ``gather`` gathered over the tensor-parallel group (collective: every rank of the
    group iterates to the end), the others from this rank's slice alone.
    """

    def __init__(self, shard: ModelShard, gather: frozenset[str]) -> None:
        self.shard = shard
        self.gather = gather
        self.bytes_sent = 0
        self.bytes_local = 0
        self.gathered: list[str] = []

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        shard, g, tp = self.shard, self.shard.groups, self.shard.layout.tp
        for ps, p in shard.params():
            local = p.detach()
            names = hf_names(shard.spec, ps.key)
            if ps.key in self.gather:
                full, sent = _gathered(ps, local, g.tp, tp)
                self.bytes_sent += sent
                self.gathered.extend(names)
            else:
                full = _placed(ps, local, g.tp_rank, tp)
            own = full if ps.tp_dim is None or tp == 1 else _own_rows(ps, local, g.tp_rank, tp)
            self.bytes_local += _nbytes(own)
            yield from zip(names, from_canonical(shard.spec, ps.key, full), strict=True)
            del full, own  # one canonical tensor alive at a time

    def record(self, bytes_loaded: int, seconds: float) -> WeightUpdate:
        """The :class:`WeightUpdate` once the engine has read every tensor."""
        n_keys = len({ps.key for ps, _ in self.shard.params()})
        path: Literal["direct", "full", "mixed"] = (
            "direct" if not self.gather else "full" if len(self.gather) >= n_keys else "mixed"
        )
        return WeightUpdate(
            path, self.bytes_sent, self.bytes_local, bytes_loaded, seconds, tuple(self.gathered)
        )
