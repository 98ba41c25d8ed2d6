"""KV-cache generation under TP/PP on real gloo groups, checked against transformers.

One 4-process world runs every layout (disjoint layouts run side by side); the parent process
compares with transformers' own ``generate`` and a teacher-forced HF forward.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.forward import position_ids
from lightning_real.models.generate import GenerationConfig, GenerationOutput, VocabParallelSampler, generate
from lightning_real.models.hf import hf_model
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import tiny_spec

# fp32 on CPU: megatron and transformers sum in different orders (seen: 5e-7 on log-probs);
# 1e-4 absolute leaves room for that and nothing else.
ATOL = 1e-4
FAMILIES = ("llama", "gpt2")
B, S, NEW = 4, 8, 12
LEFT_PAD = (0, 3, 5, 1)
PAD = 0
# std 0.1 makes tiny random models emit varied tokens (0.02 repeats one token forever).
STD = 0.1
GREEDY_LAYOUTS = ("d1t2p2@0-3", "d1t2p1@0-1", "d1t1p2@2-3", "d1t1p1@0", "d2t1p1@2-3")
SAMPLE_LAYOUTS = ("d1t1p1@0", "d1t2p1@0-1", "d1t1p2@2-3", "d1t2p2@0-3")
SAMPLING = {
    "plain": GenerationConfig(max_new_tokens=NEW, temperature=0.8, seed=5, pad_token_id=PAD),
    "plain_seed6": GenerationConfig(max_new_tokens=NEW, temperature=0.8, seed=6, pad_token_id=PAD),
    "filtered": GenerationConfig(
        max_new_tokens=NEW, temperature=1.3, top_k=20, top_p=0.9, seed=5, pad_token_id=PAD
    ),
    "top_p_only": GenerationConfig(max_new_tokens=NEW, top_p=0.8, seed=5, pad_token_id=PAD),
    "top_k1": GenerationConfig(max_new_tokens=NEW, top_k=1, seed=9, pad_token_id=PAD),
}


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for row, n in enumerate(LEFT_PAD):
        mask[row, :n] = 0
    return ids * mask + PAD * (1 - mask), mask


def _canonical(fam: str) -> dict[str, torch.Tensor]:
    return random_canonical(tiny_spec(fam), seed=11, std=STD)


def _as_tuple(out: GenerationOutput) -> tuple[torch.Tensor, ...]:
    return (out.tokens, out.response_logprobs, out.response_mask, out.response_lengths, out.truncated)


# ---- distributed side --------------------------------------------------------------------------------
def _world(rank: int, world: int, eos: dict[str, dict[str, Any]]) -> dict:
    reg = GroupRegistry()
    ids, mask = _prompts()
    out: dict = {}
    for fam in FAMILIES:
        spec = tiny_spec(fam)
        can = _canonical(fam)
        runs = {
            name: GenerationConfig(max_new_tokens=NEW, greedy=True, eos_token_id=e, pad_token_id=PAD)
            for name, e in eos[fam].items()
        }
        plan = [(lay, name, cfg) for lay in GREEDY_LAYOUTS for name, cfg in runs.items()]
        plan += [(lay, name, cfg) for lay in SAMPLE_LAYOUTS for name, cfg in SAMPLING.items()]
        shards: dict[str, ModelShard] = {}
        for lay_s, name, cfg in plan:
            if lay_s not in shards:
                lay = Layout.parse(lay_s).resolve(world)
                shards[lay_s] = ModelShard.from_canonical(spec, reg.for_layout(lay), can)
            shard = shards[lay_s]
            if not shard.member:
                continue
            c = shard.layout.coords(rank)
            lo, hi = c[0] * B // shard.layout.dp, (c[0] + 1) * B // shard.layout.dp
            res = generate(shard, ids[lo:hi], mask[lo:hi], cfg)
            out[(fam, name, lay_s)] = (lo, hi, _as_tuple(res))
        if fam == "llama":
            # seed=None: a seed drawn on the replica's first rank must reach all four ranks.
            res = generate(shards["d1t2p2@0-3"], ids, mask, GenerationConfig(max_new_tokens=NEW, seed=None))
            out[(fam, "seed_none", "d1t2p2@0-3")] = (0, B, _as_tuple(res))
            dp2 = shards["d2t1p1@2-3"]
            if dp2.member:  # both replicas get the same rows and the same seed
                res = generate(dp2, ids[:2], mask[:2], SAMPLING["plain"])
                out["same_rows_dp"] = res.tokens
    if rank == 0:
        shard = shards["d1t1p1@0"]
        right_padded = mask.flip(1)
        try:
            generate(shard, ids, right_padded, SAMPLING["plain"])
        except ValueError as e:
            out["right_padded_error"] = str(e)
    return out


# ---- references ------------------------------------------------------------------------------------
def _hf_greedy(fam: str, eos: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' greedy tokens [B, S+NEW] (padded to full width) and log_softmax of its scores."""
    model = hf_model(tiny_spec(fam), _canonical(fam))
    ids, mask = _prompts()
    with torch.no_grad():
        r = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
        )
    n = r.sequences.shape[1] - S
    tokens = torch.full((B, S + NEW), PAD, dtype=torch.long)
    tokens[:, : S + n] = r.sequences
    lp = torch.zeros(B, NEW)
    scores = torch.stack(r.scores, 1).log_softmax(-1)
    lp[:, :n] = scores.gather(-1, r.sequences[:, S:, None]).squeeze(-1)
    return tokens, lp


def _hf_logits(fam: str, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced HF logits [B, NEW, V] that predict each response token."""
    model = hf_model(tiny_spec(fam), _canonical(fam))
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=position_ids(mask)).logits
    return logits[:, S - 1 : -1]


def _expected_mask(response: torch.Tensor, eos: tuple[int, ...]) -> torch.Tensor:
    """1 up to and including the first EOS of each row (independent of the code under test)."""
    m = torch.ones_like(response)
    for r in range(response.shape[0]):
        for t in range(response.shape[1]):
            if int(response[r, t]) in eos:
                m[r, t + 1 :] = 0
                break
    return m


def _eos_choices() -> dict[str, dict[str, Any]]:
    """EOS ids picked from the greedy outputs so that rows stop at different steps."""
    out: dict[str, dict[str, Any]] = {}
    for fam in FAMILIES:
        free, _ = _hf_greedy(fam, None)
        resp = free[:, S:]
        # A token of row 0 (not its first two) that some other row never emits: rows 0 and that
        # row then stop at different steps, and one is truncated.
        one = next(int(t) for t in resp[0, 2:-1] if any(int(t) not in r.tolist() for r in resp[1:]))
        two = (one, int(resp[1, 6]))
        every = tuple(sorted({int(t) for t in resp[:, 2]}))  # all rows end by step 2
        out[fam] = {"no_eos": None, "one_eos": one, "two_eos": two, "all_stop": every}
    return out


def _merge(results: list[dict], key: tuple) -> torch.Tensor | tuple:
    """Rows of every replica joined; asserts that every rank of a replica returned the same."""
    rows: dict[int, tuple] = {}
    for res in results:
        if key not in res:
            continue
        lo, hi, t = res[key]
        if lo in rows:
            for a, b in zip(rows[lo][2], t):
                assert torch.equal(a, b), f"{key}: ranks of one replica disagree"
        else:
            rows[lo] = (lo, hi, t)
    parts = [rows[lo][2] for lo in sorted(rows)]
    assert sum(rows[lo][1] - rows[lo][0] for lo in rows) == B, key
    return tuple(torch.cat([p[i] for p in parts], 0) for i in range(5))


@pytest.fixture(scope="module")
def runs() -> tuple[dict, list[dict]]:
    eos = _eos_choices()
    return eos, spawn(_world, 4, eos)


# ---- tests --------------------------------------------------------------------------------------------
def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        GenerationConfig(top_k=-1)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        GenerationConfig(eos_token_id=(1, -2))
    assert GenerationConfig(eos_token_id=3).eos_ids == (3,)


def test_sampler_draws_from_the_filtered_distribution():
    # 40000 draws of one row: the standard error of a frequency is <= 0.0025, so 0.015 is ~6 sigma.
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5]])
    rows = logits.expand(40000, -1)
    cases = [
        (GenerationConfig(temperature=0.7), torch.ones(8, dtype=torch.bool)),
        (GenerationConfig(top_k=3), torch.tensor([1, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool)),
        # sorted probs 0.37, 0.22, 0.14, ...: the nucleus for 0.7 is the top three
        (GenerationConfig(top_p=0.7), torch.tensor([1, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool)),
    ]
    for cfg, keep in cases:
        sampler = VocabParallelSampler(cfg, 8, seed=1, device=torch.device("cpu"))
        tokens, lp = sampler(rows)
        freq = torch.bincount(tokens, minlength=8).float() / rows.shape[0]
        target = (logits[0] / cfg.temperature).masked_fill(~keep, float("-inf")).softmax(-1)
        assert (freq - target).abs().max() < 0.015, (cfg, freq, target)
        full = (logits[0] / cfg.temperature).log_softmax(-1)
        assert torch.allclose(lp, full[tokens], atol=1e-6)


def test_greedy_matches_transformers(runs):
    eos, results = runs
    for fam in FAMILIES:
        for name, e in eos[fam].items():
            ref_tokens, ref_lp = _hf_greedy(fam, e)
            eos_ids = () if e is None else (e,) if isinstance(e, int) else e
            want_mask = _expected_mask(ref_tokens[:, S:], eos_ids)
            for lay in GREEDY_LAYOUTS:
                tokens, lp, mask, lengths, truncated = _merge(results, (fam, name, lay))
                assert tokens.shape == (B, S + NEW)
                assert torch.equal(tokens, ref_tokens), (fam, name, lay, tokens[:, S:], ref_tokens[:, S:])
                assert torch.equal(mask, want_mask), (fam, name, lay)
                assert (lp - ref_lp * want_mask).abs().max() < ATOL, (fam, name, lay)
                assert torch.equal(lengths, want_mask.sum(1))
                hit = torch.tensor([bool(set(ref_tokens[r, S:].tolist()) & set(eos_ids)) for r in range(B)])
                assert torch.equal(truncated, ~hit)


def test_eos_stops_rows_at_different_steps(runs):
    eos, results = runs
    for fam in FAMILIES:
        lengths = {name: _merge(results, (fam, name, "d1t2p2@0-3"))[3] for name in eos[fam]}
        assert lengths["no_eos"].tolist() == [NEW] * B
        # The single EOS comes from row 0's response; some other row never produces it.
        assert 3 <= lengths["one_eos"][0] < NEW and lengths["one_eos"].max() == NEW
        assert (lengths["two_eos"] <= lengths["one_eos"]).all()
        assert lengths["all_stop"].max() <= 3
        tokens, _, mask, _, truncated = _merge(results, (fam, "all_stop", "d1t2p2@0-3"))
        assert not truncated.any()
        assert (tokens[:, S:][mask == 0] == PAD).all()


def test_sampling_is_seeded_and_layout_independent(runs):
    _, results = runs
    for fam in FAMILIES:
        for name in SAMPLING:
            ref = _merge(results, (fam, name, SAMPLE_LAYOUTS[0]))
            for lay in SAMPLE_LAYOUTS[1:]:
                got = _merge(results, (fam, name, lay))
                assert torch.equal(got[0], ref[0]), (fam, name, lay)
                assert (got[1] - ref[1]).abs().max() < ATOL, (fam, name, lay)
        plain = _merge(results, (fam, "plain", "d1t1p1@0"))[0]
        other_seed = _merge(results, (fam, "plain_seed6", "d1t1p1@0"))[0]
        greedy = _merge(results, (fam, "no_eos", "d1t1p1@0"))[0]
        assert not torch.equal(plain, other_seed)
        assert not torch.equal(plain, greedy)
        for lay in SAMPLE_LAYOUTS:
            assert torch.equal(_merge(results, (fam, "top_k1", lay))[0], greedy), (fam, lay)


def test_unseeded_sampling_agrees_within_a_replica_and_replicas_differ(runs):
    _, results = runs
    tokens, _, mask, _, _ = _merge(results, ("llama", "seed_none", "d1t2p2@0-3"))  # all 4 ranks equal
    assert mask.sum() == B * NEW
    assert ((tokens >= 0) & (tokens < tiny_spec("llama").vocab_size)).all()
    # Replicas mix their data-parallel index into the seed: same rows, different draws.
    assert not torch.equal(results[2]["same_rows_dp"], results[3]["same_rows_dp"])


def test_sampled_tokens_and_logprobs_follow_the_policy(runs):
    _, results = runs
    _, pmask = _prompts()
    for fam in FAMILIES:
        for name, cfg in SAMPLING.items():
            tokens, lp, mask, _, _ = _merge(results, (fam, name, "d1t2p2@0-3"))
            logits = _hf_logits(fam, tokens, torch.cat([pmask, mask], 1)) / cfg.temperature
            want = logits.log_softmax(-1).gather(-1, tokens[:, S:, None]).squeeze(-1)
            assert (lp - want * mask).abs().max() < ATOL, (fam, name)
            # Every sampled token lies inside the filtered support (top-k, then the top-p nucleus).
            order = logits.argsort(-1, descending=True)
            rank = order.argsort(-1).gather(-1, tokens[:, S:, None]).squeeze(-1)
            if cfg.top_k:
                assert (rank[mask == 1] < cfg.top_k).all(), (fam, name)
            if cfg.top_p < 1:
                sorted_logits = logits.gather(-1, order)
                if cfg.top_k:
                    sorted_logits[..., cfg.top_k :] = float("-inf")
                p = sorted_logits.softmax(-1)
                before = (p.cumsum(-1) - p).gather(-1, rank[..., None]).squeeze(-1)
                assert (before[mask == 1] < cfg.top_p + 1e-5).all(), (fam, name)


def test_prompts_must_be_left_padded(runs):
    _, results = runs
    assert "left-padded" in results[0]["right_padded_error"]
