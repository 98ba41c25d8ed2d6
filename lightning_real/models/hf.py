"""HF checkpoints in and out: transformers' safetensors folders <-> canonical tensors <-> shards.

* :func:`load_hf` builds a :class:`ModelShard` on a layout; each pipeline stage reads only the
  HF tensors of its own layers (single-file or sharded ``model.safetensors.index.json``);
* :func:`save_hf` writes a sharded model back: tensor-parallel slices are gathered per stage and
  each stage writes its own file; transformers' ``from_pretrained`` loads the folder;
* :func:`save_tiny_hf` writes a small random checkpoint with transformers (tests, demos).

Checkpoints always hold the HF vocabulary: a layout whose tp does not divide it (or a spec with
``pad_vocab_to_multiple_of``) pads the embedding and LM head with zero rows on import, and
the padding is dropped again when tensors are gathered for export.

Tensor-level conversion lives in :mod:`lightning_real.models.hf_convert`. LM heads map to
``*ForCausalLM`` / ``GPT2LMHeadModel``; value heads (critic, reward) to the family's
``*ForSequenceClassification`` (``score.weight``, one label), applied per token.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from lightning_real.checkpoint.folders import CheckpointError, swap_in, temp_folder
from lightning_real.distributed.groups import LayoutGroups
from lightning_real.models.build import BuildOptions
from lightning_real.models.hf_convert import (
    TRUNK_PREFIX,
    canonical_to_hf,
    expected_hf_shapes,
    hf_names,
    to_canonical,
)
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import WORD_EMBEDDINGS, canonical_keys
from lightning_real.models.spec import FAMILIES, ModelSpec

__all__ = [
    "CheckpointError",
    "HFCheckpoint",
    "canonical_to_hf",
    "gather_canonical",
    "hf_model",
    "hf_names",
    "load_hf",
    "read_canonical",
    "read_spec",
    "save_hf",
    "save_tiny_hf",
    "write_hf",
]

SUPPORTED = FAMILIES
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
VALUE_HEAD = "output_layer.weight"
Head = Literal["lm", "value"]


def architecture(spec: ModelSpec) -> str:
    """transformers class name that holds ``spec`` (config.json ``architectures``)."""
    base = {"llama": "Llama", "qwen2": "Qwen2", "gpt2": "GPT2"}[spec.family]
    if spec.head == "value":
        return f"{base}ForSequenceClassification"
    return "GPT2LMHeadModel" if spec.family == "gpt2" else f"{base}ForCausalLM"


# ---- reading ------------------------------------------------------------------------------------
def read_spec(path: str | Path, head: Head = "lm") -> ModelSpec:
    """The ModelSpec of an HF checkpoint folder (clear errors for missing or unsupported ones)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {path}: config.json is missing")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON ({e})") from e
    if model_type not in SUPPORTED:
        raise CheckpointError(
            f"checkpoint {path}: model_type {model_type!r} is not supported; allowed: {', '.join(SUPPORTED)}"
        )
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    return ModelSpec.from_hf_config(cfg, head=head)


def _weight_map(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"checkpoint {path}: {INDEX_FILE} has no 'weight_map'")
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(f"checkpoint {path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors is read)")


@dataclass(frozen=True)
class HFCheckpoint:
    """An HF checkpoint folder checked against a spec; reads canonical tensors by key."""

    path: Path
    """The checkpoint folder."""
    spec: ModelSpec
    """The model it holds (with the head it is read as)."""
    prefix: str
    """Trunk prefix of its tensor names: 'model.', 'transformer.', or '' for a bare trunk."""
    files: dict[str, Path]
    """HF tensor name -> safetensors file."""
    zero_value_head: bool
    """It has no value head; the head is read as zeros (``init_value_head``)."""

    @classmethod
    def open(cls, path: str | Path, spec: ModelSpec, init_value_head: bool = False) -> HFCheckpoint:
        """Check that every tensor ``spec`` needs is present with its shape (file headers only).

        The whole model is checked, not one stage, so every rank of a layout fails alike.
        ``init_value_head``: a value-head ``spec`` may be read from a checkpoint without
        ``score.weight`` (a causal LM, e.g. a critic started from the actor); the head is zero.
        """
        from safetensors import safe_open

        path = Path(path)
        files = _weight_map(path)
        prefix = next(
            (p for p in (TRUNK_PREFIX[spec.family], "") if hf_names(spec, WORD_EMBEDDINGS, p)[0] in files),
            TRUNK_PREFIX[spec.family],
        )
        expected = expected_hf_shapes(spec, prefix)
        zero_head = spec.head == "value" and init_value_head and "score.weight" not in files
        if zero_head:
            expected.pop("score.weight")
        by_file: dict[Path, list[str]] = {}
        for name in expected:
            if name not in files:
                hint = ""
                if name == "score.weight":
                    hint = (
                        " (a causal-LM checkpoint has no value head; init_value_head=True starts one at zero)"
                    )
                raise CheckpointError(f"checkpoint {path}: tensor {name!r} is missing{hint}")
            by_file.setdefault(files[name], []).append(name)
        for file, names in by_file.items():
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path}: weight file {file.name} is missing")
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(
                            f"checkpoint {path}: tensor {name!r} has shape {shape}, "
                            f"expected {expected[name]} from config.json"
                        )
        return cls(path, spec, prefix, files, zero_head)

    def read(self, keys: list[str], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, canonical tensor)`` for each key, one at a time; each file is opened once."""
        from safetensors import safe_open

        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for key in keys:
                if key == VALUE_HEAD and self.zero_value_head:
                    yield key, torch.zeros(1, self.spec.hidden_size, dtype=dtype or torch.float32)
                    continue
                parts = []
                for name in hf_names(self.spec, key, self.prefix):
                    file = self.files[name]
                    if file not in handles:
                        handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                    parts.append(handles[file].get_tensor(name))
                t = to_canonical(self.spec, key, parts)
                yield key, t if dtype is None else t.to(dtype)


def read_canonical(
    path: str | Path, spec: ModelSpec, keys: list[str] | None = None, init_value_head: bool = False
) -> dict[str, torch.Tensor]:
    """Canonical tensors of ``keys`` (default: all) read from an HF checkpoint folder."""
    ckpt = HFCheckpoint.open(path, spec, init_value_head)
    wanted = list(dict.fromkeys(keys if keys is not None else canonical_keys(spec)))
    return dict(ckpt.read(wanted))


@torch.no_grad()
def load_hf(
    path: str | Path,
    groups: LayoutGroups,
    head: Head = "lm",
    options: BuildOptions | None = None,
    init_value_head: bool = False,
    pad_vocab_to_multiple_of: int = 1,
) -> ModelShard:
    """Build this rank's shard of the checkpoint at ``path`` under ``groups.layout``.

    Every rank of the layout calls it (model construction is collective); each reads only the
    tensors of its own pipeline stage, one at a time. Ranks outside the layout get an empty
    shard. ``init_value_head``: see :meth:`HFCheckpoint.open`. ``pad_vocab_to_multiple_of``:
    see :class:`ModelSpec`; the checkpoint's vocabulary rows are padded with zeros.
    """
    spec = replace(read_spec(path, head), pad_vocab_to_multiple_of=pad_vocab_to_multiple_of)
    ckpt = HFCheckpoint.open(path, spec, init_value_head)
    opts = options or BuildOptions()
    shard = ModelShard.build(spec, groups, options=opts)
    if shard.module is None:
        return shard
    by_key: dict[str, list[Any]] = {}
    for ps, p in shard.params():
        by_key.setdefault(ps.key, []).append((ps, p))
    tp, tp_rank = shard.layout.tp, groups.tp_rank
    for key, tensor in ckpt.read(list(by_key), opts.dtype):
        for ps, p in by_key[key]:
            p.copy_(ps.to_local(tensor, tp_rank, tp))
    return shard


# ---- gathering ----------------------------------------------------------------------------------
def _gather_stage(shard: ModelShard) -> dict[str, torch.Tensor] | None:
    """Canonical tensors of this rank's stage on the stage's tp rank 0 (None on other tp ranks).

    Collective over the rank's tensor-parallel group.
    """
    g, lay = shard.groups, shard.layout
    lead = lay.rank_at(g.dp_rank, 0, g.pp_rank)
    out: dict[str, torch.Tensor] = {}
    for ps, p in shard.params():
        local = p.detach().contiguous()
        if ps.tp_dim is None or lay.tp == 1:
            parts: list[torch.Tensor] | None = [local]
        else:
            parts = [torch.empty_like(local) for _ in range(lay.tp)] if g.tp_rank == 0 else None
            dist.gather(local, parts, dst=lead, group=g.tp)
        if parts is not None and ps.key not in out:
            out[ps.key] = ps.from_locals([t.cpu() for t in parts])
    return out if g.tp_rank == 0 else None


def gather_canonical(shard: ModelShard) -> dict[str, torch.Tensor] | None:
    """All canonical tensors of the model, on the layout's first rank (None elsewhere).

    Collective over the layout's ranks: tensor-parallel slices are gathered within each stage of
    dp replica 0, whose stage leaders then send their stages to the first rank.
    """
    if not shard.member:
        return None
    g = shard.groups
    if g.dp_rank != 0:
        return None
    stage = _gather_stage(shard)
    if g.tp_rank != 0:
        return None
    gathered: list[Any] = [None] * shard.layout.pp
    # The pipeline group of dp 0, tp 0 holds exactly the stage leaders and the first rank.
    dist.all_gather_object(gathered, stage, group=g.pp)
    if g.rank != shard.layout.rank_at(0, 0, 0):
        return None
    out: dict[str, torch.Tensor] = {}
    for part in gathered:
        for k, v in part.items():
            out.setdefault(k, v)
    return out


# ---- writing ------------------------------------------------------------------------------------
def _write_config(spec: ModelSpec, folder: Path, dtype: torch.dtype) -> None:
    cfg = spec.to_hf_config()
    cfg.architectures = [architecture(spec)]
    cfg.dtype = dtype
    cfg.save_pretrained(folder)


def _save_tensors(spec: ModelSpec, tensors: dict[str, torch.Tensor], file: Path) -> dict[str, int]:
    """Write canonical ``tensors`` as HF tensors to one safetensors file; name -> bytes."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in canonical_to_hf(spec, tensors).items()}
    save_file(state, str(file), metadata={"format": "pt"})
    return {k: v.numel() * v.element_size() for k, v in state.items()}


def write_hf(spec: ModelSpec, tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write canonical tensors as an HF checkpoint folder, atomically (a failed write keeps the old one)."""
    path = Path(path)
    tmp = temp_folder(path)
    try:
        _save_tensors(spec, tensors, tmp / SINGLE_FILE)
        _write_config(spec, tmp, next(iter(tensors.values())).dtype)
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _stage_file(stage: int, pp: int) -> str:
    return SINGLE_FILE if pp == 1 else f"model-{stage + 1:05d}-of-{pp:05d}.safetensors"


def _finish(
    spec: ModelSpec,
    tmp: Path,
    path: Path,
    written: dict[str, tuple[str, int]],
    pp: int,
    dtype: torch.dtype,
    copy_files_from: Path | None,
) -> None:
    """Add the index, config and side files to ``tmp``, then swap it in for ``path``."""
    if pp > 1:
        index = {
            "metadata": {"total_size": sum(n for _, n in written.values())},
            "weight_map": {name: file for name, (file, _) in sorted(written.items())},
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    _write_config(spec, tmp, dtype)
    if copy_files_from is not None:
        # Tokenizer and generation config travel with the weights; weights and config do not.
        skip = {"config.json", INDEX_FILE}
        for f in sorted(copy_files_from.iterdir()):
            if f.is_file() and f.name not in skip and not f.name.endswith((".safetensors", ".bin")):
                shutil.copy2(f, tmp / f.name)
    swap_in(tmp, path)


def save_hf(shard: ModelShard, path: str | Path, copy_files_from: str | Path | None = None) -> Path | None:
    """Write the sharded model as an HF checkpoint folder; every rank of the layout calls it.

    dp replica 0 writes: each stage gathers its tensor-parallel slices on its tp rank 0, which
    writes the stage's file (``model-0000k-of-0000n.safetensors`` plus an index when pp > 1)
    into a temporary folder beside ``path``; the layout's first rank adds config.json (and the
    non-weight files of ``copy_files_from``, e.g. a tokenizer) and swaps the folder in. Stage
    writers must share a filesystem. A failure raises :class:`CheckpointError` on every rank
    and leaves an existing ``path`` untouched. Returns ``path`` (None outside the layout).
    """
    if not shard.member:
        return None
    g, lay, spec = shard.groups, shard.layout, shard.spec
    path = Path(path).absolute()
    first = lay.rank_at(0, 0, 0)
    box: list[Any] = [None]
    if g.rank == first:
        try:
            box = [str(temp_folder(path))]
        except OSError as e:
            box = [OSError(f"cannot create a folder beside {path}: {e}")]
    dist.broadcast_object_list(box, src=first, group=g.all)
    if isinstance(box[0], Exception):
        raise CheckpointError(f"save_hf to {path} failed: {box[0]}")
    tmp = Path(box[0])

    status: tuple[str, Any] = ("ok", {})
    stage = _gather_stage(shard) if g.dp_rank == 0 else None
    if stage is not None:
        if g.pp_rank > 0:
            # A tied LM head on the last stage is a copy of the first stage's embedding.
            stage.pop(WORD_EMBEDDINGS, None)
        name = _stage_file(g.pp_rank, lay.pp)
        try:
            sizes = _save_tensors(spec, stage, tmp / name)
            status = ("ok", {k: (name, n) for k, n in sizes.items()})
        except Exception as e:  # reported to every rank below
            status = ("error", f"rank {g.rank}: {type(e).__name__}: {e}")
    statuses: list[Any] = [None] * lay.size
    dist.all_gather_object(statuses, status, group=g.all)

    errors = [s[1] for s in statuses if s[0] == "error"]
    verdict: list[Any] = [errors]
    if g.rank == first:
        if not errors:
            written: dict[str, tuple[str, int]] = {}
            for s in statuses:
                written.update(s[1])
            dtype = next(p for _, p in shard.params()).dtype
            src = Path(copy_files_from) if copy_files_from is not None else None
            try:
                _finish(spec, tmp, path, written, lay.pp, dtype, src)
            except Exception as e:
                errors.append(f"rank {g.rank}: {type(e).__name__}: {e}")
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
        verdict = [errors]
    dist.broadcast_object_list(verdict, src=first, group=g.all)
    if verdict[0]:
        raise CheckpointError(f"save_hf to {path} failed, nothing was replaced: {'; '.join(verdict[0])}")
    return path


# ---- transformers models ------------------------------------------------------------------------
def hf_model(spec: ModelSpec, tensors: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A transformers model of ``spec`` (fp32, eval mode), loaded with canonical ``tensors`` if given."""
    import transformers

    cls = getattr(transformers, architecture(spec))
    model: Any = cls(spec.to_hf_config()).eval()
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
    result: torch.nn.Module = model
    return result


def save_tiny_hf(spec: ModelSpec, path: str | Path, seed: int = 0) -> Path:
    """A random HF checkpoint of ``spec``, written by transformers' ``save_pretrained``.

    Its weights are ``random_canonical(spec, seed)``: every tensor random, norms and biases
    included, so a mis-mapped tensor shows in the outputs.
    """
    from lightning_real.models.sharding import random_canonical

    path = Path(path)
    model: Any = hf_model(spec, random_canonical(spec, seed))  # a transformers PreTrainedModel
    tmp = temp_folder(path)
    try:
        model.save_pretrained(tmp)
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
