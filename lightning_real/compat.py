"""Lets megatron-core run on machines without CUDA (gloo on CPU). Does nothing when CUDA is present.

megatron-core 0.16 asks CUDA for the current device (RoPE, attention buffers, pipeline p2p),
allocates pipeline bookkeeping with ``device="cuda"``, calls ``torch.cuda.synchronize`` and
creates CUDA streams. On a CPU-only machine these are answered here:

* ``torch.cuda.current_device()`` returns ``"cpu"``, ``torch.cuda.synchronize`` is a no-op and
  the CUDA random state that activation recomputation saves is empty (:func:`apply_cpu_compat`,
  applied once, process-wide);
* tensors created with ``device="cuda"`` land on the CPU while :func:`cuda_to_cpu` is active
  (entered around pipeline schedules only, so user code still fails loudly on a cuda device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def has_cuda() -> bool:
    """Whether this process can use CUDA."""
    return torch.cuda.is_available()


def apply_cpu_compat() -> None:
    """Patch the few CUDA queries megatron-core makes; a no-op with CUDA or when already applied."""
    global _applied
    if _applied or has_cuda():
        return
    from lightning_real.quiet import quiet_cpu_advice

    quiet_cpu_advice()  # megatron's CUDA_DEVICE_MAX_CONNECTIONS advice cannot apply to a CPU
    # megatron-core only passes the answer on as a device: "cpu" works where an index would not.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    torch.cuda.synchronize = lambda *a, **k: None

    class _NullStream:
        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def wait_stream(self, *a: Any, **k: Any) -> None:
            pass

        def synchronize(self) -> None:
            pass

    torch.cuda.Stream = _NullStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]

    # The default causal mask is built with device="cuda"; callers without a mask get it here.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as mutils

    def _causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    mutils.get_default_causal_mask = _causal_mask
    fused_softmax.get_default_causal_mask = _causal_mask

    # Activation recomputation saves and restores the CUDA random state around a recomputed
    # block; without CUDA there is none (the CPU state is saved and restored as usual).
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    _applied = True


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu() -> Iterator[None]:
    """Map ``device='cuda'`` to the CPU inside the block; a no-op when CUDA is present."""
    if has_cuda():
        yield
        return
    with _CudaToCpu():
        yield


def device() -> torch.device:
    """The device this process computes on: its CUDA device, or the CPU."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
