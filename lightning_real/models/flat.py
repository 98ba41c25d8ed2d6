"""A trained shard's parameters and gradients as two flat buffers, reduced over data parallelism.

Every trainable parameter of the rank becomes a view into one contiguous *parameter buffer* (the
working dtype), and its gradient accumulates into a contiguous *main-gradient buffer* (fp32, or
bf16 under 'bf16-true'). When the parameter's dtype equals the gradient buffer's, ``p.grad`` is
itself a view of that buffer and autograd accumulates into it in place; a bf16 parameter with
fp32 main gradients adds each microbatch's gradient into the fp32 view (a post-accumulate hook),
so accumulation over microbatches and the data-parallel reduction run in fp32 (megatron-core's
``main_grad``). Flat buffers make the data-parallel reduction one collective: an all-reduce when
every replica keeps all optimizer states, a reduce-scatter (each replica keeps 1/dp of them,
ZeRO-1) followed by an all-gather of the updated parameters otherwise. Both buffers are padded
to a multiple of dp so that every replica's shard has the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lightning_real.distributed.groups import LayoutGroups
from lightning_real.models.sharding import ParamSpec

NamedParams = list[tuple[ParamSpec, nn.Parameter]]


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in the flat buffers."""

    spec: ParamSpec
    """Its sharding description."""
    param: nn.Parameter
    """The parameter (a view of the parameter buffer)."""
    start: int
    """First element in the buffers."""
    numel: int
    """Number of elements."""


class FlatBuffers:
    """This rank's trainable parameters and main gradients, flat (see the module docstring)."""

    def __init__(
        self, params: NamedParams, groups: LayoutGroups, grad_dtype: torch.dtype, shards: int
    ) -> None:
        if not params:
            raise ValueError("FlatBuffers needs at least one parameter")
        self.groups = groups
        self.shards = shards
        """Data-parallel replicas the buffers are split over (1: no split)."""
        dtype = params[0][1].dtype
        device = params[0][1].device
        if any(p.dtype != dtype for _, p in params):
            raise ValueError(
                f"parameters of one shard must share a dtype, got {sorted({str(p.dtype) for _, p in params})}"
            )
        total = sum(p.numel() for _, p in params)
        self.numel = -(-total // shards) * shards
        """Elements of each buffer (padded to a multiple of ``shards``)."""
        self.params = torch.zeros(self.numel, dtype=dtype, device=device)
        self.grads = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.slots: list[Slot] = []
        start = 0
        with torch.no_grad():
            for ps, p in params:
                n = p.numel()
                view = self.params[start : start + n].view_as(p)
                view.copy_(p.data)
                p.data = view
                self.slots.append(Slot(ps, p, start, n))
                start += n
        self._hooks = []
        self._aliased = dtype == grad_dtype
        for slot in self.slots:
            grad = self.grads[slot.start : slot.start + slot.numel].view_as(slot.param)
            slot.param.main_grad = grad  # type: ignore[attr-defined]
            if not self._aliased:
                self._hooks.append(slot.param.register_post_accumulate_grad_hook(_accumulate))
        self.attach_grads()

    # ---- the shard this rank updates --------------------------------------------------------
    @property
    def shard_range(self) -> tuple[int, int]:
        """Elements ``[lo, hi)`` of the buffers whose optimizer state this rank keeps."""
        if self.shards == 1:
            return 0, self.numel
        size = self.numel // self.shards
        r = self.groups.dp_rank
        return r * size, (r + 1) * size

    def param_shard(self) -> torch.Tensor:
        """This rank's part of the parameter buffer (a view)."""
        lo, hi = self.shard_range
        return self.params[lo:hi]

    def grad_shard(self) -> torch.Tensor:
        """This rank's part of the main-gradient buffer (a view)."""
        lo, hi = self.shard_range
        return self.grads[lo:hi]

    def pieces(self) -> list[tuple[Slot, int, int]]:
        """``(slot, lo, hi)``: the part of each parameter inside this rank's shard, buffer coordinates."""
        lo, hi = self.shard_range
        out = []
        for s in self.slots:
            a, b = max(lo, s.start), min(hi, s.start + s.numel)
            if a < b:
                out.append((s, a, b))
        return out

    # ---- gradients ----------------------------------------------------------------------------
    def attach_grads(self) -> None:
        """Zero the main gradients (giving them their memory back after :meth:`release_grads`);
        parameters whose dtype matches accumulate straight into them."""
        storage = self.grads.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(self.numel * self.grads.element_size())
        self.grads.zero_()
        for slot in self.slots:
            slot.param.grad = slot.param.main_grad if self._aliased else None  # type: ignore[attr-defined]

    def detach_grads(self) -> None:
        """Take the gradients off the parameters (the buffer keeps its memory)."""
        for slot in self.slots:
            slot.param.grad = None

    def release_grads(self) -> int:
        """Free the main-gradient buffer's memory until the next :meth:`attach_grads` (between a
        model's train calls the gradients are not needed); the bytes freed. Views of the buffer
        stay valid: the storage is resized, not replaced."""
        self.detach_grads()
        storage = self.grads.untyped_storage()
        freed = storage.nbytes()
        storage.resize_(0)
        return freed

    @torch.no_grad()
    def reduce(self, tied: list[Slot]) -> None:
        """Finish the gradients: tied copies summed over the embedding group, then the average over
        the data-parallel group (reduce-scattered to each replica's shard when split)."""
        g = self.groups
        for slot in tied:
            dist.all_reduce(slot.param.main_grad, group=g.embd)  # type: ignore[attr-defined]
        dp = g.layout.dp
        if dp == 1:
            return
        if self.shards == 1:
            dist.all_reduce(self.grads, group=g.dp)
            self.grads /= dp
            return
        shard = torch.empty_like(self.grad_shard())
        dist.reduce_scatter_tensor(shard, self.grads, group=g.dp)
        self.grad_shard().copy_(shard).div_(dp)

    @torch.no_grad()
    def gather_params(self) -> None:
        """Every replica's updated shard into every replica's parameter buffer (split only)."""
        if self.shards == 1:
            return
        dist.all_gather_into_tensor(self.params, self.param_shard().clone(), group=self.groups.dp)


def _accumulate(p: torch.Tensor) -> None:
    """Add a 16-bit parameter's fresh gradient into its fp32 main gradient (then drop it)."""
    assert p.grad is not None
    p.main_grad.add_(p.grad)  # type: ignore[attr-defined]
    p.grad = None
