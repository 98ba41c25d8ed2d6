"""Measure a hardware profile on this machine: a short profiling run on a local process cluster.

``world_size`` processes (gloo on CPU, NCCL on GPUs) measure, each with one intra-op thread:

* matmul FLOP/s of a transformer-layer-sized product (``[2048, 256] @ [256, 1024]``), by one
  process alone and by all at once (their sum is the node's shared throughput on a CPU);
* memory bandwidth of a 32 MB tensor copy, alone and all at once;
* elementwise throughput of a transformer layer's mix (RMSNorm, SwiGLU gate, residual add,
  softmax over ``[4096, 1024]``), counting each operation's nominal reads and writes (kept as
  a cross-check and a fallback);
* all-reduce latency (4 KB) and bus bandwidth (16 MB) over all processes, and the latency of a
  4 KB all-reduce within a pair of processes while the others wait, with decode-sized work
  between the all-reduces (``pair_latency``);
* from the megatron-core backend itself: the fixed cost per transformer layer (forward of 1 and
  of 5 tiny layers on one token, divided by the 4 extra layers), and the runtime's own calls on
  a small calibration model (3 layers, 192 wide, 8 x 256 tokens): its inference call
  (``forward_logprobs``) at its vocabulary and at a four times wider one, from which the
  elementwise throughput and the cost of the head's log-softmax that the cost model needs to
  reproduce both are solved (:func:`backend_elementwise_rates`; on CPUs, where these passes are
  far from the copy bandwidth), and one train step (``TrainEngine.step``), from which the backward
  factor is solved the same way (:func:`backend_backward_factor`);
* matmuls by shape: the same product over 16 rows, whose rate against the 2048-row one gives
  the small-matmul efficiency (``matmul_half_tokens``);
* decode steps by layers, batch and context: the time per decode step of the backend's own
  generation for 1- and 3-layer variants of the calibration model, 2 and 16 prompts of 16 and
  128 tokens; their excess over the cost model's roofline is fitted (non-negative least squares)
  with a per-step, a per-layer, a per-row and a per-cached-key cost
  (:func:`backend_decode_terms`); and the rate of drawing the sampling noise.

The result is a :class:`~lightning_real.planner.hardware.HardwareProfile` like the GPU ones, with
``gpus_per_node`` devices meant to be the processes of one node.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lightning_real.compat import device
from lightning_real.dataflow import MFC
from lightning_real.features import REFERENCE
from lightning_real.models.shard import ModelShard
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.planner.cost import call_cost
from lightning_real.planner.hardware import CPU_GLOO, H100, Cluster, HardwareProfile

MM_SHAPE = (2048, 256, 1024)
CALIBRATION_SPEC = tiny_spec("llama", num_layers=3, hidden_size=192, ffn_hidden_size=512, vocab_size=2048)
"""A small model unlike the ones the planner is usually checked on (head width 48, GQA 2:1)."""
CALIBRATION_BATCH = (8, 256)
WIDE_VOCAB = 8192
"""Vocabulary of the second inference probe: the same layers, four times the head's work."""
DECODE_STEPS = 16
"""Decode steps per generation probe (after the prefill's token)."""
DECODE_GRID: tuple[tuple[int, int, int], ...] = tuple(
    (layers, rows, prompt) for layers in (1, 3) for rows in (2, 16) for prompt in (16, 128)
)
"""Generation probes: (layers of the calibration model, prompts, prompt tokens)."""
NOISE_SHAPE = (16, 2048)
"""Rows x vocabulary of the sampling-noise probe."""
SMALL_MM_ROWS = 16
"""Rows of the small-matmul probe (decode batches)."""
_BACKEND = REFERENCE
"""The features the calibration probes are built with (fp32, local attention, replicated Adam)."""
ELEMENTWISE_SHAPE = (4096, 1024)
COPY_BYTES = 32 * 2**20
SMALL_BYTES = 4 * 2**10
SMALL_RUNS = 20
"""Small all-reduces per timed block: single ones on shared cores vary several-fold."""
BIG_BYTES = 16 * 2**20


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Any, reps: int, block_s: float = 0.1) -> float:
    """Seconds per ``fn()`` in the median of ``reps`` blocks of at least ``block_s`` each.

    The median block is the machine's sustained speed: the fastest block of a short probe catches
    bursts (a quiet moment of a shared host, a clock boost) that calls lasting seconds do not see,
    and it moved the profile by 25% between two runs on the same idle machine; the median moved
    it by a few percent. Blocks, rather than single runs, keep the number sustained and take in a
    warm-up. ``block_s=0`` times single runs after one warm-up run, with the same number of runs
    on every rank (for collectives).
    """
    fn()
    _sync()
    per_run = []
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            _sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= block_s:
                break
        per_run.append(elapsed / n)
    return statistics.median(per_run)


def _matmul_work(dev: torch.device, rows: int = MM_SHAPE[0]) -> tuple[Any, float]:
    """The probe product over ``rows`` rows, and its FLOPs."""
    _, k, n = MM_SHAPE
    m = rows
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


def _allreduce_time(
    nbytes: int,
    dev: torch.device,
    reps: int,
    runs: int = 1,
    group: Any = None,
    member: bool = True,
    between: bool = False,
) -> float:
    """Seconds of one all-reduce of ``nbytes`` over ``group`` (None: all processes): the median of
    ``reps`` blocks of ``runs`` all-reduces each; non-members wait in the next collective, as the
    ranks outside a call's layout do. ``between``: a decode-sized matmul runs before each
    all-reduce and only the all-reduces are counted, as a tensor-parallel decode step meets
    them (back to back, two processes on their own cores keep each other hot and a pair's
    all-reduce read 0.3-0.7 ms here, against 0.8-0.95 ms with work between)."""
    x = torch.ones(nbytes // 4, device=dev)

    def run() -> None:
        for _ in range(runs):
            dist.all_reduce(x, group=group)

    def interleaved() -> float:
        """Seconds in the ``runs`` all-reduces of one block, the matmuls between not counted."""
        a, w = torch.ones(16, 512, device=dev), torch.ones(512, 1408, device=dev)
        spent = 0.0
        for _ in range(runs):
            a @ w
            _sync()
            t0 = time.perf_counter()
            dist.all_reduce(x, group=group)
            _sync()
            spent += time.perf_counter() - t0
        return spent

    dist.barrier()
    # a fixed number of runs: every member must join the same collectives
    mine = 0.0
    if member and between:
        interleaved()  # warm-up
        mine = statistics.median(interleaved() for _ in range(reps)) / runs
    elif member:
        mine = _timed(run, reps, block_s=0.0) / runs
    t = torch.tensor([mine], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


def _backend(rank: int, world: int, reps: int) -> tuple[float, float, tuple[float, float], list[float]]:
    """(seconds per extra tiny layer, seconds of a train step, seconds of an inference call at the
    calibration model's vocabulary and at :data:`WIDE_VOCAB`, seconds per decode step of each
    :data:`DECODE_GRID` probe) of the megatron-core backend,
    measured on rank 0: forward of 1 and 5 tiny layers on one token; and the runtime's own calls
    on the calibration model: log-probs of every token (``forward_logprobs``), one train step
    (``TrainEngine.step``: forward, backward, clipping, AdamW) and generation."""
    from lightning_real.distributed.groups import GroupRegistry
    from lightning_real.layout import Layout
    from lightning_real.models.build import build_gpt
    from lightning_real.models.forward import forward_logprobs
    from lightning_real.models.train import INPUT_IDS, TrainConfig, TrainEngine
    from lightning_real.models.vocab_parallel import next_token_logprobs

    reg = GroupRegistry()
    groups = reg.for_layout(Layout(1, 1, 1, (0,)))
    out = torch.zeros(4 + len(DECODE_GRID), dtype=torch.float64)
    if rank == 0:
        dev = device()
        one = (
            torch.zeros(1, 1, dtype=torch.long, device=dev),
            torch.zeros(1, 1, dtype=torch.long, device=dev),
            torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=dev),
        )
        times = []
        for layers in (1, 5):
            spec = tiny_spec("llama", num_layers=layers, hidden_size=64, ffn_hidden_size=128, vocab_size=64)
            model = build_gpt(spec, groups, seed=0).eval()
            with torch.no_grad():
                times.append(_timed(lambda m=model: m(*one), reps))
        out[0] = max(0.0, (times[1] - times[0]) / 4)
        # The calls themselves rather than the bare model: the runtime's log-prob path (masks,
        # positions, fp32 vocab-parallel log-softmax) took a quarter longer than model + log_softmax.
        shard = ModelShard.build(CALIBRATION_SPEC, groups, seed=0)
        b, seq = CALIBRATION_BATCH
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1, CALIBRATION_SPEC.vocab_size, (b, seq), generator=gen).to(dev)
        ones = torch.ones_like(ids)
        out[2] = _timed(lambda: forward_logprobs(shard, ids, ones), reps)
        wide = ModelShard.build(replace(CALIBRATION_SPEC, vocab_size=WIDE_VOCAB), groups, seed=0)
        out[3] = _timed(lambda: forward_logprobs(wide, ids, ones), reps)
        del wide
        for i, (layers, rows, prompt) in enumerate(DECODE_GRID):
            spec = replace(CALIBRATION_SPEC, num_layers=layers)
            out[4 + i] = _decode_step(ModelShard.build(spec, groups, seed=0), rows, prompt, max(5, reps // 2))

        def loss_fn(output: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            lp = next_token_logprobs(output, mb[INPUT_IDS], groups.tp)
            return -lp.sum(), {}

        engine = TrainEngine(shard, loss_fn, TrainConfig(n_mbs=1, norm_key=None))
        out[1] = _timed(lambda: engine.step({INPUT_IDS: ids}), max(5, reps // 2))
    dist.all_reduce(out)
    return float(out[0]), float(out[1]), (float(out[2]), float(out[3])), [float(x) for x in out[4:]]


def _decode_step(shard: Any, b: int, n: int, reps: int) -> float:
    """Seconds per decode step of the backend's generation (``b`` prompts of ``n`` tokens, sampling)."""
    from lightning_real.models.generate import GenerationConfig, generate

    ids = torch.ones(b, n, dtype=torch.long, device=device())
    mask = torch.ones_like(ids)

    def run(new: int) -> float:
        _sync()
        t0 = time.perf_counter()
        generate(shard, ids, mask, GenerationConfig(max_new_tokens=new, seed=0))
        _sync()
        return time.perf_counter() - t0

    # A decode step is what DECODE_STEPS more new tokens add to a call (forward, sampling, the
    # loop's bookkeeping), so the prefill and the call's set-up drop out; the median run is the
    # machine's sustained speed (as in _timed); the first run warms up.
    run(1 + DECODE_STEPS)
    per_run = [(run(1 + DECODE_STEPS) - run(1)) / DECODE_STEPS for _ in range(reps)]
    return max(statistics.median(per_run), 1e-9)


def _small_matmul_rate(rank: int, reps: int) -> float:
    """FLOP/s of the probe matmul over :data:`SMALL_MM_ROWS` rows, on rank 0 (0 elsewhere)."""
    if rank != 0:
        return 0.0
    fn, flops = _matmul_work(device(), SMALL_MM_ROWS)
    return flops / _timed(fn, reps)


def _noise_rate(rank: int, reps: int) -> float:
    """Vocabulary entries per second of the sampler's noise draw (exponential, then log), rank 0."""
    if rank != 0:
        return 0.0
    b, v = NOISE_SHAPE
    gen = torch.Generator(device=device()).manual_seed(0)
    x = torch.empty(b, v, device=device())
    return b * v / _timed(lambda: x.exponential_(generator=gen).log_(), reps)


def _probe(rank: int, world: int, reps: int) -> dict[str, float]:
    dev = device()
    flops, node_flops = _alone_and_together(rank, world, _matmul_work(dev), reps)
    rates = torch.tensor([_small_matmul_rate(rank, reps), _noise_rate(rank, reps)], dtype=torch.float64)
    dist.all_reduce(rates)
    bw, node_bw = _alone_and_together(rank, world, _copy_work(dev), reps)
    ew, _ = _alone_and_together(rank, world, _elementwise_work(dev), reps)
    steps = math.ceil(math.log2(world)) if world > 1 else 1
    t_small = _allreduce_time(SMALL_BYTES, dev, reps, SMALL_RUNS)
    # a pair of processes (a tp=2 group) while the others wait: on shared cores it takes less
    # than one step of the whole node's all-reduce
    pair = dist.new_group([0, 1]) if world > 2 else None
    # with decode-sized work between the all-reduces, as tensor-parallel decode steps run them
    t_pair = (
        _allreduce_time(SMALL_BYTES, dev, reps, SMALL_RUNS, pair, rank < 2, between=True)
        if world > 2
        else t_small
    )
    t_big = _allreduce_time(BIG_BYTES, dev, max(3, reps // 2))
    latency = t_small / steps
    factor = 2 * (world - 1) / world if world > 1 else 1.0
    link_bw = factor * BIG_BYTES / max(1e-9, t_big - steps * latency)
    overhead, t_train, (t_fwd, t_wide), t_steps = _backend(rank, world, reps)
    return dict(
        small_matmul_flops=float(rates[0]),
        noise_rate=float(rates[1]),
        **{f"t_decode_step_l{lay}_b{b}_n{n}": t for (lay, b, n), t in zip(DECODE_GRID, t_steps, strict=True)},
        flops=flops,
        node_flops=node_flops,
        mem_bw=bw,
        node_mem_bw=node_bw,
        latency=latency,
        link_bw=link_bw,
        layer_overhead=overhead,
        t_calibration_train=t_train,
        elementwise_mix_bw=ew,
        t_calibration_forward=t_fwd,
        t_calibration_forward_wide=t_wide,
        t_small=t_small,
        t_pair=t_pair,
        t_big=t_big,
    )


def calibrate(
    world_size: int = 4, reps: int = 10, name: str = ""
) -> tuple[HardwareProfile, dict[str, float]]:
    """Measure this machine with ``world_size`` processes; returns the profile and the raw numbers."""
    from lightning_real.distributed.launch import spawn

    raw: dict[str, Any] = spawn(_probe, world_size, reps)[0]
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
        pair_latency=raw["t_pair"] if world_size > 2 else None,
        # The matmul probe runs in fp32, so its rate serves fp32 runs as measured.
        fp32_flops_ratio=1.0,
        # A pass over n rows runs at n / (n + h) of the large-GEMM rate: solved from the 16-row probe.
        matmul_half_tokens=SMALL_MM_ROWS * max(0.0, raw["flops"] / max(raw["small_matmul_flops"], 1.0) - 1.0),
        async_launch=gpu,
        noise_rate=raw["noise_rate"],
        layer_overhead=raw["layer_overhead"],
        # GPU elementwise kernels are bandwidth-bound: the copy bandwidth prices them.
        elementwise_bw=None if gpu else raw["elementwise_mix_bw"],
        # GPUs have their own compute each; CPU processes share the node's cores.
        node_flops=None if gpu else raw["node_flops"],
        node_mem_bw=None if gpu else raw["node_mem_bw"],
        host_cores=None if gpu else os.cpu_count(),
        source=f"calibrated {stamp} on {platform.node() or 'this machine'}, {world_size} processes, {os.cpu_count()} cores",
    )
    # The vLLM terms are not measured here: those of the shipped profile of the same kind.
    shipped = H100 if gpu else CPU_GLOO
    hw = replace(
        hw, **{f: getattr(shipped, f) for f in HardwareProfile.__dataclass_fields__ if f.startswith("vllm_")}
    )
    if not gpu:
        solved = backend_elementwise_rates(
            hw, raw["t_calibration_forward"], raw["t_calibration_forward_wide"]
        )
        if solved is None:
            backend = backend_elementwise_bw(hw, raw["t_calibration_forward"])
            solved = (backend or raw["elementwise_mix_bw"], 1.0)
        raw["elementwise_bw"], raw["logit_pass_factor"] = solved
        hw = replace(hw, elementwise_bw=solved[0], logit_pass_factor=solved[1])
    raw["backward_factor"] = backend_backward_factor(hw, raw["t_calibration_train"]) or hw.backward_factor
    hw = replace(hw, backward_factor=raw["backward_factor"])
    steps = [raw[f"t_decode_step_l{lay}_b{b}_n{n}"] for lay, b, n in DECODE_GRID]
    terms = backend_decode_terms(hw, steps)
    raw.update(terms)
    return with_decode_terms(hw, terms), raw


DECODE_TERMS = ("step_overhead", "decode_layer_overhead", "decode_row_time", "decode_key_time")
"""Profile fields fitted from the generation probes."""


def with_decode_terms(hw: HardwareProfile, terms: dict[str, float]) -> HardwareProfile:
    """``hw`` with the :data:`DECODE_TERMS` given in ``terms`` (the others kept)."""
    t = {k: terms.get(k, getattr(hw, k)) for k in DECODE_TERMS}
    return replace(
        hw,
        step_overhead=t["step_overhead"],
        decode_layer_overhead=t["decode_layer_overhead"],
        decode_row_time=t["decode_row_time"],
        decode_key_time=t["decode_key_time"],
    )


def _decode_per_step(hw: HardwareProfile, layers: int, rows: int, prompt: int) -> float:
    """The cost model's seconds per decode step of one :data:`DECODE_GRID` probe."""
    spec = replace(CALIBRATION_SPEC, num_layers=layers)
    cluster = Cluster(1, 1, hw)

    def predicted(new: int) -> float:
        call = MFC(
            "calibration", "actor", "generate", (), (), batch_size=rows, prompt_len=prompt, gen_len=new
        )
        return call_cost(call, spec, 1, 1, 1, 1, cluster, _BACKEND).time

    return (predicted(1 + DECODE_STEPS) - predicted(1)) / DECODE_STEPS


def backend_decode_terms(hw: HardwareProfile, t_steps: list[float]) -> dict[str, float]:
    """The decode terms (:data:`DECODE_TERMS`) that make the cost model reproduce the measured
    seconds per decode step of each :data:`DECODE_GRID` probe, by non-negative least squares.

    The cost model is linear in each term, so its columns are read off the model itself: the
    per-step time with one term at 1 ms and the others at 0, less the time with all at 0.
    """
    base = with_decode_terms(hw, dict.fromkeys(DECODE_TERMS, 0.0))
    zero = [_decode_per_step(base, *probe) for probe in DECODE_GRID]
    cols = []
    for term in DECODE_TERMS:
        unit = with_decode_terms(base, {term: 1e-3})
        cols.append([(_decode_per_step(unit, *p) - z) / 1e-3 for p, z in zip(DECODE_GRID, zero, strict=True)])
    a = np.array(cols).T
    y = np.array(t_steps) - np.array(zero)
    return dict(zip(DECODE_TERMS, (float(v) for v in nonnegative_lstsq(a, y)), strict=True))


def nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``argmin |a x - y|`` subject to ``x >= 0`` (active set: drop the most negative, refit)."""
    free = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while free:
        sol = np.linalg.lstsq(a[:, free], y, rcond=None)[0]
        if (sol >= 0).all():
            x[free] = sol
            break
        free.pop(int(np.argmin(sol)))
    return x


def calibration_call_time(hw: HardwareProfile, kind: str, spec: ModelSpec = CALIBRATION_SPEC) -> float:
    """The cost model's time of a calibration call (``kind``: 'inference' or 'train') of ``spec``
    on :data:`CALIBRATION_BATCH`, one device, one microbatch, the backend's features."""
    b, seq = CALIBRATION_BATCH
    call = MFC("calibration", "actor", kind, (), (), batch_size=b, prompt_len=seq, gen_len=0)  # type: ignore[arg-type]
    return call_cost(call, spec, 1, 1, 1, 1, Cluster(1, 1, hw), _BACKEND).time


def backend_elementwise_bw(hw: HardwareProfile, t_forward: float) -> float | None:
    """Elementwise throughput at which the cost model reproduces the backend's measured forward.

    The cost model's time of the calibration forward is ``A + bytes / E``: ``A`` its matmuls and
    per-layer overheads, ``bytes`` what it counts as elementwise traffic (activations, unfused
    attention scores, log-softmax passes). Solving for ``E`` folds what a CPU backend does beyond
    the counted matmuls (small attention matmuls, transposes, transcendentals) into one rate.
    None when the matmuls alone already take the measured time.
    """

    def predicted(e: float) -> float:
        return calibration_call_time(replace(hw, elementwise_bw=e), "inference")

    fixed = predicted(1e30)
    counted = predicted(1.0) - fixed
    if t_forward <= fixed or counted <= 0:
        return None
    return counted / (t_forward - fixed)


def backend_backward_factor(hw: HardwareProfile, t_train: float) -> float | None:
    """Backward over forward work at which the cost model reproduces the backend's measured train
    step of the calibration model (forward, backward, clipping, AdamW, one microbatch).

    The cost model's train time is linear in the factor (``T(f) = T(0) + f * (T(1) - T(0))``), so
    it is solved directly; this folds the train path's own work (the loss, the fp32 log-softmax
    backward, the schedule) into the factor. None when the forward alone already takes longer.
    """

    def predicted(f: float) -> float:
        return calibration_call_time(replace(hw, backward_factor=f), "train")

    zero, per = predicted(0.0), predicted(1.0) - predicted(0.0)
    if t_train <= zero or per <= 0:
        return None
    return (t_train - zero) / per


def backend_elementwise_rates(
    hw: HardwareProfile, t_forward: float, t_wide: float
) -> tuple[float, float] | None:
    """(``elementwise_bw``, ``logit_pass_factor``) at which the cost model reproduces both measured
    inference calls: the calibration model's and the same layers under :data:`WIDE_VOCAB`.

    Each call costs ``A + (layers + f * head) / E`` (``A``: matmuls and overheads; ``layers`` and
    ``head``: the counted elementwise bytes of the layers and of the log-softmax); the two calls
    give two linear equations in ``1 / E`` and ``f / E``. None when the solution is not positive
    (the probes too noisy to separate the two), so a single rate is fitted instead.
    """
    rows, rhs = [], []
    for spec, t in (
        (CALIBRATION_SPEC, t_forward),
        (replace(CALIBRATION_SPEC, vocab_size=WIDE_VOCAB), t_wide),
    ):

        def predicted(e: float, f: float, spec: ModelSpec = spec) -> float:
            return calibration_call_time(
                replace(hw, elementwise_bw=e, logit_pass_factor=f), "inference", spec
            )

        fixed = predicted(1e30, 1.0)
        layers = predicted(1.0, 0.0) - fixed
        head = predicted(1.0, 1.0) - predicted(1.0, 0.0)
        rows.append([layers, head])
        rhs.append(t - fixed)
    try:
        inv_e, f_over_e = np.linalg.solve(np.array(rows), np.array(rhs))
    except np.linalg.LinAlgError:
        return None
    if inv_e <= 0 or f_over_e <= 0:
        return None
    return float(1.0 / inv_e), float(f_over_e / inv_e)
