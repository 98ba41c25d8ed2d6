"""HF checkpoints: tensor conversion, files written by transformers, per-stage export, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.forward import forward_logits, forward_values, position_ids
from lightning_real.models.hf import (
    CheckpointError,
    gather_canonical,
    hf_model,
    load_hf,
    read_canonical,
    read_spec,
    save_hf,
    save_tiny_hf,
)
from lightning_real.models.hf_convert import canonical_to_hf, hf_to_canonical
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import tiny_spec

CASES = [(f, h) for f in ("llama", "qwen2", "gpt2") for h in ("lm", "value")]
# fp32 logits from the same weights in transformers before and after our export: equal up to
# nothing but summation order (observed ~1e-6).
ATOL = 1e-5


def _ids() -> torch.Tensor:
    return torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))


def _auto(head: str):
    import transformers

    return (
        transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    )


# ---- tensor conversion ----------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "head"), CASES)
def test_conversion_round_trip_is_bit_exact(family, head):
    """Every tensor transformers itself initialises comes back unchanged through canonical form."""
    spec = tiny_spec(family, head)
    torch.manual_seed(0)
    state = _auto(head).from_config(spec.to_hf_config()).state_dict()
    back = canonical_to_hf(spec, hf_to_canonical(spec, state))
    assert set(state) - set(back) <= {"lm_head.weight"}  # a tied head is not stored
    for name, t in back.items():
        assert torch.equal(t, state[name]), name


def test_qkv_follows_megatrons_per_group_interleave():
    spec = tiny_spec("llama")  # 4 query heads, 2 key/value groups, head_dim 16
    d, h = spec.head_dim, spec.hidden_size
    q = torch.arange(4 * d).float()[:, None].expand(-1, h)
    k, v = 1000 + q[: 2 * d], 2000 + q[: 2 * d]
    state = {
        "model.layers.0.self_attn.q_proj.weight": q,
        "model.layers.0.self_attn.k_proj.weight": k,
        "model.layers.0.self_attn.v_proj.weight": v,
    }
    from lightning_real.models.hf_convert import to_canonical

    key = "decoder.layers.0.self_attention.linear_qkv.weight"
    qkv = to_canonical(spec, key, list(state.values()))[:, 0]
    # group g: its two query heads, then its key head, then its value head
    for g in range(2):
        rows = qkv[g * 4 * d : (g + 1) * 4 * d]
        assert torch.equal(rows[: 2 * d], q[g * 2 * d : (g + 1) * 2 * d, 0])
        assert torch.equal(rows[2 * d : 3 * d], k[g * d : (g + 1) * d, 0])
        assert torch.equal(rows[3 * d :], v[g * d : (g + 1) * d, 0])
    # GPT-2: c_attn is Conv1D [in, 3*out] with q | k | v columns, one group per head
    g2 = tiny_spec("gpt2")
    hd, h2 = g2.head_dim, g2.hidden_size
    c_attn = torch.arange(3 * g2.hidden_size).float()[None].expand(g2.hidden_size, -1)
    fused = to_canonical(g2, key, [c_attn])[:, 0]
    assert torch.equal(
        fused[: 3 * hd], torch.cat([c_attn[0, :hd], c_attn[0, h2 : h2 + hd], c_attn[0, 2 * h2 : 2 * h2 + hd]])
    )


# ---- checkpoints written by transformers ----------------------------------------------------------
@pytest.mark.parametrize(("family", "head"), [("llama", "lm"), ("gpt2", "value")])
def test_sharded_transformers_checkpoint_reads_back(tmp_path, family, head):
    spec = tiny_spec(family, head)
    model = hf_model(spec, random_canonical(spec, 4))
    model.save_pretrained(tmp_path / "c", max_shard_size="100KB")
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "c").glob("model-*.safetensors"))) > 1
    assert read_spec(tmp_path / "c", head) == spec
    back = read_canonical(tmp_path / "c", spec)
    for k, v in random_canonical(spec, 4).items():
        assert torch.equal(back[k], v), k


def test_bare_gpt2_trunk_checkpoint_reads_as_tied_lm(tmp_path):
    """Checkpoints saved from ``GPT2Model`` name tensors without the ``transformer.`` prefix."""
    spec = tiny_spec("gpt2")
    lm = hf_model(spec, random_canonical(spec, 6))
    lm.transformer.save_pretrained(tmp_path / "bare")
    assert "wte.weight" in json.dumps(_keys(tmp_path / "bare"))
    back = read_canonical(tmp_path / "bare", spec)
    for k, v in random_canonical(spec, 6).items():
        assert torch.equal(back[k], v), k


def _keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


# ---- bad checkpoints: one clear error each --------------------------------------------------------
def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint folder .*nope does not exist"):
        read_spec(tmp_path / "nope")


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        read_spec(tmp_path / "empty")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(
        CheckpointError, match="model_type 'bert' is not supported; allowed: llama, qwen2, gpt2"
    ):
        read_spec(tmp_path / "bert")


def _edit(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    fn(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    spec = tiny_spec("llama")
    path = save_tiny_hf(spec, tmp_path / "c")
    _edit(path, lambda s: s.pop("model.layers.3.mlp.down_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"tensor 'model\.layers\.3\.mlp\.down_proj\.weight' is missing"
    ):
        read_canonical(path, spec)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    spec = tiny_spec("qwen2")
    path = save_tiny_hf(spec, tmp_path / "c")
    _edit(path, lambda s: s.update({"model.layers.0.self_attn.k_proj.bias": torch.zeros(48)}))
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.0\.self_attn\.k_proj\.bias' has shape \(48,\), expected \(32,\)",
    ):
        read_canonical(path, spec)


def test_value_head_from_a_causal_lm_needs_consent(tmp_path):
    path = save_tiny_hf(tiny_spec("llama"), tmp_path / "actor", seed=1)
    critic = tiny_spec("llama", "value")
    with pytest.raises(CheckpointError, match=r"'score\.weight' is missing .*init_value_head=True"):
        read_canonical(path, critic)
    back = read_canonical(path, critic, init_value_head=True)
    assert torch.equal(back["output_layer.weight"], torch.zeros(1, critic.hidden_size))
    actor = random_canonical(tiny_spec("llama"), 1)
    assert torch.equal(
        back["decoder.layers.2.mlp.linear_fc1.weight"], actor["decoder.layers.2.mlp.linear_fc1.weight"]
    )


# ---- per-stage export on real process groups ------------------------------------------------------
def _export_world(rank: int, world: int, root: str) -> dict:
    root_p = Path(root)
    reg = GroupRegistry()
    pp2 = reg.for_layout(Layout.parse("d1t1p2"))
    tp2 = reg.for_layout(Layout.parse("d1t2p1"))
    out: dict = {}
    # gpt2 (tied embeddings: the last stage holds a copy) and a qwen2 value head, both pp=2
    for name, head in (("gpt2", "lm"), ("qwen2", "value")):
        shard = load_hf(root_p / f"{name}-src", pp2, head=head)
        out[f"{name}-gathered"] = gather_canonical(shard)
        out[f"{name}-saved"] = save_hf(shard, root_p / f"{name}-out", copy_files_from=root_p / f"{name}-src")
        if head == "lm":
            out[f"{name}-logits"] = forward_logits(shard, _ids(), torch.ones(2, 9, dtype=torch.long))
    # a failed save raises on every rank and keeps the last good checkpoint
    try:
        save_hf(shard, root_p / "qwen2-out", copy_files_from=root_p / "no-such-folder")
        out["failed"] = None
    except CheckpointError as e:
        out["failed"] = str(e)
    # a bad tensor of the last stage only: both stages refuse the checkpoint alike
    try:
        load_hf(root_p / "bad", pp2)
        out["bad"] = None
    except CheckpointError as e:
        out["bad"] = str(e)
    # a critic started from an LM checkpoint: zero value head, any layout
    critic = load_hf(root_p / "gpt2-src", tp2, head="value", init_value_head=True)
    out["critic"] = forward_values(critic, _ids(), torch.ones(2, 9, dtype=torch.long))
    return out


def test_per_stage_export_loads_in_transformers(tmp_path):
    import transformers

    specs = {"gpt2": tiny_spec("gpt2"), "qwen2": tiny_spec("qwen2", "value")}
    for name, spec in specs.items():
        save_tiny_hf(spec, tmp_path / f"{name}-src", seed=9)
        (tmp_path / f"{name}-src" / "tokenizer.json").write_text('{"stub": true}')
    bad = save_tiny_hf(tiny_spec("llama"), tmp_path / "bad")
    _edit(bad, lambda s: s.update({"model.norm.weight": torch.ones(3)}))

    results = spawn(_export_world, 2, str(tmp_path))

    for name, spec in specs.items():
        truth = random_canonical(spec, 9)
        gathered = results[0][f"{name}-gathered"]
        assert results[1][f"{name}-gathered"] is None
        assert set(gathered) == set(truth) and all(torch.equal(gathered[k], truth[k]) for k in truth)
        out = tmp_path / f"{name}-out"
        assert results[0][f"{name}-saved"] == results[1][f"{name}-saved"] == out.absolute()
        # one file per stage, an index naming every tensor, the side file copied
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert (out / "tokenizer.json").read_text() == '{"stub": true}'
        back = read_canonical(out, spec)
        assert all(torch.equal(back[k], truth[k]) for k in truth)  # bit-identical round trip
        model = _auto(spec.head).from_pretrained(out).eval()
        ref = hf_model(spec, truth)
        for (n, p), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
            assert n == n2 and torch.equal(p, p2), n
    gpt2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2-out").eval()
    ids = _ids()
    with torch.no_grad():
        ref = gpt2(input_ids=ids, position_ids=position_ids(torch.ones_like(ids))).logits
    for res in results:
        assert (res["gpt2-logits"] - ref).abs().max() < ATOL
    for res in results:
        assert "nothing was replaced" in res["failed"] and "no-such-folder" in res["failed"]
        assert "'model.norm.weight' has shape (3,), expected (64,)" in res["bad"]
        assert torch.equal(res["critic"], torch.zeros(2, 9))
    # the failed save left the earlier export and no temporary folders
    assert torch.equal(
        read_canonical(tmp_path / "qwen2-out", specs["qwen2"])["output_layer.weight"],
        random_canonical(specs["qwen2"], 9)["output_layer.weight"],
    )
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
