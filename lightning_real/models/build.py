"""Build a megatron-core ``GPTModel`` for one ModelSpec on one Layout, with explicit process groups."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_real.compat import apply_cpu_compat, cuda_to_cpu, has_cuda
from lightning_real.distributed.groups import LayoutGroups
from lightning_real.layout import LayoutError
from lightning_real.models.spec import ModelSpec, check_layout

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage.

    The first and last stages also hold the embedding and the head, so when ``pp`` does not
    divide ``num_layers`` they take the fewer layers; middle stages are equal because
    megatron-core can only vary the first and last stage.
    """
    if pp < 1 or num_layers < pp:
        raise LayoutError(f"{num_layers} layers cannot be split into pp={pp} pipeline stages")
    if num_layers % pp == 0:
        return [num_layers // pp] * pp
    if pp == 2:
        first = num_layers // 2
        return [first, num_layers - first]
    mid = math.ceil(num_layers / pp)
    while True:
        ends = num_layers - (pp - 2) * mid
        if ends >= 2:
            first = ends // 2
            return [first] + [mid] * (pp - 2) + [ends - first]
        mid -= 1


def stage_layer_range(num_layers: int, pp: int, stage: int) -> range:
    """Global indices of the transformer layers held by pipeline ``stage``."""
    counts = stage_layers(num_layers, pp)
    start = sum(counts[:stage])
    return range(start, start + counts[stage])


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


@dataclass(frozen=True)
class BuildOptions:
    """How a model is built, beyond its spec and layout (the runtime's features for one copy)."""

    dtype: torch.dtype = torch.float32
    """Parameter and activation dtype (the working copy): float32 or bfloat16."""
    attention: Literal["local", "sdpa"] = "sdpa"
    """Core attention: torch's SDPA, or megatron-core's unfused 'local' attention."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation in backward: none, the attention core, or whole layers."""

    def __post_init__(self) -> None:
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"BuildOptions.dtype={self.dtype}; allowed: torch.float32, torch.bfloat16")
        if self.attention not in ("local", "sdpa"):
            raise ValueError(f"BuildOptions.attention={self.attention!r}; allowed: local, sdpa")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"BuildOptions.recompute={self.recompute!r}; allowed: none, selective, full")


def _recompute(recompute: str) -> dict[str, Any]:
    """megatron-core's settings for a recompute choice."""
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {}


def transformer_config(spec: ModelSpec, groups: LayoutGroups, options: BuildOptions | None = None) -> Any:
    """megatron-core TransformerConfig for ``spec`` split as ``groups.layout``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    opts = options or BuildOptions()
    dtype = opts.dtype
    lay = groups.layout
    counts = stage_layers(spec.num_layers, lay.pp)
    uneven = lay.pp > 1 and len(set(counts)) > 1
    cpu = not has_cuda()
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        ffn_hidden_size=spec.ffn_hidden_size,
        kv_channels=spec.head_dim,
        normalization="LayerNorm" if spec.family == "gpt2" else "RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=spec.gated_mlp,
        activation_func=F.silu if spec.gated_mlp else _gelu_tanh,
        add_bias_linear=spec.has_bias,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=lay.tp,
        pipeline_model_parallel_size=lay.pp,
        num_layers_in_first_pipeline_stage=counts[0] if uneven else None,
        num_layers_in_last_pipeline_stage=counts[-1] if uneven else None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=cpu,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        sequence_parallel=False,
        moe_token_dispatcher_type="alltoall",
        variable_seq_lengths=True,
        **_recompute(opts.recompute),
        deallocate_pipeline_outputs=False,
    )


class ValueHead(nn.Module):
    """Scalar head replacing the vocabulary projection (critic, reward).

    Replicated on every tensor-parallel rank (it is tiny); it takes the call signature of
    megatron's ``ColumnParallelLinear`` so ``GPTModel.forward`` uses it unchanged.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size, dtype=dtype))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def forward(self, x: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None) -> tuple:
        return F.linear(x, self.weight), None


def mask_padded_logits(
    module: nn.Module, args: tuple, output: tuple, spec: ModelSpec, tp: int, tp_rank: int
) -> tuple:
    """Forward hook of the LM head: logits of padding columns become -inf.

    Softmax, log-probabilities, entropy and sampling then give them no mass on the rank that
    holds them, with every slice keeping its width (vocab-parallel collectives need equal ones).
    """
    logits, bias = output
    width = logits.shape[-1]
    # A gathered output (tp == 1, or runtime_gather_output) holds every column from token 0.
    lo, hi = (0, spec.vocab_size) if width == spec.padded_vocab_size(tp) else spec.vocab_range(tp, tp_rank)
    if hi - lo == width:
        return output
    pad = torch.arange(width, device=logits.device) >= hi - lo
    return logits.masked_fill(pad, float("-inf")), bias


@torch.no_grad()
def zero_vocab_padding_(model: nn.Module, spec: ModelSpec, tp: int, tp_rank: int) -> None:
    """Zero this rank's padding rows of the embedding and LM head.

    They get no gradient, but must be finite: ``0 * nan`` in the head's backward would spread.
    """
    lo, hi = spec.vocab_range(tp, tp_rank)
    names = ["embedding.word_embeddings.weight"] + (["output_layer.weight"] if spec.head == "lm" else [])
    params = dict(model.named_parameters())
    for name in names:
        if name in params:
            params[name][hi - lo :].zero_()


def _pad_vocab(model: GPTModel, spec: ModelSpec, groups: LayoutGroups) -> None:
    """Zero the padding rows and mask their logits (nothing to do without padding)."""
    tp = groups.layout.tp
    if spec.padded_vocab_size(tp) == spec.vocab_size:
        return
    zero_vocab_padding_(model, spec, tp, groups.tp_rank)
    if spec.head == "lm" and groups.is_last_stage:
        hook = functools.partial(mask_padded_logits, spec=spec, tp=tp, tp_rank=groups.tp_rank)
        model.output_layer.register_forward_hook(hook)


def _batch_first_logits(model: GPTModel) -> None:
    """Let the LM head write ``[b, s, V]`` logits directly.

    megatron-core's GPTModel returns ``logits.transpose(0, 1).contiguous()``: a logit-sized copy
    in the forward and another in the backward. The head's input is transposed instead (``V / h``
    times fewer elements) and its output handed back as an ``[s, b, V]`` view of the ``[b, s, V]``
    result, so that ``.contiguous()`` finds nothing to copy. Registered after the padding mask's
    hook, which then sees the ``[b, s, V]`` result. Not for sequence parallelism (the head's
    input would be gathered along the sequence, dim 0); the runtime never enables it.
    """

    def batch_first(module: nn.Module, args: tuple) -> tuple:
        return (args[0].transpose(0, 1).contiguous(), *args[1:])

    def seq_first_view(module: nn.Module, args: tuple, output: tuple) -> tuple:
        logits, bias = output
        return logits.transpose(0, 1), bias

    model.output_layer.register_forward_pre_hook(batch_first)
    model.output_layer.register_forward_hook(seq_first_view)


def build_gpt(
    spec: ModelSpec, groups: LayoutGroups, seed: int = 0, options: BuildOptions | None = None
) -> GPTModel:
    """A megatron-core GPTModel holding this rank's shard of ``spec`` under ``groups.layout``.

    All ranks of the layout must call this together with the same ``seed``; random weights
    are then consistent shards of one model (they are usually overwritten by an HF import).
    """
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    from lightning_real.models.attention import layer_spec as layer_spec_for

    if not groups.member:
        raise RuntimeError(f"rank {groups.rank} is not in layout {groups.layout}; nothing to build")
    check_layout(spec, groups.layout)
    apply_cpu_compat()
    from megatron.core import parallel_state

    # Core attention borrows scratch space from megatron's process-wide buffer.
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    # Building draws random weights; the draws happen in a fork of the process's random state,
    # so building (or moving to) a layout never resets what later draws in this process see.
    # megatron's model-parallel RNG tracker is reset here (it only feeds dropout, which is off).
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if has_cuda() else []):
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(
            seed,
            inference_rng_tracker=not has_cuda(),
            tp_rank=groups.tp_rank,
            ep_rank=0,
            etp_rank=0,
            force_reset_rng=True,
        )
        opts = options or BuildOptions()
        config = transformer_config(spec, groups, opts)
        layer_spec = layer_spec_for(opts.attention, config.normalization)
        # Tied embeddings across pipeline stages move the weight with .cuda() during construction.
        with cuda_to_cpu():
            model = GPTModel(
                config=config,
                transformer_layer_spec=layer_spec,
                vocab_size=spec.padded_vocab_size(groups.layout.tp),
                max_sequence_length=spec.max_position_embeddings,
                pre_process=groups.is_first_stage,
                post_process=groups.is_last_stage,
                parallel_output=True,
                share_embeddings_and_output_weights=spec.tied_embeddings,
                position_embedding_type="learned_absolute" if spec.learned_positions else "rope",
                rotary_base=int(spec.rope_theta),
                pg_collection=groups.pg_collection(),
            )
        if spec.head == "value" and groups.is_last_stage:
            model.output_layer = ValueHead(spec.hidden_size, opts.dtype)
    if opts.dtype != torch.float32:
        # megatron-core's local norms and learned positions are created in fp32 (its Float16Module
        # casts the whole model); the parameters are cast here, buffers such as RoPE's stay fp32.
        with torch.no_grad():
            for p in model.parameters():
                if p.dtype != opts.dtype:
                    p.data = p.data.to(opts.dtype)
    _pad_vocab(model, spec, groups)
    if spec.head == "lm" and groups.is_last_stage and not config.sequence_parallel:
        _batch_first_logits(model)
    if has_cuda():
        model = model.cuda()
    return model
