"""Published model architectures the planner prices (LLaMA-2 family, from the models' HF configs)."""

from __future__ import annotations

from typing import Literal

from lightning_real.models.spec import ModelSpec

# hidden, layers, heads, kv heads, ffn; all have vocab 32000, RMSNorm, SwiGLU, RoPE, untied embeddings.
_LLAMA2: dict[str, tuple[int, int, int, int, int]] = {
    "7b": (4096, 32, 32, 32, 11008),
    "13b": (5120, 40, 40, 40, 13824),
    "34b": (8192, 48, 64, 8, 22016),  # CodeLLaMA 34B: the LLaMA-2 paper's 34B was not released
    "70b": (8192, 80, 64, 8, 28672),
}
LLAMA2_SIZES: tuple[str, ...] = tuple(_LLAMA2)


def llama2_spec(size: str, head: Literal["lm", "value"] = "lm") -> ModelSpec:
    """LLaMA-2 of ``size`` ('7b', '13b', '34b', '70b'); ``head='value'`` for critic and reward models."""
    key = size.strip().lower()
    if key not in _LLAMA2:
        raise ValueError(f"unknown LLaMA-2 size {size!r}; allowed: {', '.join(LLAMA2_SIZES)}")
    h, layers, heads, kv, ffn = _LLAMA2[key]
    return ModelSpec(
        family="llama",
        vocab_size=32000,
        hidden_size=h,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        ffn_hidden_size=ffn,
        max_position_embeddings=4096,
        norm_eps=1e-5,
        rope_theta=10000.0,
        tied_embeddings=False,
        head=head,
    )
