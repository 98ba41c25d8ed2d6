"""Memory one device needs for one call under one layout: parameters, gradients, Adam states,
activations, KV cache and logits, with the reason when it does not fit.

Parameter counts per pipeline stage come from the exact sharding description the runtime uses
(:func:`lightning_real.models.sharding.stage_param_specs`). Element sizes follow the run's
:class:`~lightning_real.features.RuntimeFeatures` (see docs/planner.md): '32-true' keeps fp32
parameters, gradients and Adam moments; 'bf16-mixed' bf16 parameters with fp32 main gradients,
an fp32 master copy and fp32 moments; 'bf16-true' everything in bf16. With the distributed
optimizer the optimizer states are split over the data-parallel group; SDPA attention stores
no score matrices, megatron-core's local attention does; training uses 1F1B, so pipeline stage
``i`` holds ``min(m, pp - i)`` microbatches of activations. A generate call on the vLLM backend
holds the call shard, the engine's weights and its whole KV-cache budget, and the log-prob
forward's working set; the engine stays resident between calls unless ``VllmConfig.release``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from lightning_real.dataflow import MFC
from lightning_real.features import RuntimeFeatures
from lightning_real.models.build import stage_layers
from lightning_real.models.sharding import stage_param_specs
from lightning_real.models.spec import ModelSpec
from lightning_real.planner.flops import head_width

LOGIT_BYTES = 4  # logits are upcast to fp32 for the softmax


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on the fullest device of a layout for one call."""

    params: float
    """Model weights held for the call."""
    grads: float
    """Gradient buffers (train calls)."""
    optimizer: float
    """Adam moments and master weights (train calls)."""
    activations: float
    """Activations kept for backward, or the working set of one forward pass."""
    kv_cache: float
    """Keys and values of every generated sequence (generate calls)."""
    logits: float
    """Logits of a microbatch (and their gradient when training)."""
    engine: float = 0.0
    """Weights of a vLLM engine (generate calls on the ``vllm`` backend; its KV cache is ``kv_cache``)."""
    engine_kept: bool = False
    """Whether the vLLM engine's weights and KV cache stay on the device between calls
    (``VllmConfig.release`` false): then they are :attr:`kept`, not :attr:`transient`."""

    @property
    def total(self) -> float:
        """All of the above."""
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.activations
            + self.kv_cache
            + self.logits
            + self.engine
        )

    @property
    def states(self) -> float:
        """What stays on the device between calls when the layout is the model's home: the
        parameters and the optimizer state (the runtime frees the gradients after each train call)."""
        return self.params + self.optimizer

    @property
    def kept(self) -> float:
        """What a vLLM engine that is not released keeps on the device between calls, whichever
        call runs there: its weights and KV cache (0 otherwise)."""
        return self.engine + self.kv_cache if self.engine_kept else 0.0

    @property
    def transient(self) -> float:
        """What exists only while the call runs."""
        return self.grads + self.activations + self.kv_cache + self.logits + self.engine - self.kept

    def describe(self) -> str:
        """'params 13.5 GB + grads ... = total' for reasons and reports."""
        parts = [
            (n, getattr(self, n))
            for n in ("params", "grads", "optimizer", "activations", "kv_cache", "logits", "engine")
            if getattr(self, n) > 0
        ]
        return " + ".join(f"{n} {fmt_bytes(v)}" for n, v in parts) + f" = {fmt_bytes(self.total)}"


def fmt_bytes(n: float) -> str:
    """Human-readable size (decimal units, as GPU data sheets use)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


@lru_cache(maxsize=4096)
def stage_params(spec: ModelSpec, tp: int, pp: int) -> tuple[int, ...]:
    """Parameters one tensor-parallel rank of each pipeline stage holds."""
    out = []
    for stage in range(pp):
        n = 0
        for ps in stage_param_specs(spec, pp, stage):
            size = 1
            for d in ps.local_shape(tp):
                size *= d
            n += size
        out.append(n)
    return tuple(out)


def act_elems_per_token_layer(spec: ModelSpec, tp: int) -> float:
    """Activation elements one layer stores per token for backward on one tp rank.

    Norm and linear inputs are replicated over tp (no sequence parallelism): four of width h;
    q/k/v, the attention output and the MLP's inner tensors are split over tp.
    """
    h, f = spec.hidden_size, spec.ffn_hidden_size
    kv = spec.num_kv_heads * spec.head_dim
    mlp = (2 * f + f) if spec.gated_mlp else (f + f)
    return 4 * h + (h + 2 * kv + h + mlp) / tp


def saved_elems_per_token_layer(spec: ModelSpec, tp: int, seq: int) -> float:
    """Elements one megatron-core layer of the runtime keeps for backward per token on one tp
    rank, counted from the tensors autograd saves (``saved_tensors_hooks`` on a forward).

    Each RMSNorm keeps its input, its normalized output and the following linear's input copy
    (replicated over tp: no sequence parallelism); attention keeps the fused qkv output, the
    rotated q and k, the core's output and its log-sum-exp; SDPA keeps the attention mask
    (``[b, 1, s, s]``, materialised in the working dtype for the kernel: ``seq`` per token); a
    gated MLP keeps its fc1 output, the gate, its activation and their product (5 f-wide
    tensors; 2 without a gate).
    """
    h, f = spec.hidden_size, spec.ffn_hidden_size
    kv = spec.num_kv_heads * spec.head_dim
    mlp = 5 * f if spec.gated_mlp else 2 * f
    attn = (h + 2 * kv) + (h + kv) + h + spec.num_heads
    return 2 * (3 * h + 1) + seq + (attn + mlp) / tp


TRAIN_LOGIT_COPIES = 3
"""Logit-sized fp32 tensors alive at a train step's peak (the logits, the softmax the
log-probability function saves and turns into their gradient in place, and the gradient of the
logits' slice): the slope of the measured peak against the vocabulary (``benchmarks/engine.py
--only memory``, vocab 8192 against 16384)."""


def vllm_block_tokens(features: RuntimeFeatures, default_block: int) -> int:
    """Tokens per KV-cache block of the vLLM engines: the features' ``block_size``, else the
    device's default (``HardwareProfile.vllm_block_size``)."""
    return features.vllm.block_size or default_block


def vllm_kv_bytes_per_row(call: MFC, spec: ModelSpec, tp: int, features: RuntimeFeatures, block: int) -> int:
    """KV-cache bytes one sequence of ``call`` takes on one engine rank at its full length
    (prompt + response, rounded up to whole blocks of ``block`` tokens): keys and values of
    every layer, the key/value heads split over the replica's ``tp`` ranks, in the working dtype."""
    tokens = -(-call.seq_len // block) * block
    heads = spec.num_kv_heads // tp if spec.num_kv_heads % tp == 0 else -(-spec.num_kv_heads // tp)
    return tokens * spec.num_layers * 2 * heads * spec.head_dim * features.param_bytes


def vllm_rows_fit(call: MFC, spec: ModelSpec, dp: int, tp: int, features: RuntimeFeatures, block: int) -> int:
    """Sequences one vLLM engine generates at once: the replica's rows, at most ``max_num_seqs``,
    at most what its KV cache holds at full length (0: not even one sequence fits)."""
    rows = -(-call.batch_size // dp)
    per_row = vllm_kv_bytes_per_row(call, spec, tp, features, block)
    return min(rows, features.vllm.max_num_seqs, features.vllm.kv_cache_bytes // per_row)


def call_memory(
    call: MFC, spec: ModelSpec, dp: int, tp: int, pp: int, m: int, features: RuntimeFeatures
) -> MemoryBreakdown:
    """Peak bytes on the fullest device when ``call`` runs ``spec`` as ``d{dp}t{tp}p{pp}`` with
    ``m`` microbatches under ``features``.

    The batch per replica is ``ceil(batch / dp)`` sequences (per optimizer step when training),
    a microbatch ``ceil(that / m)``. The distributed optimizer splits Adam states and master
    weights over the data-parallel group (ZeRO-1); without SDPA attention each layer also keeps
    its fp32 attention probabilities (``heads / tp`` score matrices per sequence).
    """
    dtype_bytes = features.param_bytes
    flash_attention = features.flash_attention
    per_stage = stage_params(spec, tp, pp)
    counts = stage_layers(spec.num_layers, pp)
    rep_batch = -(-call.batch_size // dp)
    train = call.call_type == "train"
    # A train call takes `minibatches` optimizer steps, each over its share of the batch.
    step_batch = -(-rep_batch // call.minibatches) if train else rep_batch
    mb = -(-step_batch // m)
    act_layer = act_elems_per_token_layer(spec, tp) * dtype_bytes
    kv_width = 2 * spec.num_kv_heads * spec.head_dim / tp * dtype_bytes
    vocab = head_width(spec) / tp if spec.head == "lm" else 1

    def scores(seq: int) -> float:
        """Bytes of one sequence's attention probabilities in one layer (none when flash-style)."""
        return 0.0 if flash_attention else spec.num_heads / tp * seq * seq * LOGIT_BYTES

    if call.call_type == "generate" and features.generation_backend == "vllm":
        if pp != 1:
            raise ValueError(
                f"{call.name}: the vllm generation backend runs no pipeline parallelism (pp={pp}); "
                "allowed: a dNtTp1 layout, or generation_backend native"
            )
        rows = rep_batch
        # The call shard's own copy (it recomputes the response log-probs), the engine's weights
        # (the same split over the replica's tp ranks) and the engine's whole KV-cache budget,
        # allocated up front. Working sets: the engine's prefill over the rows it holds at once,
        # then the log-prob forward over all of the replica's rows (one forward, as inference).
        params = per_stage[0] * dtype_bytes
        held = max(1, min(rows, features.vllm.max_num_seqs))
        prefill = held * (call.prompt_len * act_layer + scores(call.prompt_len))
        recompute = rows * (call.seq_len * act_layer + scores(call.seq_len))
        logits = 2 * rows * call.seq_len * vocab * LOGIT_BYTES
        return MemoryBreakdown(
            params,
            0.0,
            0.0,
            max(prefill, recompute),
            float(features.vllm.kv_cache_bytes),
            logits,
            engine=params,
            engine_kept=not features.vllm.release,
        )
    best: MemoryBreakdown | None = None
    for stage in range(pp):
        params = per_stage[stage] * dtype_bytes
        grads = optim = act = kv = logits = 0.0
        last = stage == pp - 1
        if train:
            grads = per_stage[stage] * features.grad_bytes
            optim = per_stage[stage] * (features.moment_bytes + features.master_bytes)
            if features.distributed_optimizer(dp):
                optim /= dp
            in_flight = min(m, pp - stage)
            seq = call.seq_len
            saved = saved_elems_per_token_layer(spec, tp, seq) * dtype_bytes
            if features.recompute == "full":
                # only each layer's input is kept; one layer's activations exist while it is recomputed
                kept = counts[stage] * seq * spec.hidden_size * dtype_bytes
                act = in_flight * mb * kept + mb * (seq * saved + scores(seq))
            elif features.recompute == "selective":
                # the attention core's output, log-sum-exp, mask and scores are recomputed, not kept
                core = (spec.hidden_size + spec.num_heads) / tp * dtype_bytes + seq * dtype_bytes
                act = in_flight * mb * counts[stage] * seq * (saved - core)
            else:
                act = in_flight * mb * counts[stage] * (seq * saved + scores(seq))
            if last:
                logits = TRAIN_LOGIT_COPIES * mb * call.seq_len * vocab * LOGIT_BYTES
        else:
            seq = call.prompt_len if call.call_type == "generate" else call.seq_len
            # Forward only: one layer's working set at a time.
            act = mb * (seq * act_layer + scores(seq))
            if call.call_type == "generate":
                # one round's rows at a time (the generate call's microbatches are rounds)
                kv = mb * call.seq_len * counts[stage] * kv_width
                if last:
                    logits = mb * vocab * LOGIT_BYTES
            elif last:
                logits = 2 * mb * call.seq_len * vocab * LOGIT_BYTES
        b = MemoryBreakdown(params, grads, optim, act, kv, logits)
        if best is None or b.total > best.total:
            best = b
    assert best is not None
    return best


def fits(mem: MemoryBreakdown, usable_bytes: float) -> str | None:
    """None when ``mem`` fits, else the reason."""
    if mem.total <= usable_bytes:
        return None
    return f"needs {mem.describe()} per device > {fmt_bytes(usable_bytes)} usable"
