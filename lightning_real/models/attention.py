"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` in megatron-core's layer.

megatron-core's local layer spec computes attention unfused (``DotProductAttention``: the score
matrix is written, masked, softmaxed and read back); its fused kernels need TransformerEngine.
:class:`SDPAttention` takes the same place in the layer spec and calls torch's SDPA instead, which
picks flash or memory-efficient kernels on CUDA and a fused CPU kernel where it can, so no score
matrix is kept for backward. It takes megatron's inputs as they are: query ``[sq, b, np, hn]``,
key and value ``[sk, b, ng, hn]`` (grouped-query heads are expanded by SDPA itself), and megatron's
boolean mask ``[b, 1, sq, sk]`` with True where a query may *not* see a key (causal, padding and
packed-segment masks alike, see :mod:`lightning_real.models.masks`). Decode steps against the KV
cache pass the cached keys and a ``[b, 1, 1, sk]`` mask, which works unchanged.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward), via SDPA."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        tp = pg_collection.tp.size() if pg_collection is not None else config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.current_max_attn_logits = None  # megatron's QK-clip bookkeeping reads it

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """``[sq, b, np * hn]``: the attention output of this rank's heads."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes packed sequences and biases through attention_mask")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, n, h] -> [b, n, s, h]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attention_mask is None and sq > 1,
            scale=self.scale,
            enable_gqa=self.groups != self.heads,
        )
        # [b, n, sq, h] -> [sq, b, n * h]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)


class _Rope(torch.autograd.Function):
    """Rotary embedding ``t * cos + rotate_half(t) * sin`` (halves, not interleaved), fused by hand.

    megatron-core's unfused form (``_apply_rotary_pos_emb_bshd``) writes six tensor-sized
    temporaries per call (two products, a negation, two concatenations, one of them a plain copy)
    and autograd as many again backward; this writes the output once and updates its halves in
    place, and its backward does the same with the transposed rotation.
    """

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = t.shape[-1] // 2
        out = t * cos
        out[..., :h].addcmul_(t[..., h:], sin[..., :h], value=-1.0)
        out[..., h:].addcmul_(t[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        grad = g * cos
        grad[..., :h].addcmul_(g[..., h:], sin[..., h:])
        grad[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1.0)
        return grad, None, None


def rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``t`` ``[s, b, n, d]`` rotated by the angles ``freqs`` ``[s, 1, 1, d]`` (fp32), as megatron-core
    and transformers do it: cos and sin in fp32, cast to ``t``'s dtype."""
    out: torch.Tensor = _Rope.apply(t, torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype))
    return out


class RopeSelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` with the rotary embedding applied by :func:`rope`.

    The rotation is applied to the query and key right where megatron's projection returns them,
    and megatron's own (unfused) rotation is skipped by handing it no embedding. Only where the
    two agree: halves rotated over the whole head, no inference context, no THD-packed
    sequences, no fused-rope kernels; anything else runs megatron's path unchanged. Under full
    recomputation the layer's forward, this included, runs again; selective recomputation
    checkpoints the core attention alone, after the rotation.
    """

    _rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        emb = kwargs.get("rotary_pos_emb")
        c = self.config
        if (
            emb is None
            or args
            or kwargs.get("inference_context") is not None
            or kwargs.get("packed_seq_params") is not None
            or c.rotary_interleaved
            or c.multi_latent_attention
            or c.apply_rope_fusion
            or c.fused_single_qkv_rope
        ):
            return super().forward(hidden_states, *args, **kwargs)
        pair = emb if isinstance(emb, tuple) else (emb, emb)
        if any(f.shape[-1] != self.hidden_size_per_attention_head for f in pair):
            return super().forward(hidden_states, *args, **kwargs)  # partial rotary: megatron's path
        self._rope = pair
        try:
            return super().forward(hidden_states, *args, **{**kwargs, "rotary_pos_emb": None})
        finally:
            self._rope = None

    def get_query_key_value_tensors(self, *args: Any, **kwargs: Any) -> Any:
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self._rope is None:
            return out
        q_freqs, k_freqs = self._rope
        return (rope(out[0], q_freqs), rope(out[1], k_freqs), *out[2:])


def layer_spec(attention: str, normalization: str) -> Any:
    """megatron-core's local GPT layer spec with the core attention of ``attention`` ('local', 'sdpa')."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization=normalization)
    if attention == "local":
        return spec
    if attention != "sdpa":
        raise ValueError(f"attention={attention!r}; allowed: local, sdpa")
    spec = copy.deepcopy(spec)  # the library's spec may be shared; change a copy
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.self_attention.module = RopeSelfAttention
    return spec
