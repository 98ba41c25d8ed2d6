"""Model architecture description shared by the backend, the HF converters and the planner."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from lightning_real.layout import Layout, LayoutError

Family = Literal["llama", "qwen2", "gpt2"]
FAMILIES: tuple[str, ...] = ("llama", "qwen2", "gpt2")
HEADS: tuple[str, ...] = ("lm", "value")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, independent of any parallel layout."""

    family: Family
    """HF model family: 'llama' (RMSNorm, SwiGLU, RoPE, GQA), 'qwen2' (llama + qkv bias), 'gpt2'
    (LayerNorm, GELU-tanh, learned positions, tied embeddings, biases everywhere)."""
    vocab_size: int
    """Vocabulary size: token ids, and rows of the HF embedding and output matrices."""
    hidden_size: int
    """Model width."""
    num_layers: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention (query) heads."""
    num_kv_heads: int
    """Key/value heads; fewer than num_heads means grouped-query attention."""
    ffn_hidden_size: int
    """MLP inner width (per gate for SwiGLU)."""
    max_position_embeddings: int = 2048
    """Longest sequence (size of learned position table; RoPE cache length)."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm / LayerNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency (unused for learned positions)."""
    tied_embeddings: bool = False
    """Output projection shares the input embedding matrix."""
    head: Literal["lm", "value"] = "lm"
    """'lm' predicts next-token logits (actor, reference); 'value' a scalar per token (critic, reward)."""
    pad_vocab_to_multiple_of: int = 1
    """Each layout builds the vocabulary padded to a multiple of this times its tp (megatron's
    ``make_vocab_size_divisible_by``); the padding rows are zero and their logits -inf."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"ModelSpec.family={self.family!r}; allowed: {', '.join(FAMILIES)}")
        if self.head not in HEADS:
            raise ValueError(f"ModelSpec.head={self.head!r}; allowed: {', '.join(HEADS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelSpec: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if not isinstance(self.pad_vocab_to_multiple_of, int) or self.pad_vocab_to_multiple_of < 1:
            raise ValueError(
                f"ModelSpec.pad_vocab_to_multiple_of={self.pad_vocab_to_multiple_of!r}; allowed: an integer >= 1"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelSpec: num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )

    # ---- derived ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU (two input projections) rather than a plain GELU MLP."""
        return self.family != "gpt2"

    @property
    def has_bias(self) -> bool:
        """Linear layers carry biases everywhere (GPT-2)."""
        return self.family == "gpt2"

    @property
    def qkv_bias(self) -> bool:
        """Query/key/value projections carry a bias (Qwen2, GPT-2)."""
        return self.family in ("qwen2", "gpt2")

    @property
    def learned_positions(self) -> bool:
        """Absolute learned position embeddings rather than RoPE."""
        return self.family == "gpt2"

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Rows of the embedding and output matrices built for tensor-parallel degree ``tp``.

        Tensor parallelism splits the vocabulary into ``tp`` equal slices, so it is rounded up to
        a multiple of ``pad_vocab_to_multiple_of * tp`` (GPT-2's 50257 is odd).
        """
        m = self.pad_vocab_to_multiple_of * tp
        return -(-self.vocab_size // m) * m

    def vocab_range(self, tp: int, tp_rank: int) -> tuple[int, int]:
        """Token ids ``[lo, hi)`` held by tensor-parallel rank ``tp_rank``; the rest of its slice
        is padding (a rank may hold padding only when the multiple exceeds the vocabulary)."""
        rows = self.padded_vocab_size(tp) // tp
        lo = min(tp_rank * rows, self.vocab_size)
        return lo, min(lo + rows, self.vocab_size)

    def with_head(self, head: Literal["lm", "value"]) -> ModelSpec:
        """Same trunk with another head; value heads never tie embeddings."""
        return replace(self, head=head, tied_embeddings=self.tied_embeddings and head == "lm")

    def num_params(self) -> int:
        """Parameter count (embeddings included), as the HF model of this spec has."""
        h, f, v, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        kv = self.num_kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h
        if self.qkv_bias:
            attn += h + 2 * kv
        if self.has_bias:
            attn += h
        mlp = (3 if self.gated_mlp else 2) * h * f + ((f + h) if self.has_bias else 0)
        norms = 2 * h * (2 if self.has_bias else 1)
        per_layer = attn + mlp + norms
        emb = v * h + (self.max_position_embeddings * h if self.learned_positions else 0)
        final_norm = h * (2 if self.has_bias else 1)
        if self.head == "value":
            out = h  # score vector, no bias (HF *ForSequenceClassification)
        else:
            out = 0 if self.tied_embeddings else v * h
        return emb + L * per_layer + final_norm + out

    # ---- HF config bridge ------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any, head: Literal["lm", "value"] = "lm") -> ModelSpec:
        """Read a transformers config (LlamaConfig, Qwen2Config, GPT2Config)."""
        mt = getattr(config, "model_type", None)
        if mt in ("llama", "qwen2"):
            rope_theta = getattr(config, "rope_theta", None)
            if rope_theta is None:
                rp = getattr(config, "rope_parameters", None) or {}
                rope_theta = rp.get("rope_theta", 10000.0)
            return cls(
                family=mt,
                vocab_size=config.vocab_size,
                hidden_size=config.hidden_size,
                num_layers=config.num_hidden_layers,
                num_heads=config.num_attention_heads,
                num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                ffn_hidden_size=config.intermediate_size,
                max_position_embeddings=config.max_position_embeddings,
                norm_eps=config.rms_norm_eps,
                rope_theta=float(rope_theta),
                tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)) and head == "lm",
                head=head,
            )
        if mt == "gpt2":
            return cls(
                family="gpt2",
                vocab_size=config.vocab_size,
                hidden_size=config.n_embd,
                num_layers=config.n_layer,
                num_heads=config.n_head,
                num_kv_heads=config.n_head,
                ffn_hidden_size=config.n_inner or 4 * config.n_embd,
                max_position_embeddings=config.n_positions,
                norm_eps=config.layer_norm_epsilon,
                tied_embeddings=head == "lm",
                head=head,
            )
        raise ValueError(f"unsupported HF model_type={mt!r}; allowed: llama, qwen2, gpt2")

    def to_hf_config(self) -> Any:
        """A transformers config for this spec (for export and for the numerical oracle)."""
        import transformers

        if self.family in ("llama", "qwen2"):
            cfg_cls = transformers.LlamaConfig if self.family == "llama" else transformers.Qwen2Config
            kwargs: dict[str, Any] = dict(
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                num_key_value_heads=self.num_kv_heads,
                intermediate_size=self.ffn_hidden_size,
                max_position_embeddings=self.max_position_embeddings,
                rms_norm_eps=self.norm_eps,
                rope_theta=self.rope_theta,
                tie_word_embeddings=self.tied_embeddings,
                hidden_act="silu",
            )
            if self.family == "llama":
                kwargs.update(attention_bias=False, mlp_bias=False)
            cfg: Any = cfg_cls(**kwargs)
        else:
            cfg = transformers.GPT2Config(
                vocab_size=self.vocab_size,
                n_embd=self.hidden_size,
                n_layer=self.num_layers,
                n_head=self.num_heads,
                n_inner=self.ffn_hidden_size,
                n_positions=self.max_position_embeddings,
                layer_norm_epsilon=self.norm_eps,
                activation_function="gelu_new",
                tie_word_embeddings=True,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=None,
                eos_token_id=None,
            )
        if self.head == "value":
            cfg.num_labels = 1
        return cfg


def check_layout(spec: ModelSpec, layout: Layout) -> Layout:
    """``layout`` if it can split ``spec`` (heads and key/value heads over tp, layers over pp),
    else a LayoutError naming the layout and what does not divide."""
    if spec.num_heads % layout.tp:
        raise LayoutError(
            f"layout {layout}: {spec.num_heads} attention heads are not divisible by tp={layout.tp}"
        )
    if spec.num_kv_heads % layout.tp:
        raise LayoutError(
            f"layout {layout}: {spec.num_kv_heads} key/value heads are not divisible by tp={layout.tp}"
        )
    if spec.num_layers < layout.pp:
        raise LayoutError(
            f"layout {layout}: {spec.num_layers} layers are fewer than pp={layout.pp} pipeline stages"
        )
    return layout


def tiny_spec(family: Family = "llama", head: Literal["lm", "value"] = "lm", **overrides: Any) -> ModelSpec:
    """A small spec for tests and CPU demos (GQA for llama/qwen2 so tp=2 splits kv heads)."""
    base: dict[str, Any] = dict(
        family=family,
        vocab_size=256 + 16,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2 if family != "gpt2" else 4,
        ffn_hidden_size=128 if family != "gpt2" else 256,
        max_position_embeddings=256,
        norm_eps=1e-5,
        rope_theta=10000.0,
        tied_embeddings=family == "gpt2",
        head=head,
    )
    base.update(overrides)
    if head == "value":
        base["tied_embeddings"] = False
    return ModelSpec(**base)
