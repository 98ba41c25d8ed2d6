"""Time of one model function call under one layout: an analytic model (formulas in docs/planner.md).

Each transformer layer of a pipeline stage is priced as a roofline for its matmuls: the larger
of their FLOPs over the device's matmul rate and the bytes they stream (weights, KV cache) over
its memory bandwidth; plus the elementwise passes (norms, activations, residuals), which are
memory-bound and run on their own; plus a fixed per-layer overhead. Decode steps touch every
weight for one token per sequence, so they come out bandwidth-bound, as they are on GPUs.
Communication is added on top (no overlap assumed): two all-reduces of the hidden states per
layer per pass under tensor parallelism, point-to-point sends between pipeline stages, the
data-parallel gradient reduction once per optimizer step. Pipelines follow 1F1B: a pass of
``m`` microbatches over stages of times ``t_s`` takes ``sum(t_s) + (m - 1) * max(t_s)``.
Generate calls on the vLLM backend (:func:`_vllm_timing`) are priced as a weight update, waves
of continuous batching limited by the engine's KV cache, and the log-prob recompute forward.

A layout's cost depends only on its degrees, microbatches and how its groups fall on nodes, not
on where its device mesh starts, so costs are computed once per (call, dp, tp, pp, m).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from lightning_real.dataflow import MFC
from lightning_real.features import RuntimeFeatures
from lightning_real.layout import Layout
from lightning_real.models.build import stage_layers
from lightning_real.models.spec import ModelSpec
from lightning_real.planner.flops import attention_positions, head_width, layer_matmul_weights
from lightning_real.planner.hardware import Cluster, HardwareProfile
from lightning_real.planner.memory import (
    LOGIT_BYTES,
    MemoryBreakdown,
    act_elems_per_token_layer,
    call_memory,
    stage_params,
    vllm_block_tokens,
    vllm_rows_fit,
)

SCORE_PASSES = 4
"""Nominal passes over the attention scores of unfused attention (write, mask, softmax, read)."""
LOGIT_PASSES = 6
"""Nominal passes over the logits of a log-softmax or sampling softmax."""


@dataclass(frozen=True)
class Link:
    """A bandwidth and a per-step latency."""

    bw: float
    """Bytes per second per direction."""
    latency: float
    """Seconds per collective step or send."""
    pair: float | None = None
    """Seconds of the latency of a collective of two members (measured); None: one step."""

    def collective_latency(self, n: int) -> float:
        """Latency term of one collective over ``n`` members: tree-like steps, or the pair's own."""
        if n == 2 and self.pair is not None:
            return self.pair
        return math.ceil(math.log2(n)) * self.latency

    def allreduce(self, nbytes: float, n: int) -> float:
        """Ring bandwidth term, tree-like latency term (what NCCL and gloo approach)."""
        if n <= 1:
            return 0.0
        return 2 * (n - 1) / n * nbytes / self.bw + self.collective_latency(n)

    def allgather(self, nbytes: float, n: int) -> float:
        """Gather ``nbytes`` in total (each member holds ``nbytes / n``); reduce-scatter costs the same."""
        if n <= 1:
            return 0.0
        return (n - 1) / n * nbytes / self.bw + self.collective_latency(n)

    def send(self, nbytes: float) -> float:
        """One point-to-point message."""
        return nbytes / self.bw + self.latency


@dataclass(frozen=True)
class CallCost:
    """Predicted time of one call under one layout, and its memory on the fullest device."""

    time: float
    """Seconds from start to end of the call."""
    memory: MemoryBreakdown
    """Peak bytes on the fullest device."""
    parts: dict[str, float] = field(default_factory=dict, compare=False, hash=False)
    """Where the time goes ('compute', 'tp_comm', 'pp_bubble', 'dp_comm', 'optimizer'), seconds."""


def _crosses(cluster: Cluster, groups: list[tuple[int, ...]]) -> bool:
    return any(cluster.node_of(min(g)) != cluster.node_of(max(g)) for g in groups)


@lru_cache(maxsize=65536)
def group_links(cluster: Cluster, dp: int, tp: int, pp: int) -> tuple[Link, Link, Link]:
    """Links of the tp, dp and pp groups of ``d{dp}t{tp}p{pp}`` on a contiguous, node-aligned mesh."""
    n = dp * tp * pp
    lay = Layout(dp, tp, pp, tuple(range(n)))
    hw = cluster.hw
    intra = Link(hw.intra_bw, hw.intra_latency, hw.pair_latency)
    inter = Link(hw.inter_bw, hw.inter_latency)
    return (
        inter if _crosses(cluster, lay.tp_groups()) else intra,
        inter if _crosses(cluster, lay.dp_groups()) else intra,
        inter if pp > 1 and _crosses(cluster, lay.pp_groups()) else intra,
    )


@dataclass(frozen=True)
class _Rates:
    """What one device of the call achieves, and its groups' links."""

    flops: float
    mem_bw: float
    ew_bw: float
    hw: HardwareProfile
    tp: Link
    dp: Link
    pp: Link
    dt: int
    """Bytes of one working element (the run's precision)."""
    host: float = 1.0
    """Slowdown of fixed host work while the node's other devices work (CPU processes)."""


def _stage_pass(
    spec: ModelSpec,
    r: _Rates,
    tp: int,
    layers: int,
    last: bool,
    mb: int,
    seq: int,
    ctx: np.ndarray | int,
    head_tokens: int,
    flash: bool = True,
    sample: bool = False,
) -> tuple[np.ndarray | float, float]:
    """(compute seconds, tensor-parallel communication seconds) of one forward of one microbatch
    through one stage. ``ctx`` may be an array of cached lengths (decode steps); ``sample``: the
    head's tokens are sampled (noise drawn over the full vocabulary)."""
    dt = r.dt
    hw = r.hw
    h = spec.hidden_size
    w = layer_matmul_weights(spec) / tp
    kv = 2 * spec.num_kv_heads * spec.head_dim / tp
    keys = attention_positions(seq, ctx)  # type: ignore[arg-type]
    flops = mb * (2 * w * seq + 4 * h / tp * keys)
    # Matmuls stream the weights and the KV cache: the slower of compute and that traffic.
    streamed = dt * (w + mb * kv * (np.asarray(ctx) + seq))
    # Norms, activations, rotary and residual adds run as separate elementwise passes.
    elementwise = dt * 2 * mb * seq * act_elems_per_token_layer(spec, tp)
    if not flash:
        # Unfused attention writes the fp32 scores, masks them, softmaxes them and reads them back.
        elementwise = elementwise + SCORE_PASSES * LOGIT_BYTES * mb * spec.num_heads / tp * keys
    # Matmuls over few rows (small decode batches, short prefills) run below the large-GEMM rate.
    tokens = mb * seq
    efficiency = tokens / (tokens + r.hw.matmul_half_tokens)
    work = np.maximum(flops / (r.flops * efficiency), streamed / r.mem_bw) + elementwise / r.ew_bw
    # A GPU launches kernels ahead of the work: the fixed cost shows only when the layer's work is
    # shorter (decode steps); a CPU process does both in turn.
    fixed = hw.layer_overhead * r.host
    layer_t = np.maximum(work, fixed) if hw.async_launch else work + fixed
    if np.ndim(ctx) > 0:
        # Decode steps: the cache path's own fixed, per-row and per-cached-key work (calibrated).
        layer_t = layer_t + r.host * (
            hw.decode_layer_overhead + mb * (hw.decode_row_time + hw.decode_key_time * np.asarray(ctx))
        )
    comp = layers * layer_t
    comm = layers * 2 * r.tp.allreduce(mb * seq * h * dt, tp)
    if last and head_tokens:
        width = head_width(spec) / (tp if spec.head == "lm" else 1)
        hflops = 2 * mb * head_tokens * h * width
        # log-softmax (or the sampling softmax) over the fp32 logits: max, subtract, exp, sum, log, gather
        logits = hw.logit_pass_factor * LOGIT_PASSES * LOGIT_BYTES * mb * head_tokens * width
        comp = comp + max(hflops / r.flops, dt * h * width / r.mem_bw) + logits / r.ew_bw
        if sample:
            draws = mb * head_tokens * spec.vocab_size
            comp = comp + (
                2 * LOGIT_BYTES * draws / r.ew_bw if hw.noise_rate is None else r.host * draws / hw.noise_rate
            )
        if spec.head == "lm" and tp > 1:
            # vocab-parallel softmax / sampling: small all-reduces of per-token maxima and sums
            comm += 2 * r.tp.allreduce(mb * head_tokens * LOGIT_BYTES, tp)
    return comp, comm


def _recomputed(
    recompute: str,
    spec: ModelSpec,
    r: _Rates,
    tp: int,
    layers: int,
    mb: int,
    seq: int,
    forward: float,
    flash: bool,
) -> float:
    """Seconds of the forward work recomputation repeats in backward, for one stage and microbatch:
    the whole forward ('full'), the attention core ('selective': its score matmuls, and the
    score passes of unfused attention), nothing ('none')."""
    if recompute == "full":
        return forward
    if recompute == "selective":
        keys = attention_positions(seq, 0)
        flops = mb * 4 * spec.hidden_size / tp * keys
        passes = 0.0 if flash else SCORE_PASSES * LOGIT_BYTES * mb * spec.num_heads / tp * keys
        return layers * (flops / r.flops + passes / r.ew_bw)
    return 0.0


def grad_reduction_exposed(
    link: Link,
    nbytes: float,
    dp: int,
    zero: bool,
    bucket_elems: int | None,
    elems: int,
    backward: float,
) -> float:
    """Seconds of the data-parallel gradient reduction (``nbytes`` of gradients of ``elems``
    elements over ``dp`` replicas) that the step waits for after a last backward of ``backward``
    seconds. Unbucketed (``bucket_elems`` None): one all-reduce or reduce-scatter, all exposed.
    Bucketed: one collective per bucket (under ZeRO-1 about one reduce per bucket plus one per
    replica boundary inside the buckets), started as the backward completes each bucket; what
    runs past the backward is exposed, and at least the last bucket's share always is."""
    if dp <= 1:
        return 0.0
    collective = link.allgather if zero else link.allreduce
    if bucket_elems is None:
        return collective(nbytes, dp)
    buckets = max(1, -(-elems // bucket_elems))
    collectives = buckets + (dp - 1 if zero else 0)
    total = collectives * collective(nbytes / collectives, dp)
    return max(total - backward, total / buckets)


def _pipeline(stage_times: list[float], m: int) -> float:
    """1F1B (or forward-only) pass of ``m`` microbatches over stages with these per-microbatch times."""
    return sum(stage_times) + (m - 1) * max(stage_times)


def call_cost(
    call: MFC,
    spec: ModelSpec,
    dp: int,
    tp: int,
    pp: int,
    m: int,
    cluster: Cluster,
    features: RuntimeFeatures,
) -> CallCost:
    """Time and memory of ``call`` running ``spec`` as ``d{dp}t{tp}p{pp}`` with ``m`` microbatches
    per replica, under the runtime ``features``."""
    return _call_cost(call, spec, dp, tp, pp, m, cluster, features)


@lru_cache(maxsize=262144)
def _call_cost(
    call: MFC, spec: ModelSpec, dp: int, tp: int, pp: int, m: int, cluster: Cluster, features: RuntimeFeatures
) -> CallCost:
    hw = cluster.hw
    n = dp * tp * pp
    active = min(n, cluster.gpus_per_node)
    time, parts, busy = _timing(call, spec, dp, tp, pp, m, cluster, features, active)
    if pp > 1 and (hw.node_flops is not None or hw.node_mem_bw is not None):
        # Devices sharing a node's compute (CPU processes) run faster while pipeline bubbles
        # idle the others: price again with the average number of busy devices.
        time, parts, _ = _timing(call, spec, dp, tp, pp, m, cluster, features, max(1.0, active * busy))
    mem = call_memory(call, spec, dp, tp, pp, m, features)
    return CallCost(float(time), mem, parts)


def _rates(cluster: Cluster, dp: int, tp: int, pp: int, features: RuntimeFeatures, active: float) -> _Rates:
    hw = cluster.hw
    tpl, dpl, ppl = group_links(cluster, dp, tp, pp)
    flops = hw.flops_when(active) * (hw.fp32_flops_ratio if features.precision == "32-true" else 1.0)
    return _Rates(
        flops,
        hw.mem_bw_when(active),
        hw.elementwise_bw_when(active),
        hw,
        tpl,
        dpl,
        ppl,
        features.param_bytes,
        hw.host_slowdown(active),
    )


def vllm_step_overhead(hw: HardwareProfile, features: RuntimeFeatures) -> float:
    """Fixed seconds per engine step of a vLLM generate call: the eager figure unless the
    features let vLLM capture CUDA graphs (``VllmConfig.enforce_eager=False``)."""
    return hw.vllm_eager_step_overhead if features.vllm.enforce_eager else hw.vllm_step_overhead


def vllm_waves(
    call: MFC, spec: ModelSpec, dp: int, tp: int, cluster: Cluster, features: RuntimeFeatures
) -> int:
    """Waves a vLLM generate call runs in: ``ceil(rows / fit)`` (0 when not one row fits)."""
    fit = vllm_rows_fit(call, spec, dp, tp, features, vllm_block_tokens(features, cluster.hw.vllm_block_size))
    rows = -(-call.batch_size // dp)
    return -(-rows // fit) if fit > 0 else 0


def _vllm_timing(
    call: MFC,
    spec: ModelSpec,
    dp: int,
    tp: int,
    pp: int,
    cluster: Cluster,
    features: RuntimeFeatures,
    active: float,
) -> tuple[float, dict[str, float], float]:
    """A generate call on the vLLM backend: one engine per data-parallel replica, tensor-parallel
    over its ranks, no pipeline (the runtime refuses pp > 1), priced as

    * the weight update before the call: every rank hands the whole model in the working dtype
      to vLLM's loaders (the direct path: no communication), ``vllm_update_overhead`` plus those
      bytes at ``vllm_load_bw`` (else the memory bandwidth);
    * generation with continuous batching over the replica's rows, as many at once as fit
      (:func:`~lightning_real.planner.memory.vllm_rows_fit`: ``max_num_seqs`` and the KV-cache
      budget at full length). The planner assumes every row generates exactly ``gen_len``
      tokens, so continuous batching degenerates to *waves*: ``ceil(rows / fit)`` groups one
      after another, each a prefill of its prompts and ``gen_len - 1`` decode steps, the same
      roofline per layer as the native generator's, with vLLM's fixed costs
      (``vllm_layer_overhead`` per layer when eager, none with CUDA graphs; no native decode-path
      terms) and ``vllm_step_overhead`` / ``vllm_eager_step_overhead`` per engine step (the
      prefill's step, which samples the first token, and each decode step);
    * the log-prob recompute: the call shard's forward over prompt + response of all the
      replica's rows on the same layout (an inference call of the batch, one microbatch).
    """
    if pp != 1:
        raise ValueError(
            f"{call.name}: the vllm generation backend runs no pipeline parallelism (pp={pp}); "
            "allowed: a dNtTp1 layout, or generation_backend native"
        )
    hw = cluster.hw
    r = _rates(cluster, dp, tp, 1, features, active)
    eager = features.vllm.enforce_eager
    vhw = replace(
        hw,
        layer_overhead=hw.vllm_layer_overhead if eager else 0.0,
        decode_layer_overhead=0.0,
        decode_row_time=0.0,
        decode_key_time=0.0,
    )
    rv = replace(r, hw=vhw)
    flash = features.flash_attention
    rows = -(-call.batch_size // dp)
    fit = vllm_rows_fit(call, spec, dp, tp, features, vllm_block_tokens(features, hw.vllm_block_size))
    parts: dict[str, float] = {}
    if fit < 1:
        # Not one sequence's KV cache fits the engine's budget: vLLM cannot serve the call.
        return math.inf, {"kv_cache_short": math.inf}, 1.0
    layers = spec.num_layers
    ctx = np.arange(call.prompt_len, call.prompt_len + call.gen_len - 1, dtype=np.float64)
    step_fixed = vllm_step_overhead(hw, features) * r.host
    waves = [fit] * (rows // fit) + ([rows % fit] if rows % fit else [])
    compute = comm = 0.0
    for b in set(waves):
        n = waves.count(b)
        c, t = _stage_pass(spec, rv, tp, layers, True, b, call.prompt_len, 0, 1, flash, True)
        dc, dtc = _stage_pass(spec, rv, tp, layers, True, b, 1, ctx, 1, flash, True)
        compute += n * (float(c) + float(np.sum(dc)))
        comm += n * (t + dtc * ctx.size)
    steps = len(waves) * call.gen_len
    update_bytes = spec.num_params() * features.param_bytes
    update = hw.vllm_update_overhead * r.host + update_bytes / (hw.vllm_load_bw or r.mem_bw)
    inference = replace(call, call_type="inference", greedy=False, n_mbs=1)
    recompute, _, _ = _timing(inference, spec, dp, tp, 1, 1, cluster, features, active)
    parts["compute"] = compute
    parts["tp_comm"] = comm
    parts["step_overhead"] = steps * step_fixed
    parts["weight_update"] = update
    parts["logprob_recompute"] = recompute
    time = sum(parts.values())
    parts["pp_bubble"] = 0.0
    return float(time), parts, 1.0


def _timing(
    call: MFC,
    spec: ModelSpec,
    dp: int,
    tp: int,
    pp: int,
    m: int,
    cluster: Cluster,
    features: RuntimeFeatures,
    active: float,
) -> tuple[float, dict[str, float], float]:
    """(seconds, their breakdown, average fraction of the devices busy) with ``active`` devices
    of a node competing for shared compute."""
    if call.call_type == "generate" and features.generation_backend == "vllm":
        return _vllm_timing(call, spec, dp, tp, pp, cluster, features, active)
    hw = cluster.hw
    r = _rates(cluster, dp, tp, pp, features, active)
    dpl, ppl = r.dp, r.pp
    dt = r.dt
    flash = features.flash_attention
    counts = stage_layers(spec.num_layers, pp)
    rep_batch = -(-call.batch_size // dp)
    h = spec.hidden_size
    parts: dict[str, float] = {}

    if call.call_type == "generate":
        # m rounds one after another, each generating its share of the replica's rows with a KV
        # cache of its own (the native generator's rounds): inside a round every decode step runs
        # the stages in turn (one token per step needs the previous one out of the last stage),
        # then samples, broadcasts the tokens and checks for the end (step_overhead).
        rows = -(-rep_batch // m)
        p2p_pre = ppl.send(rows * call.prompt_len * h * dt) if pp > 1 else 0.0
        p2p_dec = ppl.send(rows * h * dt) if pp > 1 else 0.0
        ctx = np.arange(call.prompt_len, call.prompt_len + call.gen_len - 1, dtype=np.float64)
        pre_stages, dec_stages = [], []
        comp_pre = comm_pre = 0.0
        comp_dec = np.zeros_like(ctx)
        comm_dec = 0.0
        for s, layers in enumerate(counts):
            last = s == pp - 1
            c, t = _stage_pass(spec, r, tp, layers, last, rows, call.prompt_len, 0, 1, flash, True)
            pre_stages.append(float(c) + t + (0.0 if last else p2p_pre))
            comp_pre, comm_pre = comp_pre + float(c), comm_pre + t
            c, t = _stage_pass(spec, r, tp, layers, last, rows, 1, ctx, 1, flash, True)
            dec_stages.append(np.asarray(c) + t + (0.0 if last else p2p_dec))
            comp_dec, comm_dec = comp_dec + c, comm_dec + t
        prefill = sum(pre_stages)
        dec = np.stack(dec_stages) if dec_stages[0].size else np.zeros((pp, 0))
        step_fixed = hw.step_overhead * r.host
        step = dec.sum(axis=0) + step_fixed
        time = m * (prefill + float(step.sum()))
        busy_s = m * (sum(pre_stages) + float(dec.sum()))
        parts["compute"] = m * (comp_pre + float(comp_dec.sum()))
        parts["tp_comm"] = m * (comm_pre + comm_dec * ctx.size)
        parts["step_overhead"] = m * step_fixed * ctx.size
    else:
        train = call.call_type == "train"
        passes = call.minibatches if train else 1
        step_batch = -(-rep_batch // passes)
        mb = -(-step_batch // m)
        seq = call.seq_len
        p2p = ppl.send(mb * seq * h * dt) if pp > 1 else 0.0
        stages = []
        comp_max = comm_max = 0.0
        first_backward = 0.0
        for s, layers in enumerate(counts):
            last = s == pp - 1
            c, t = _stage_pass(spec, r, tp, layers, last, mb, seq, 0, seq, flash)
            c = float(c)
            if train:
                # backward: input and weight gradients, the same all-reduces again; recomputation
                # runs (part of) the forward once more before each layer's backward
                again = _recomputed(features.recompute, spec, r, tp, layers, mb, seq, c, flash)
                if s == 0:
                    first_backward = hw.backward_factor * c + again + t
                c, t, send = (1 + hw.backward_factor) * c + again, 2 * t, 2 * p2p
            else:
                send = p2p
            stages.append(c + t + (0.0 if last else send))
            comp_max, comm_max = max(comp_max, c), max(comm_max, t)
        pipe = _pipeline(stages, m)
        busy_s = passes * m * sum(stages)
        parts["compute"] = m * comp_max
        parts["tp_comm"] = m * comm_max
        step = pipe
        if train:
            local = max(stage_params(spec, tp, pp))
            gb = features.grad_bytes
            zero = features.distributed_optimizer(dp)
            # The gradient reduction overlaps the last microbatch's backward (stage 0's ends the
            # step); ZeRO-1's all-gather of the updated parameters follows the optimizer.
            dp_comm = grad_reduction_exposed(
                dpl, local * gb, dp, zero, features.grad_bucket_elems, local, first_backward
            )
            if zero:
                dp_comm += dpl.allgather(local * dt, dp)
                opt_params = local / dp
            else:
                opt_params = local
            # Adam reads the gradient, reads and writes both moments and the weights it updates
            # (the fp32 master copy in bf16-mixed, which then also writes the bf16 weights).
            master = features.master_bytes
            adam_bytes = gb + 2 * features.moment_bytes + 2 * (master or dt) + (dt if master else 0)
            opt = opt_params * adam_bytes / r.mem_bw
            parts["dp_comm"] = passes * dp_comm
            parts["optimizer"] = passes * opt
            step = pipe + dp_comm + opt
        time = passes * step
        parts["compute"] *= passes
        parts["tp_comm"] *= passes
    parts["pp_bubble"] = max(0.0, time - sum(parts.values()))
    busy = min(1.0, busy_s / (pp * time)) if time > 0 else 1.0
    return float(time), parts, busy
