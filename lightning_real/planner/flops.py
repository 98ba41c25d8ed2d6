"""Closed-form FLOP counts of a decoder-only transformer (matmuls and attention; norms ignored).

Per token and layer, the weight matmuls cost ``2 * W`` FLOPs (one multiply-add per weight), with
``W = h*(h + 2*kv) + h*h + (3 if SwiGLU else 2)*h*f`` (QKV, output projection, MLP). Causal
attention lets the token at position ``i`` (1-based) attend to ``i`` keys, costing ``4*h*i``
(``QK^T`` and ``AV``, ``2*h`` each per key; GQA shares keys but not this work). The head costs
``2*h*V`` per token whose logits are computed (``2*h`` for a value head). Backward is twice the
forward; activation recomputation is not used.
"""

from __future__ import annotations

from lightning_real.models.spec import ModelSpec


def layer_matmul_weights(spec: ModelSpec) -> int:
    """Weights one transformer layer multiplies each token by (biases and norms excluded)."""
    h, f = spec.hidden_size, spec.ffn_hidden_size
    kv = spec.num_kv_heads * spec.head_dim
    return h * (h + 2 * kv) + h * h + (3 if spec.gated_mlp else 2) * h * f


def head_width(spec: ModelSpec) -> int:
    """Outputs of the head per token: the vocabulary, or 1 for a value head."""
    return spec.vocab_size if spec.head == "lm" else 1


def attention_positions(seq: int, ctx: int = 0) -> float:
    """Sum of the key counts seen by ``seq`` new tokens that follow ``ctx`` cached ones (causal)."""
    return seq * ctx + seq * (seq + 1) / 2


def forward_flops(
    spec: ModelSpec,
    batch: int,
    seq: int,
    ctx: int = 0,
    head_tokens: int | None = None,
    layers: int | None = None,
) -> float:
    """FLOPs of a forward pass over ``seq`` new tokens per sequence after ``ctx`` cached tokens.

    ``head_tokens`` tokens per sequence go through the head (all ``seq`` by default; 1 when only
    the last token's logits are needed); ``layers`` limits the count to that many layers (a
    pipeline stage) and then excludes the head unless ``head_tokens`` is given.
    """
    n_layers = spec.num_layers if layers is None else layers
    if head_tokens is None:
        head_tokens = seq if layers is None else 0
    h = spec.hidden_size
    per_seq = n_layers * (2 * layer_matmul_weights(spec) * seq + 4 * h * attention_positions(seq, ctx))
    per_seq += 2 * h * head_width(spec) * head_tokens
    return batch * per_seq


def train_flops(spec: ModelSpec, batch: int, seq: int) -> float:
    """Forward plus backward (twice the forward) over full sequences."""
    return 3 * forward_flops(spec, batch, seq)


def generate_flops(spec: ModelSpec, batch: int, prompt: int, gen: int) -> float:
    """Prefill of the prompt, then ``gen - 1`` single-token decode steps (the prefill yields the
    first token); logits only for the last token of each step."""
    prefill = forward_flops(spec, batch, prompt, 0, head_tokens=1)
    decode = forward_flops(spec, batch, gen - 1, prompt, head_tokens=gen - 1) if gen > 1 else 0.0
    return prefill + decode
