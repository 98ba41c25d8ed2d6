"""HF checkpoints: load into any layout, save back bit-identical, transformers reads our export."""

from __future__ import annotations

import pytest
import torch

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.forward import forward_logits, position_ids
from lightning_real.models.hf import (
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
