"""HF checkpoints: load into any layout, save back bit-identical, transformers reads our export."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.forward import forward_logits, position_ids
from lightning_real.models.hf import (
    CheckpointError,
    gather_canonical,
    load_hf,
    read_canonical,
    save_hf,
    save_tiny_hf,
)
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import tiny_spec

# fp32 logits, different summation order between megatron and transformers
ATOL = 1e-4


def _roundtrip(rank: int, world: int, src: str, out: str, head: str, family: str):
    lay = Layout.parse("d1t2p2").resolve(world)
    shard = load_hf(src, GroupRegistry().for_layout(lay), head=head)
    gathered = gather_canonical(shard)
    save_hf(shard, out)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    pad = torch.ones_like(ids)
    logits = forward_logits(shard, ids, pad) if head == "lm" else None
    return gathered, logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_load_save_roundtrip_under_tp2_pp2(tmp_path, family):
    import transformers

    spec = tiny_spec(family)
    src = save_tiny_hf(spec, tmp_path / "src", seed=5)
    results = spawn(_roundtrip, 4, str(src), str(tmp_path / "out"), "lm", family)
    canonical = random_canonical(spec, 5)
    gathered = results[0][0]
    assert set(gathered) == set(canonical)
    for k, v in canonical.items():
        assert torch.equal(gathered[k], v), k  # loading into tp2pp2 loses nothing
    back = read_canonical(tmp_path / "out", spec)
    for k, v in canonical.items():
        assert torch.equal(back[k], v), k  # and saving from it gives the same bytes
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=position_ids(torch.ones_like(ids))).logits
    for _, logits in results:
        assert (logits - ref).abs().max() < ATOL


def test_value_head_exports_as_sequence_classification(tmp_path):
    import transformers

    spec = tiny_spec("qwen2", "value")
    save_tiny_hf(spec, tmp_path / "rm", seed=2)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert model.config.num_labels == 1
    assert torch.equal(model.score.weight, random_canonical(spec, 2)["output_layer.weight"])
    results = spawn(_roundtrip, 4, str(tmp_path / "rm"), str(tmp_path / "rm2"), "value", "qwen2")
    back = read_canonical(tmp_path / "rm2", spec)
    assert all(torch.equal(back[k], v) for k, v in results[0][0].items())


def _single(rank: int, world: int, path: str):
    lay = Layout.parse("d1t1p1").resolve(world)
    return load_hf(path, GroupRegistry().for_layout(lay))


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    from lightning_real.models.hf import read_spec

    with pytest.raises(CheckpointError, match="does not exist"):
        read_spec(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        read_spec(tmp_path / "empty")
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="allowed: llama, qwen2, gpt2"):
        read_spec(bad)
    spec = tiny_spec("llama")
    good = save_tiny_hf(spec, tmp_path / "good")
    from safetensors.torch import load_file, save_file

    state = load_file(good / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, good / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"down_proj\.weight' is missing"):
        read_canonical(good, spec)
    state = load_file(save_tiny_hf(spec, tmp_path / "shape") / "model.safetensors")
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, tmp_path / "shape" / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"model\.norm\.weight"):
        spawn(_single, 1, str(tmp_path / "shape"))


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from lightning_real.models import hf

    spec = tiny_spec("llama")
    path = save_tiny_hf(spec, tmp_path / "ckpt", seed=1)
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "canonical_to_hf", boom)
    with pytest.raises(OSError):
        hf.write_hf(spec, random_canonical(spec, 2), path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
