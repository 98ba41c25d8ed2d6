"""The forward that generation runs: prefill and decode steps against a KV cache of rotated keys.

megatron-core's static-batch inference path keeps the keys unrotated and rotates the whole cache
again at every decode step, in every layer (RoPE's cosines included), and wraps each matmul in
its tensor-parallel modules; at a handful of rows per step those fixed costs are a third of a
decode step on CPU. :class:`StageDecoder` runs the same model with the same weights (the
shard's own megatron modules are read, never copied) as plain tensor operations: keys are
rotated once when they enter the cache, the attention goes through torch's SDPA, and the
row-parallel projections are summed over the tensor-parallel group passed in.

The layer it computes is megatron-core's local GPT layer as :mod:`lightning_real.models.build`
configures it (pre-norm, no dropout, RoPE on query and key by sequence index, or learned
positions; SwiGLU or GELU MLP; biases where the spec has them), so greedy tokens equal
transformers' and megatron's (the tests compare them under tp and pp layouts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_real.models.build import mask_padded_logits
from lightning_real.models.pipeline import neighbours
from lightning_real.models.shard import ModelShard


class _Linear:
    """``y = x W^T + b`` of one megatron linear; on CPU, decode steps use a oneDNN-packed copy.

    At a few rows per step a CPU matmul is bound by reading the weight, and oneDNN's blocked
    layout reads it 1.3-2.5x faster than the plain one (measured at 4-64 rows, docs/
    benchmarks.md). The copy is made once per generation, from the weights as they are then
    (it costs the weight's bytes again while the generation runs); the prefill, with many rows,
    uses the plain weight.

    ``row_parallel``: the output is a partial sum over ``tp_group`` (megatron's
    ``RowParallelLinear``), summed there before the (unsplit) bias is added.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: int,
        pack: bool,
        row_parallel: bool = False,
        tp_group: Any = None,
    ) -> None:
        self.weight, self.bias = weight, bias
        self.row_parallel, self.tp_group = row_parallel, tp_group
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows) if pack else None

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is None or x.shape[1] != 1:
            return F.linear(x, self.weight, bias)
        b = x.shape[0]
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x.view(b, -1), self.packed, bias, "none", [], "")
        return y.view(b, 1, -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.row_parallel:
            return self._matmul(x, self.bias)
        y = self._matmul(x, None)
        if self.tp_group is not None:
            dist.all_reduce(y, group=self.tp_group)
        return y if self.bias is None else y + self.bias


def _can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's packed linear serves this device and dtype (CPU, fp32; bf16 where the CPU has it)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``t`` [b, heads, n, hn] with ``cos``/``sin`` [n, hn] (halves, not interleaved)."""
    x1, x2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin


def _one_query_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of one new query per row, ``q`` [b, heads, 1, hn], over the cached ``keys`` and
    ``values`` [b, groups, L, hn]; ``allowed`` [b, 1, 1, L] or None (all visible).

    Two batched matmuls with each query group's heads stacked as rows: torch's CPU SDPA kernel
    (a flash kernel with its tiling set up per call) takes 2-3x as long for a single query.
    Softmax in fp32, as that kernel accumulates.
    """
    b, heads, _, hn = q.shape
    groups = keys.shape[1]
    scores = torch.matmul(q.reshape(b, groups, heads // groups, hn), keys.transpose(-1, -2))
    scores = scores * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, heads, 1, hn)


class StageDecoder:
    """This rank's pipeline stage of one model, run one chunk of tokens at a time with a KV cache.

    ``batch`` rows, at most ``max_len`` tokens each (prompt plus new tokens). The first call is
    the prefill (the whole prompt), each later call feeds one token per row; hidden states go
    from stage to stage by point-to-point sends inside the layout.
    """

    def __init__(self, shard: ModelShard, batch: int, max_len: int) -> None:
        g, lay, spec = shard.groups, shard.layout, shard.spec
        assert shard.module is not None, "only the layout's ranks generate"
        self.model: Any = shard.module
        self.spec = spec
        tp_group = g.tp if lay.tp > 1 else None
        self.first, self.last = g.is_first_stage, g.is_last_stage
        self.prev, self.next = neighbours(shard)
        p = next(self.model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.heads = spec.num_heads // lay.tp
        self.groups = spec.num_kv_heads // lay.tp
        self.hn = spec.head_dim
        self.scale = 1.0 / self.hn**0.5  # megatron's default softmax scale, as the model trains with
        self.layers = list(self.model.decoder.layers)
        pack = _can_pack(self.device, self.dtype)
        self.linears = [
            (
                _Linear(sa.linear_qkv.weight, sa.linear_qkv.bias, batch, pack),
                _Linear(sa.linear_proj.weight, sa.linear_proj.bias, batch, pack, True, tp_group),
                _Linear(mlp.linear_fc1.weight, mlp.linear_fc1.bias, batch, pack),
                _Linear(mlp.linear_fc2.weight, mlp.linear_fc2.bias, batch, pack, True, tp_group),
            )
            for sa, mlp in ((layer.self_attention, layer.mlp) for layer in self.layers)
        ]
        self.head: _Linear | None = None
        if self.last:
            tied = spec.tied_embeddings
            w = self.model.shared_embedding_or_output_weight() if tied else self.model.output_layer.weight
            self.head = _Linear(w, None, batch, pack)
        self.tp, self.tp_rank = lay.tp, g.tp_rank
        shape = (batch, self.groups, max_len, self.hn)
        self.keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        if not spec.learned_positions:
            # megatron's angles [max_len, 1, 1, hn] in fp32; cos and sin cast to the working
            # dtype as its apply_rotary_pos_emb does, once for the whole generation.
            freqs = self.model.rotary_pos_emb(max_len)[:, 0, 0].float()
            self.cos, self.sin = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)
        self.offset = 0
        # megatron's GLU and activation as the model was built with them
        self.act: Callable[[torch.Tensor], torch.Tensor] = self.model.config.activation_func
        self.gated = spec.gated_mlp

    def _attention(self, i: int, h: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = h.shape
        qkv = self.linears[i][0](h)
        # megatron's fused layout: per query group, its query heads, then one key and one value
        qkv = qkv.view(b, n, self.groups, self.heads // self.groups + 2, self.hn)
        q = qkv[:, :, :, :-2].reshape(b, n, self.heads, self.hn).transpose(1, 2)
        k = qkv[:, :, :, -2].transpose(1, 2)
        v = qkv[:, :, :, -1].transpose(1, 2)
        lo, hi = self.offset, self.offset + n
        if self.cos is not None and self.sin is not None:
            cos, sin = self.cos[lo:hi], self.sin[lo:hi]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        self.keys[i][:, :, lo:hi] = k
        self.values[i][:, :, lo:hi] = v
        keys, values = self.keys[i][:, :, :hi], self.values[i][:, :, :hi]
        if n == 1 and self.device.type == "cpu":
            out = _one_query_attention(q, keys, values, allowed, self.scale)
        else:
            out = F.scaled_dot_product_attention(
                q,
                keys,
                values,
                attn_mask=allowed,
                is_causal=allowed is None and n > 1,
                scale=self.scale,
                enable_gqa=self.groups != self.heads,
            )
        return self.linears[i][1](out.transpose(1, 2).reshape(b, n, self.heads * self.hn))

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        x = self.linears[i][2](h)
        if self.gated:
            gate, up = x.chunk(2, dim=-1)
            x = self.act(gate) * up
        else:
            x = self.act(x)
        return self.linears[i][3](x)

    def __call__(
        self, ids: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Run ``ids`` [b, n] at positions ``pos``; ``allowed`` [b, 1, n, offset + n] is True where
        a query may see a key (None: causal over the chunk, nothing cached before it).

        Returns the last position's logits [b, V/tp] on the last stage, None elsewhere.
        """
        b, n = ids.shape
        if self.first:
            x = self.model.embedding(input_ids=ids, position_ids=pos).transpose(0, 1)
        else:
            x = torch.empty(b, n, self.spec.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, self.prev)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer.input_layernorm(x), allowed)
            x = x + self._mlp(i, layer.pre_mlp_layernorm(x))
        self.offset += n
        if self.next is not None:
            dist.send(x.contiguous(), self.next)
            return None
        assert self.head is not None
        x = self.model.decoder.final_layernorm(x[:, -1:])  # [b, 1, h]
        # This rank's vocabulary slice (sampling is vocab-parallel); a padded vocabulary's
        # padding columns become -inf, as the output layer's hook makes them in training.
        logits = self.head(x)[:, 0]
        out: torch.Tensor = mask_padded_logits(
            self.model.output_layer, (), (logits, None), self.spec, self.tp, self.tp_rank
        )[0]
        return out
