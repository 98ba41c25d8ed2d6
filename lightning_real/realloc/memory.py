"""Free and re-create the storage of a shard's parameters, and park shards in host memory.

A shard keeps its module and its ``nn.Parameter`` objects for its whole life (optimizers and
megatron's tied-weight bookkeeping hold references to them); only the storage behind them comes
and goes. :func:`release` shrinks each parameter's storage to zero bytes and :func:`materialize`
grows it back (uninitialised: a move in fills it). Parameters sharing one storage (tied
weights) are handled once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_real.compat import has_cuda

_NBYTES = "_lreal_storage_nbytes"


def _params(module: nn.Module | None) -> list[nn.Parameter]:
    return [] if module is None else list(module.parameters())


def is_released(module: nn.Module | None) -> bool:
    """Whether the module's parameters have no storage (released or offloaded)."""
    ps = _params(module)
    return bool(ps) and all(p.untyped_storage().nbytes() == 0 for p in ps)


def resident_bytes(module: nn.Module | None) -> int:
    """Bytes of parameter storage the module holds now (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for p in _params(module):
        st = p.untyped_storage()
        if st.nbytes() and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def release(module: nn.Module | None) -> int:
    """Free the storage of every parameter (and its gradient); return the bytes freed."""
    freed = 0
    for p in _params(module):
        p.grad = None
        st = p.untyped_storage()
        n = st.nbytes()
        if n:
            setattr(p, _NBYTES, n)
            st.resize_(0)
            freed += n
    return freed


def materialize(module: nn.Module | None) -> int:
    """Give released parameters their storage back (contents undefined); return the bytes allocated."""
    grown = 0
    for p in _params(module):
        st = p.untyped_storage()
        if st.nbytes() == 0 and int(getattr(p, _NBYTES, 0)) > 0:
            st.resize_(getattr(p, _NBYTES))
            grown += st.nbytes()
    return grown


@dataclass
class HostCopy:
    """Parameter values of one module parked in host memory (pinned when CUDA is present)."""

    tensors: list[torch.Tensor] = field(default_factory=list)
    """One host tensor per parameter, in ``module.parameters()`` order."""

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        return sum(t.numel() * t.element_size() for t in self.tensors)


@torch.no_grad()
def offload(module: nn.Module | None) -> HostCopy:
    """Copy the parameters to host memory and free their device storage."""
    out = HostCopy()
    for p in _params(module):
        host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=has_cuda())
        host.copy_(p.detach(), non_blocking=has_cuda())
        out.tensors.append(host)
    if has_cuda():
        torch.cuda.current_stream().synchronize()
    release(module)
    return out


@torch.no_grad()
def reload(module: nn.Module | None, copy: HostCopy) -> None:
    """Re-create the parameters' storage and fill it from ``copy`` (the inverse of :func:`offload`)."""
    params = _params(module)
    if len(params) != len(copy.tensors):
        raise ValueError(f"host copy holds {len(copy.tensors)} tensors but the module has {len(params)}")
    materialize(module)
    for p, host in zip(params, copy.tensors):
        p.copy_(host, non_blocking=has_cuda())
