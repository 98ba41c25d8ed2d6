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

The reduction overlaps the backward (megatron-core's bucketed gradient reduction): the gradient
buffer is cut into buckets of about :data:`~lightning_real.features.GRAD_BUCKET_ELEMS` elements
in backward order, and once every parameter of a bucket has received its last microbatch's
gradient, the bucket's collective starts asynchronously (an all-reduce, or under ZeRO-1 one ``reduce`` to each replica
that owns part of the bucket: together the same bytes as the reduce-scatter) while autograd
goes on with earlier layers. :meth:`FlatBuffers.reduce` starts what is left and waits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lightning_real.distributed.groups import LayoutGroups
from lightning_real.features import GRAD_BUCKET_ELEMS
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


@dataclass
class _Bucket:
    """A contiguous range of the gradient buffer reduced by one group of collectives."""

    lo: int
    hi: int
    slots: list[int]
    """Indices of its parameters in ``FlatBuffers.slots``."""
    deferred: bool
    """Holds a tied copy, which is summed over the embedding group first: started in ``reduce``."""
    waiting: int = 0
    """Parameters still to receive their last gradient of this step."""
    handles: list = field(default_factory=list)
    """The started collectives (empty: not started)."""


class FlatBuffers:
    """This rank's trainable parameters and main gradients, flat (see the module docstring)."""

    def __init__(
        self,
        params: NamedParams,
        groups: LayoutGroups,
        grad_dtype: torch.dtype,
        shards: int,
        bucket_elems: int | None = GRAD_BUCKET_ELEMS,
        tied_keys: frozenset[str] = frozenset(),
    ) -> None:
        """``bucket_elems`` None: reduce the whole buffer after the backward (no overlap);
        ``tied_keys``: parameter keys whose gradients are first summed over the embedding group."""
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
        self._aliased = dtype == grad_dtype
        for slot in self.slots:
            grad = self.grads[slot.start : slot.start + slot.numel].view_as(slot.param)
            slot.param.main_grad = grad  # type: ignore[attr-defined]
        self.tied = [s for s in self.slots if s.spec.key in tied_keys]
        """Slots whose gradients are summed over the embedding group before the data-parallel average."""
        self.bucket_elems = bucket_elems
        """Gradient elements per reduction bucket (None: one reduction after the backward)."""
        self.buckets: list[_Bucket] = []
        """The gradient buckets, in backward order (empty: no overlap, or nothing to reduce)."""
        if bucket_elems is not None and groups.layout.dp > 1:
            self.buckets = _buckets(self.slots, bucket_elems, tied_keys)
        self._bucket_of = {i: b for b in self.buckets for i in b.slots}
        self._seen = [0] * len(self.slots)
        self._expect = 0  # backward passes this step; 0: not in a step, hooks only accumulate
        self._started_early = 0
        self._hooks = []
        if not self._aliased or self.buckets:
            for i, slot in enumerate(self.slots):
                hook = functools.partial(self._on_grad, i)
                self._hooks.append(slot.param.register_post_accumulate_grad_hook(hook))
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

    def expect_backwards(self, n: int) -> None:
        """A step with ``n`` microbatch backward passes begins: a bucket's collective starts when
        each of its parameters has had ``n`` gradients."""
        self._expect = n
        self._seen = [0] * len(self.slots)
        self._started_early = 0
        for b in self.buckets:
            b.waiting, b.handles = len(b.slots), []

    def _on_grad(self, index: int, p: torch.Tensor) -> None:
        if not self._aliased:
            _accumulate(p)
        if not self._expect:
            return
        self._seen[index] += 1
        bucket = self._bucket_of.get(index)
        if bucket is None or self._seen[index] != self._expect:
            return
        bucket.waiting -= 1
        if bucket.waiting == 0 and not bucket.deferred:
            self._start(bucket)

    @property
    def started_early(self) -> int:
        """Buckets of this step whose reduction a gradient hook started (before :meth:`reduce`)."""
        return self._started_early

    def _start(self, bucket: _Bucket) -> None:
        g = self.groups
        if bucket.handles:
            return
        if self._expect:
            self._started_early += 1
        if self.shards == 1:
            bucket.handles.append(
                dist.all_reduce(self.grads[bucket.lo : bucket.hi], group=g.dp, async_op=True)
            )
            return
        size = self.numel // self.shards
        for owner in range(bucket.lo // size, (bucket.hi - 1) // size + 1):
            a, b = max(bucket.lo, owner * size), min(bucket.hi, (owner + 1) * size)
            dst = dist.get_global_rank(g.dp, owner)
            bucket.handles.append(dist.reduce(self.grads[a:b], dst, group=g.dp, async_op=True))

    @torch.no_grad()
    def reduce(self) -> None:
        """Finish the gradients: tied copies summed over the embedding group, then the average over
        the data-parallel group (reduce-scattered to each replica's shard when split)."""
        g = self.groups
        for slot in self.tied:
            dist.all_reduce(slot.param.main_grad, group=g.embd)  # type: ignore[attr-defined]
        dp = g.layout.dp
        self._expect = 0  # the step's backward is over: what starts from here on is not early
        if dp == 1:
            return
        if self.buckets:
            for bucket in self.buckets:
                self._start(bucket)
            for bucket in self.buckets:
                for h in bucket.handles:
                    h.wait()
            (self.grads if self.shards == 1 else self.grad_shard()).div_(dp)
            return
        if self.shards == 1:
            dist.all_reduce(self.grads, group=g.dp)
            self.grads /= dp
            return
        shard = torch.empty_like(self.grad_shard())
        _reduce_scatter(shard, self.grads, group=g.dp)
        self.grad_shard().copy_(shard).div_(dp)

    @torch.no_grad()
    def gather_params(self) -> None:
        """Every replica's updated shard into every replica's parameter buffer (split only)."""
        if self.shards == 1:
            return
        _all_gather(self.params, self.param_shard().clone(), group=self.groups.dp)


# torch 2.13 renames the flat collectives (``*_single``) and warns on the old names; older
# releases (the GPU machine's 2.11) have only the old ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _buckets(slots: list[Slot], bucket_elems: int, tied_keys: frozenset[str]) -> list[_Bucket]:
    """Consecutive parameters from the last to the first (the order backward reaches them),
    cut where a bucket reaches ``bucket_elems`` elements."""
    out: list[_Bucket] = []
    cur: list[int] = []
    elems = 0
    for i in reversed(range(len(slots))):
        cur.append(i)
        elems += slots[i].numel
        if elems >= bucket_elems or i == 0:
            lo, hi = slots[cur[-1]].start, slots[cur[0]].start + slots[cur[0]].numel
            deferred = any(slots[j].spec.key in tied_keys for j in cur)
            out.append(_Bucket(lo, hi, cur, deferred))
            cur, elems = [], 0
    return out


def _accumulate(p: torch.Tensor) -> None:
    """Add a 16-bit parameter's fresh gradient into its fp32 main gradient (then drop it)."""
    assert p.grad is not None
    p.main_grad.add_(p.grad)  # type: ignore[attr-defined]
    p.grad = None
