"""Measure a hardware profile on this machine: a short profiling run on a local process cluster.

``world_size`` processes (gloo on CPU, NCCL on GPUs) measure, each with one intra-op thread:

* matmul FLOP/s of a transformer-layer-sized product (``[2048, 256] @ [256, 1024]``), by one
  process alone and by all at once (their sum is the node's shared throughput on a CPU);
* memory bandwidth of a 32 MB tensor copy, alone and all at once;
* elementwise throughput of a transformer layer's mix (RMSNorm, SwiGLU gate, residual add,
  softmax over ``[4096, 1024]``), counting each operation's nominal reads and writes (kept as
  a cross-check and a fallback);
* all-reduce latency (4 KB) and bus bandwidth (16 MB) over all processes;
* from the megatron-core backend itself: the fixed cost per transformer layer (forward of 1 and
  of 5 tiny layers on one token, divided by the 4 extra layers), backward over forward time,
  and the forward time of a small calibration model (3 layers, 192 wide, 8 x 256 tokens, with
  log-softmax), from which the elementwise throughput the cost model needs to reproduce it is
  solved (:func:`backend_elementwise_bw`; on CPUs, where these passes are far from the copy
  bandwidth), and the time per decode step of its generation, whose excess over the cost
  model's layers becomes the per-step overhead (:func:`backend_step_overhead`).

The result is a :class:`~lightning_real.planner.hardware.HardwareProfile` like the GPU ones, with
``gpus_per_node`` devices meant to be the processes of one node.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.compat import device
from lightning_real.dataflow import MFC
from lightning_real.features import REFERENCE
from lightning_real.models.shard import ModelShard
from lightning_real.models.spec import tiny_spec
from lightning_real.planner.cost import call_cost
from lightning_real.planner.hardware import Cluster, HardwareProfile

MM_SHAPE = (2048, 256, 1024)
CALIBRATION_SPEC = tiny_spec("llama", num_layers=3, hidden_size=192, ffn_hidden_size=512, vocab_size=2048)
"""A small model unlike the ones the planner is usually checked on (head width 48, GQA 2:1)."""
CALIBRATION_BATCH = (8, 256)
DECODE_BATCH, DECODE_STEPS = (8, 32), 16
"""Generation probe: 8 prompts of 32 tokens, then 16 decode steps."""
_BACKEND = REFERENCE
"""The features the calibration probes are built with (fp32, local attention, replicated Adam)."""
ELEMENTWISE_SHAPE = (4096, 1024)
COPY_BYTES = 32 * 2**20
SMALL_BYTES = 4 * 2**10
BIG_BYTES = 16 * 2**20


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Any, reps: int, block_s: float = 0.1) -> float:
    """Seconds per ``fn()`` in the fastest of ``reps`` blocks of at least ``block_s`` each.

    The best block is the machine's speed: other work on a shared machine only slows runs down.
    Blocks, rather than single runs, keep the number sustained (calls last far longer than one
    matmul) and take in a warm-up. ``block_s=0`` times single runs after one warm-up run, with
    the same number of runs on every rank (for collectives).
    """
    fn()
    _sync()
    best = float("inf")
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            _sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= block_s:
                break
        best = min(best, elapsed / n)
    return best


def _matmul_work(dev: torch.device) -> tuple[Any, float]:
    m, k, n = MM_SHAPE
    a = torch.randn(m, k, device=dev)
    b = torch.randn(k, n, device=dev)
    return (lambda: a @ b), 2.0 * m * k * n


def _copy_work(dev: torch.device) -> tuple[Any, float]:
    x = torch.randn(COPY_BYTES // 4, device=dev)
    y = torch.empty_like(x)
    return (lambda: y.copy_(x)), 2.0 * COPY_BYTES  # read + write


def _elementwise_work(dev: torch.device) -> tuple[Any, float]:
    """A transformer layer's elementwise mix: RMSNorm, SwiGLU gate, residual add, softmax."""
    import torch.nn.functional as F

    n, k = ELEMENTWISE_SHAPE
    x, a, b = (torch.randn(n, k, device=dev) for _ in range(3))
    w = torch.randn(k, device=dev)

    def run() -> None:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # read x, write y
        z = F.silu(a) * b  # read a, b, write z
        torch.softmax(y + z, dim=-1)  # read y, z, write; read, write

    return run, 10.0 * n * k * 4  # nominal reads and writes of the five tensors above, fp32


def _alone_and_together(rank: int, world: int, work: Any, reps: int) -> tuple[float, float]:
    """Rate of ``work`` on rank 0 alone (others wait), then of all ranks working at once.

    The shared rate is the total work over the wall time from a common start to the last rank's
    end: timing each rank's repetitions separately would count time slices in which the others
    happened not to run.
    """
    fn, amount = work
    alone = torch.zeros(1, dtype=torch.float64)
    if rank == 0:
        alone[0] = amount / _timed(fn, reps)
    dist.all_reduce(alone)
    fn()
    walls = []
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync()
        dist.barrier()
        walls.append(time.perf_counter() - t0)
    return float(alone[0]), world * reps * amount / min(walls)


def _allreduce_time(nbytes: int, dev: torch.device, reps: int) -> float:
    x = torch.ones(nbytes // 4, device=dev)

    def run() -> None:
        dist.all_reduce(x)

    dist.barrier()
    # a fixed number of runs: every rank must join the same collectives
    t = torch.tensor([_timed(run, reps, block_s=0.0)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


def _backend(rank: int, world: int, reps: int) -> tuple[float, float, float, float]:
    """(seconds per extra tiny layer, backward over forward time, seconds of an inference forward,
    seconds per decode step) of the megatron-core backend, measured on rank 0: forward of 1 and
    5 tiny layers on one token; forward with log-softmax, forward with backward, and generation
    of the calibration model."""
    from lightning_real.distributed.groups import GroupRegistry
    from lightning_real.layout import Layout
    from lightning_real.models.build import build_gpt

    reg = GroupRegistry()
    groups = reg.for_layout(Layout(1, 1, 1, (0,)))
    out = torch.zeros(4, dtype=torch.float64)
    if rank == 0:
        dev = device()

        def inputs(b: int, s: int) -> tuple[torch.Tensor, ...]:
            mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=dev), 1).view(1, 1, s, s)
            pos = torch.arange(s, device=dev).expand(b, s)
            return torch.zeros(b, s, dtype=torch.long, device=dev), pos, mask

        times = []
        one = inputs(1, 1)
        for layers in (1, 5):
            spec = tiny_spec("llama", num_layers=layers, hidden_size=64, ffn_hidden_size=128, vocab_size=64)
            model = build_gpt(spec, groups, seed=0).eval()
            with torch.no_grad():
                times.append(_timed(lambda m=model: m(*one), reps))
        out[0] = max(0.0, (times[1] - times[0]) / 4)
        model = build_gpt(CALIBRATION_SPEC, groups, seed=0)
        b, seq = CALIBRATION_BATCH
        args = inputs(b, seq)

        def forward() -> torch.Tensor:
            # logits and their log-softmax, as inference and training calls take them
            logits = model(*args).float()
            return torch.log_softmax(logits, dim=-1).gather(-1, args[0].unsqueeze(-1)).sum()

        with torch.no_grad():
            out[2] = _timed(forward, reps)
        out[3] = _decode_step(ModelShard.build(CALIBRATION_SPEC, groups, seed=0), reps)
        t_f = _timed(forward, reps)
        t_fb = _timed(lambda: forward().backward(), reps)
        out[1] = max(1.0, (t_fb - t_f) / t_f)
    dist.all_reduce(out)
    return float(out[0]), float(out[1]), float(out[2]), float(out[3])


def _decode_step(shard: Any, reps: int) -> float:
    """Seconds per decode step of the backend's generation (calibration prompts, sampling)."""
    from lightning_real.models.generate import GenerationConfig, generate

    b, n = DECODE_BATCH
    ids = torch.ones(b, n, dtype=torch.long, device=device())
    mask = torch.ones_like(ids)
    short, long = (
        _timed(lambda k=k: generate(shard, ids, mask, GenerationConfig(max_new_tokens=k, seed=0)), reps)
        for k in (1, 1 + DECODE_STEPS)
    )
    return max(0.0, (long - short) / DECODE_STEPS)


def _probe(rank: int, world: int, reps: int) -> dict[str, float]:
    dev = device()
    flops, node_flops = _alone_and_together(rank, world, _matmul_work(dev), reps)
    bw, node_bw = _alone_and_together(rank, world, _copy_work(dev), reps)
    ew, _ = _alone_and_together(rank, world, _elementwise_work(dev), reps)
    steps = math.ceil(math.log2(world)) if world > 1 else 1
    t_small = _allreduce_time(SMALL_BYTES, dev, reps)
    t_big = _allreduce_time(BIG_BYTES, dev, max(3, reps // 2))
    latency = t_small / steps
    factor = 2 * (world - 1) / world if world > 1 else 1.0
    link_bw = factor * BIG_BYTES / max(1e-9, t_big - steps * latency)
    overhead, bwd, t_fwd, t_step = _backend(rank, world, reps)
    return dict(
        flops=flops,
        node_flops=node_flops,
        mem_bw=bw,
        node_mem_bw=node_bw,
        latency=latency,
        link_bw=link_bw,
        layer_overhead=overhead,
        backward_factor=bwd,
        elementwise_mix_bw=ew,
        t_calibration_forward=t_fwd,
        t_calibration_decode_step=t_step,
        t_small=t_small,
        t_big=t_big,
    )


def calibrate(
    world_size: int = 4, reps: int = 10, name: str = ""
) -> tuple[HardwareProfile, dict[str, float]]:
    """Measure this machine with ``world_size`` processes; returns the profile and the raw numbers."""
    from lightning_real.distributed.launch import spawn

    raw = spawn(_probe, world_size, reps)[0]
    gpu = torch.cuda.is_available()
    if gpu:
        mem = float(torch.cuda.get_device_properties(0).total_memory)
    else:
        mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / world_size
    stamp = datetime.date.today().isoformat()
    hw = HardwareProfile(
        name=name or ("cuda-local" if gpu else "cpu-gloo"),
        peak_flops=raw["flops"],
        flops_efficiency=1.0,
        mem_bytes=mem,
        peak_mem_bw=raw["mem_bw"],
        mem_bw_efficiency=1.0,
        intra_bw=raw["link_bw"],
        intra_latency=raw["latency"],
        inter_bw=raw["link_bw"],
        inter_latency=raw["latency"],
        # The matmul probe runs in fp32, so its rate serves fp32 runs as measured.
        fp32_flops_ratio=1.0,
        layer_overhead=raw["layer_overhead"],
        backward_factor=raw["backward_factor"],
        # GPU elementwise kernels are bandwidth-bound: the copy bandwidth prices them.
        elementwise_bw=None if gpu else raw["elementwise_mix_bw"],
        # GPUs have their own compute each; CPU processes share the node's cores.
        node_flops=None if gpu else raw["node_flops"],
        node_mem_bw=None if gpu else raw["node_mem_bw"],
        source=f"calibrated {stamp} on {platform.node() or 'this machine'}, {world_size} processes, {os.cpu_count()} cores",
    )
    if not gpu:
        backend = backend_elementwise_bw(hw, raw["t_calibration_forward"])
        raw["elementwise_bw"] = backend or raw["elementwise_mix_bw"]
        hw = replace(hw, elementwise_bw=raw["elementwise_bw"])
    raw["step_overhead"] = backend_step_overhead(hw, raw["t_calibration_decode_step"])
    return replace(hw, step_overhead=raw["step_overhead"]), raw


def backend_step_overhead(hw: HardwareProfile, t_step: float) -> float:
    """What a measured decode step of the calibration model takes beyond the cost model's layers."""
    b, n = DECODE_BATCH

    def predicted(new: int) -> float:
        call = MFC("calibration", "actor", "generate", (), (), batch_size=b, prompt_len=n, gen_len=new)
        cluster = Cluster(1, 1, replace(hw, step_overhead=0.0))
        return call_cost(call, CALIBRATION_SPEC, 1, 1, 1, 1, cluster, _BACKEND).time

    per_step = (predicted(1 + DECODE_STEPS) - predicted(1)) / DECODE_STEPS
    return max(0.0, t_step - per_step)


def backend_elementwise_bw(hw: HardwareProfile, t_forward: float) -> float | None:
    """Elementwise throughput at which the cost model reproduces the backend's measured forward.

    The cost model's time of the calibration forward is ``A + bytes / E``: ``A`` its matmuls and
    per-layer overheads, ``bytes`` what it counts as elementwise traffic (activations, unfused
    attention scores, log-softmax passes). Solving for ``E`` folds what a CPU backend does beyond
    the counted matmuls (small attention matmuls, transposes, transcendentals) into one rate.
    None when the matmuls alone already take the measured time.
    """
    b, seq = CALIBRATION_BATCH
    call = MFC("calibration", "actor", "inference", (), (), batch_size=b, prompt_len=seq, gen_len=0)

    def predicted(e: float) -> float:
        cluster = Cluster(1, 1, replace(hw, elementwise_bw=e))
        return call_cost(call, CALIBRATION_SPEC, 1, 1, 1, 1, cluster, _BACKEND).time

    fixed = predicted(1e30)
    counted = predicted(1.0) - fixed
    if t_forward <= fixed or counted <= 0:
        return None
    return counted / (t_forward - fixed)
