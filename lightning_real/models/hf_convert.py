"""Tensor-level conversion between HF transformers state dicts and canonical megatron tensors.

Canonical tensors are described in :mod:`lightning_real.models.sharding`. Each canonical key is
made from one or more HF tensors; :func:`hf_names` lists them and :func:`to_canonical` /
:func:`from_canonical` convert one key at a time, so a loader can stream a checkpoint tensor
by tensor. The conversions are pure permutations (no arithmetic): a round trip is bit-exact.

Layout differences handled here:

* fused QKV: megatron interleaves per key/value group ``[q heads of group g, k_g, v_g]``; HF
  llama/qwen2 keep separate q/k/v projections and GPT-2 a fused ``[q; k; v]``;
* SwiGLU: megatron's fc1 is ``[gate; up]``;
* GPT-2 ``Conv1D`` stores weights transposed (``[in, out]``);
* value heads are the ``score`` vector of HF ``*ForSequenceClassification`` (``num_labels=1``).
"""

from __future__ import annotations

import torch

from lightning_real.models.sharding import WORD_EMBEDDINGS, canonical_keys, stage_param_specs
from lightning_real.models.spec import ModelSpec

# Prefix of the transformer trunk inside the HF model classes we read and write.
TRUNK_PREFIX = {"llama": "model.", "qwen2": "model.", "gpt2": "transformer."}

_LLAMA_LAYER = {
    "input_layernorm.weight": ["input_layernorm.weight"],
    "self_attention.linear_qkv.weight": [f"self_attn.{p}_proj.weight" for p in "qkv"],
    "self_attention.linear_qkv.bias": [f"self_attn.{p}_proj.bias" for p in "qkv"],
    "self_attention.linear_proj.weight": ["self_attn.o_proj.weight"],
    "pre_mlp_layernorm.weight": ["post_attention_layernorm.weight"],
    "mlp.linear_fc1.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.linear_fc2.weight": ["mlp.down_proj.weight"],
}
_GPT2_LAYER = {
    "input_layernorm.weight": ["ln_1.weight"],
    "input_layernorm.bias": ["ln_1.bias"],
    "self_attention.linear_qkv.weight": ["attn.c_attn.weight"],
    "self_attention.linear_qkv.bias": ["attn.c_attn.bias"],
    "self_attention.linear_proj.weight": ["attn.c_proj.weight"],
    "self_attention.linear_proj.bias": ["attn.c_proj.bias"],
    "pre_mlp_layernorm.weight": ["ln_2.weight"],
    "pre_mlp_layernorm.bias": ["ln_2.bias"],
    "mlp.linear_fc1.weight": ["mlp.c_fc.weight"],
    "mlp.linear_fc1.bias": ["mlp.c_fc.bias"],
    "mlp.linear_fc2.weight": ["mlp.c_proj.weight"],
    "mlp.linear_fc2.bias": ["mlp.c_proj.bias"],
}
# GPT-2 Conv1D weights, stored [in, out]: transposed relative to nn.Linear and megatron.
_GPT2_TRANSPOSED = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


def _split_layer_key(key: str) -> tuple[int, str] | None:
    """``decoder.layers.7.mlp.linear_fc2.weight`` -> ``(7, 'mlp.linear_fc2.weight')``."""
    if not key.startswith("decoder.layers."):
        return None
    idx, _, rest = key[len("decoder.layers.") :].partition(".")
    return int(idx), rest


def hf_names(spec: ModelSpec, key: str, prefix: str | None = None) -> list[str]:
    """HF tensor names that make up canonical ``key``.

    ``prefix`` is the trunk prefix (``model.`` / ``transformer.``); checkpoints saved from the bare
    trunk class have none.
    """
    p = TRUNK_PREFIX[spec.family] if prefix is None else prefix
    gpt2 = spec.family == "gpt2"
    layer = _split_layer_key(key)
    if layer is not None:
        i, rest = layer
        table = _GPT2_LAYER if gpt2 else _LLAMA_LAYER
        stem = f"{p}h.{i}." if gpt2 else f"{p}layers.{i}."
        return [stem + n for n in table[rest]]
    if key == WORD_EMBEDDINGS:
        return [p + ("wte.weight" if gpt2 else "embed_tokens.weight")]
    if key == "embedding.position_embeddings.weight":
        return [p + "wpe.weight"]
    if key.startswith("decoder.final_layernorm."):
        return [p + ("ln_f." if gpt2 else "norm.") + key.rsplit(".", 1)[1]]
    if key == "output_layer.weight":
        return ["score.weight" if spec.head == "value" else "lm_head.weight"]
    raise KeyError(f"no HF name known for canonical tensor {key!r}")


def all_hf_names(spec: ModelSpec, prefix: str | None = None) -> dict[str, list[str]]:
    """Every canonical key of ``spec`` with its HF tensor names."""
    return {k: hf_names(spec, k, prefix) for k in canonical_keys(spec)}


def _qkv_split(spec: ModelSpec) -> tuple[int, int, int]:
    """Rows of q, k and v inside one key/value group of megatron's fused QKV."""
    d, rep = spec.head_dim, spec.num_heads // spec.num_kv_heads
    return rep * d, d, d


def _qkv_to_canonical(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    g = spec.num_kv_heads
    tail = q.shape[1:]
    parts = [t.reshape(g, -1, *tail) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def _qkv_from_canonical(spec: ModelSpec, qkv: torch.Tensor) -> list[torch.Tensor]:
    g = spec.num_kv_heads
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, -1, *tail)
    return [t.reshape(-1, *tail) for t in grouped.split(list(_qkv_split(spec)), dim=1)]


def to_canonical(spec: ModelSpec, key: str, hf: list[torch.Tensor]) -> torch.Tensor:
    """Canonical tensor ``key`` from its HF tensors (in :func:`hf_names` order)."""
    rest = key.split(".", 3)[-1] if key.startswith("decoder.layers.") else key
    if spec.family == "gpt2":
        (t,) = hf
        if rest.endswith(_GPT2_TRANSPOSED):
            t = t.t()
        if rest.startswith("self_attention.linear_qkv."):
            return _qkv_to_canonical(spec, *t.chunk(3, dim=0)).contiguous()
        return t.contiguous()
    if rest.startswith("self_attention.linear_qkv."):
        return _qkv_to_canonical(spec, *hf).contiguous()
    if rest == "mlp.linear_fc1.weight":
        return torch.cat(hf, dim=0)
    (t,) = hf
    return t.contiguous()


def from_canonical(spec: ModelSpec, key: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    """HF tensors (in :func:`hf_names` order) of canonical tensor ``key``; contiguous, for saving."""
    rest = key.split(".", 3)[-1] if key.startswith("decoder.layers.") else key
    if spec.family == "gpt2":
        t = tensor
        if rest.startswith("self_attention.linear_qkv."):
            t = torch.cat(_qkv_from_canonical(spec, t), dim=0)
        if rest.endswith(_GPT2_TRANSPOSED):
            t = t.t()
        return [t.contiguous()]
    if rest.startswith("self_attention.linear_qkv."):
        return [t.contiguous() for t in _qkv_from_canonical(spec, tensor)]
    if rest == "mlp.linear_fc1.weight":
        return [t.contiguous() for t in tensor.chunk(2, dim=0)]
    return [tensor.contiguous()]


def hf_to_canonical(
    spec: ModelSpec, state: dict[str, torch.Tensor], prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """A whole HF state dict as canonical tensors."""
    return {
        k: to_canonical(spec, k, [state[n] for n in names]) for k, names in all_hf_names(spec, prefix).items()
    }


def canonical_to_hf(spec: ModelSpec, canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors (all of a model, or one stage's) as HF tensors.

    A tied LM head is no canonical key, and HF does not save it either.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in canonical.items():
        out.update(zip(hf_names(spec, key), from_canonical(spec, key, t), strict=True))
    return out


def expected_hf_shapes(spec: ModelSpec, prefix: str | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor a checkpoint of ``spec`` must hold (computed on meta tensors)."""
    shapes = {ps.key: ps.canonical_shape for ps in stage_param_specs(spec, 1, 0)}
    out: dict[str, tuple[int, ...]] = {}
    for key, names in all_hf_names(spec, prefix).items():
        meta = torch.empty(shapes[key], device="meta")
        for n, t in zip(names, from_canonical(spec, key, meta), strict=True):
            out[n] = tuple(t.shape)
    return out
