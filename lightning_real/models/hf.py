"""HF checkpoints in and out: transformers' safetensors format <-> canonical tensors <-> shards.

Conversions are per canonical key (see ``models/sharding.py``), so a pipeline stage reads only
the HF tensors of its own layers. Critic and reward models use the family's
``*ForSequenceClassification`` layout (``score.weight``, one label) with a per-token value head.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.distributed.groups import LayoutGroups
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import canonical_keys, load_canonical_, stage_param_specs
from lightning_real.models.spec import ModelSpec

SUPPORTED = ("llama", "qwen2", "gpt2")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the folder and what is wrong."""


# ---- per-key conversion -------------------------------------------------------------------------
def _prefix(spec: ModelSpec) -> str:
    return "transformer." if spec.family == "gpt2" else "model."


def _hf_layer(spec: ModelSpec, i: int) -> str:
    return f"transformer.h.{i}." if spec.family == "gpt2" else f"model.layers.{i}."


def _qkv_to_canonical(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[q; k; v] (HF) -> megatron's per-kv-group interleave ``[q heads of group, k, v]``."""
    g, hd = spec.num_kv_heads, spec.head_dim
    qpg = spec.num_heads // g
    tail = q.shape[1:]
    parts = [q.reshape(g, qpg * hd, *tail), k.reshape(g, hd, *tail), v.reshape(g, hd, *tail)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def _qkv_from_canonical(spec: ModelSpec, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, hd = spec.num_kv_heads, spec.head_dim
    qpg = spec.num_heads // g
    tail = t.shape[1:]
    x = t.reshape(g, (qpg + 2) * hd, *tail)
    q, k, v = x.split([qpg * hd, hd, hd], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


Reader = Callable[[str], torch.Tensor]


def _sub(key: str) -> tuple[int | None, str]:
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
    return (int(m.group(1)), m.group(2)) if m else (None, key)


def hf_names(spec: ModelSpec, key: str) -> list[str]:
    """HF tensor names that canonical ``key`` is made from."""
    return list(_to_canonical(spec, key, None))


def _to_canonical(spec: ModelSpec, key: str, read: Reader | None) -> dict[str, torch.Tensor] | list[str]:
    """With ``read=None``: the HF names ``key`` needs; else ``{key: canonical tensor}``."""
    layer, sub = _sub(key)
    gpt2 = spec.family == "gpt2"
    names: list[str]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] = lambda ts: ts[0]  # noqa: E731
    if layer is None:
        if key == "embedding.word_embeddings.weight":
            names = ["transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"]
        elif key == "embedding.position_embeddings.weight":
            names = ["transformer.wpe.weight"]
        elif key.startswith("decoder.final_layernorm."):
            names = [("transformer.ln_f." if gpt2 else "model.norm.") + key.rsplit(".", 1)[1]]
        elif key == "output_layer.weight":
            names = ["score.weight" if spec.head == "value" else "lm_head.weight"]
        else:
            raise KeyError(f"no HF mapping for {key}")
    else:
        p = _hf_layer(spec, layer)
        if gpt2:
            conv_t = lambda ts: ts[0].t().contiguous()  # noqa: E731  (Conv1D stores [in, out])
            table: dict[str, tuple[str, Callable[[list[torch.Tensor]], torch.Tensor]]] = {
                "input_layernorm.weight": ("ln_1.weight", combine),
                "input_layernorm.bias": ("ln_1.bias", combine),
                "pre_mlp_layernorm.weight": ("ln_2.weight", combine),
                "pre_mlp_layernorm.bias": ("ln_2.bias", combine),
                "self_attention.linear_qkv.weight": (
                    "attn.c_attn.weight",
                    lambda ts: _qkv_to_canonical(spec, *ts[0].t().chunk(3, dim=0)),
                ),
                "self_attention.linear_qkv.bias": (
                    "attn.c_attn.bias",
                    lambda ts: _qkv_to_canonical(spec, *ts[0].chunk(3, dim=0)),
                ),
                "self_attention.linear_proj.weight": ("attn.c_proj.weight", conv_t),
                "self_attention.linear_proj.bias": ("attn.c_proj.bias", combine),
                "mlp.linear_fc1.weight": ("mlp.c_fc.weight", conv_t),
                "mlp.linear_fc1.bias": ("mlp.c_fc.bias", combine),
                "mlp.linear_fc2.weight": ("mlp.c_proj.weight", conv_t),
                "mlp.linear_fc2.bias": ("mlp.c_proj.bias", combine),
            }
            hf, combine = table[sub]
            names = [p + hf]
        else:
            a = p + "self_attn."
            if sub in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                s = sub.rsplit(".", 1)[1]
                names = [f"{a}q_proj.{s}", f"{a}k_proj.{s}", f"{a}v_proj.{s}"]
                combine = lambda ts: _qkv_to_canonical(spec, *ts)  # noqa: E731
            elif sub == "mlp.linear_fc1.weight":
                names = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
                combine = lambda ts: torch.cat(ts, 0)  # noqa: E731
            else:
                simple = {
                    "input_layernorm.weight": "input_layernorm.weight",
                    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
                    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
                    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
                }
                names = [p + simple[sub]]
    if read is None:
        return names
    return {key: combine([read(n) for n in names])}


def canonical_to_hf(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors -> an HF state dict (the inverse of the reader)."""
    out: dict[str, torch.Tensor] = {}
    gpt2 = spec.family == "gpt2"
    for key, t in tensors.items():
        names = hf_names(spec, key)
        layer, sub = _sub(key)
        if len(names) == 3:  # q, k, v
            for n, part in zip(names, _qkv_from_canonical(spec, t)):
                out[n] = part.contiguous()
        elif len(names) == 2:  # gate, up
            gate, up = t.chunk(2, dim=0)
            out[names[0]], out[names[1]] = gate.contiguous(), up.contiguous()
        elif gpt2 and sub == "self_attention.linear_qkv.weight":
            out[names[0]] = torch.cat(_qkv_from_canonical(spec, t), 0).t().contiguous()
        elif gpt2 and sub == "self_attention.linear_qkv.bias":
            out[names[0]] = torch.cat(_qkv_from_canonical(spec, t), 0).contiguous()
        elif gpt2 and layer is not None and sub.endswith(".weight") and "layernorm" not in sub:
            out[names[0]] = t.t().contiguous()
        else:
            out[names[0]] = t.contiguous()
    return out


# ---- files --------------------------------------------------------------------------------------
def _open_reader(path: Path) -> Reader:
    """A by-name tensor reader over single-file or sharded safetensors checkpoints."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    elif (path / "model.safetensors").exists():
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise CheckpointError(f"checkpoint {path}: no model.safetensors or model.safetensors.index.json")
    handles: dict[str, Any] = {}

    def read(name: str) -> torch.Tensor:
        # GPT-2 checkpoints saved without the "transformer." prefix are accepted too.
        file = weight_map.get(name)
        if file is None and name.startswith("transformer."):
            file, name = weight_map.get(name[len("transformer.") :]), name[len("transformer.") :]
        if file is None:
            raise CheckpointError(f"checkpoint {path}: tensor {name!r} is missing")
        if file not in handles:
            handles[file] = safe_open(str(path / file), framework="pt")
        return handles[file].get_tensor(name)

    return read


def read_spec(path: str | Path, head: str = "lm") -> ModelSpec:
    """The ModelSpec of an HF checkpoint folder (clear errors for missing or unsupported ones)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"checkpoint {path}: config.json is missing")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(
            f"checkpoint {path}: model_type {model_type!r} is not supported; allowed: {', '.join(SUPPORTED)}"
        )
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    return ModelSpec.from_hf_config(cfg, head=head)  # type: ignore[arg-type]


def read_canonical(
    path: str | Path, spec: ModelSpec, keys: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Canonical tensors of ``keys`` (default: all) read from an HF checkpoint folder."""
    read = _open_reader(Path(path))
    out: dict[str, torch.Tensor] = {}
    for key in keys if keys is not None else canonical_keys(spec):
        if key in out:
            continue
        t = _to_canonical(spec, key, read)
        assert isinstance(t, dict)
        out.update(t)
    return out


def load_hf(
    path: str | Path, groups: LayoutGroups, head: str = "lm", dtype: torch.dtype = torch.float32
) -> ModelShard:
    """Build this rank's shard of the checkpoint at ``path``; each stage reads only its tensors."""
    spec = read_spec(path, head)
    shard = ModelShard.build(spec, groups, dtype=dtype)
    if shard.module is None:
        return shard
    stage = groups.pp_rank
    keys = [ps.key for ps in stage_param_specs(spec, groups.layout.pp, stage)]
    tensors = read_canonical(path, spec, keys)
    for ps in stage_param_specs(spec, groups.layout.pp, stage):
        if tuple(tensors[ps.key].shape) != ps.canonical_shape:
            raise CheckpointError(
                f"checkpoint {path}: {hf_names(spec, ps.key)} gives {ps.key} shape "
                f"{tuple(tensors[ps.key].shape)}, expected {ps.canonical_shape}"
            )
    load_canonical_(shard.module, spec, shard.layout, groups.rank, tensors)
    return shard


def gather_canonical(shard: ModelShard) -> dict[str, torch.Tensor] | None:
    """All canonical tensors of the model, on the layout's first rank (None elsewhere).

    Collective over the layout's ranks: tensor-parallel slices are gathered within each stage,
    then dp replica 0 of every stage sends its stage to the first rank.
    """
    if not shard.member:
        return None
    g = shard.groups
    lay = shard.layout
    stage: dict[str, torch.Tensor] = {}
    for ps, p in shard.params():
        parts = [torch.empty_like(p.data) for _ in range(lay.tp)]
        dist.all_gather(parts, p.data.contiguous(), group=g.tp)
        if ps.key not in stage:
            stage[ps.key] = ps.from_locals([t.cpu() for t in parts])
    assert lay.ranks is not None
    first = lay.ranks[0]
    if g.dp_rank == 0 and g.tp_rank == 0:
        gathered: list[Any] = [None] * lay.pp
        # stage leaders -> first rank, over the pipeline group of dp=0, tp=0 (it contains it)
        dist.all_gather_object(gathered, stage, group=g.pp)
        if g.rank == first:
            out: dict[str, torch.Tensor] = {}
            for part in gathered:
                out.update(part)
            return out
    return None


def _atomic_dir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by ``tmp``; the old folder is removed only once the new one is in place."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_hf(spec: ModelSpec, tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write canonical tensors as an HF checkpoint folder, atomically (a failed write keeps the old one)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _atomic_dir(path)
    try:
        state = canonical_to_hf(spec, tensors)
        if spec.head == "lm" and spec.tied_embeddings:
            state.pop("lm_head.weight", None)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        cfg = spec.to_hf_config()
        cfg.architectures = [_architecture(spec)]
        cfg.save_pretrained(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _architecture(spec: ModelSpec) -> str:
    base = {"llama": "Llama", "qwen2": "Qwen2", "gpt2": "GPT2"}[spec.family]
    if spec.head == "value":
        return f"{base}ForSequenceClassification"
    return "GPT2LMHeadModel" if spec.family == "gpt2" else f"{base}ForCausalLM"


def save_hf(shard: ModelShard, path: str | Path) -> Path | None:
    """Collectively write the sharded model as an HF checkpoint (by the layout's first rank)."""
    tensors = gather_canonical(shard)
    if tensors is None:
        return None
    return write_hf(shard.spec, tensors, path)


def hf_model(spec: ModelSpec, tensors: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A transformers model of ``spec`` (fp32, eval mode), loaded with canonical ``tensors`` if given."""
    import transformers

    cfg = spec.to_hf_config()
    if spec.head == "value":
        cls = {
            "llama": transformers.LlamaForSequenceClassification,
            "qwen2": transformers.Qwen2ForSequenceClassification,
            "gpt2": transformers.GPT2ForSequenceClassification,
        }[spec.family]
    else:
        cls = {
            "llama": transformers.LlamaForCausalLM,
            "qwen2": transformers.Qwen2ForCausalLM,
            "gpt2": transformers.GPT2LMHeadModel,
        }[spec.family]
    model = cls(cfg).eval()
    if tensors is not None:
        state = canonical_to_hf(spec, tensors)
        missing, unexpected = model.load_state_dict(state, strict=False)
        real_missing = [m for m in missing if not (m == "lm_head.weight" and spec.tied_embeddings)]
        if real_missing or unexpected:
            raise CheckpointError(
                f"canonical -> HF mismatch: missing {real_missing}, unexpected {unexpected}"
            )
        if spec.tied_embeddings:
            model.tie_weights()
    return model


def save_tiny_hf(spec: ModelSpec, path: str | Path, seed: int = 0) -> Path:
    """A random HF checkpoint of ``spec`` (the same model ``random_canonical(spec, seed)`` gives)."""
    from lightning_real.models.sharding import random_canonical

    return write_hf(spec, random_canonical(spec, seed), path)
