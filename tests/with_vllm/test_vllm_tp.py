"""vLLM with tensor parallelism: a d1t2p1 generate copy over two gloo processes, fed by the direct path.

One 2-process world (``spawn``): each rank starts its engine of the replica (vLLM's
``external_launcher``), the actor is trained on d1t1p2 and moved to d1t2p1 by the reallocator,
and each rank writes its own tensor-parallel shard into its engine. About 60 s on 2 cores (two
engine starts and their first batches).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.models.generate import GenerationConfig, generate
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import tiny_spec
from lightning_real.realloc.reallocator import Reallocator
from lightning_real.runtime.vllm_engine import VllmConfig
from lightning_real.runtime.vllm_generation import VllmGenerator
from lightning_real.runtime.vllm_weights import WeightUpdate
from tests.with_vllm.batches import PAD, prompts, train_one_step

# Head size 32 (vLLM's CPU attention has no kernel for 16); 256 vocabulary rows split alike by
# megatron (256 / 2) and vLLM (padded to 64, then / 2), so every tensor takes the direct path.
SPEC = tiny_spec("llama", hidden_size=128, num_layers=2, vocab_size=256)
TRAIN, GEN = "d1t1p2", "d1t2p1"
NEW = 12
ATOL = 1e-4
CONFIG = VllmConfig(max_model_len=128, max_num_seqs=16, kv_cache_bytes=1 << 28, block_size=32)


def _engine_params(
    gen: VllmGenerator, shard: ModelShard, full: bool
) -> tuple[dict[str, torch.Tensor], WeightUpdate]:
    """vLLM's parameters on this rank after an update. Its CPU linear layers drop the plain
    weight once repacked, so theirs are taken as loaded, just before the repacking."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    seen: dict[str, torch.Tensor] = {}
    repack = UnquantizedLinearMethod.process_weights_after_loading

    def spy(self: Any, layer: torch.nn.Module) -> None:
        seen[f"{layer.prefix}.weight"] = layer.weight.detach().clone()
        repack(self, layer)

    UnquantizedLinearMethod.process_weights_after_loading = spy
    try:
        update = gen.update_weights(shard, full=full)
    finally:
        UnquantizedLinearMethod.process_weights_after_loading = repack
    assert gen.engine is not None
    (rest,) = gen.engine.llm.apply_model(
        lambda m: {n: p.detach().clone() for n, p in m.named_parameters() if p.numel()}
    )
    return {**rest, **seen}, update


def _same_tokens(ours: Any, native: Any) -> None:
    for k in ("tokens", "response_mask", "response_lengths", "truncated"):
        assert torch.equal(getattr(ours, k), getattr(native, k)), k
    torch.testing.assert_close(ours.response_logprobs, native.response_logprobs, atol=ATOL, rtol=0)


def _rank(rank: int, world: int) -> dict[str, Any]:
    registry = GroupRegistry()
    realloc = Reallocator(SPEC, registry)
    canonical = random_canonical(SPEC, seed=11, std=0.1)
    train = realloc.adopt(
        ModelShard.from_canonical(SPEC, registry.for_layout(realloc.resolve(TRAIN)), canonical)
    )
    plan = realloc.plan(TRAIN, GEN)
    shard = realloc.move(TRAIN, GEN, keep_source=True)
    assert realloc.last_stats is not None
    out: dict[str, Any] = {"plan_bytes": plan.bytes_sent, "moved": [realloc.last_stats.bytes_sent]}
    ids, mask = prompts()
    cfg = GenerationConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD)
    gen = VllmGenerator(config=CONFIG)
    try:
        native = generate(shard, ids, mask, cfg)
        t0 = time.perf_counter()
        ours = gen.generate(shard, ids, mask, cfg, row_offset=0)
        out["first_call_s"] = time.perf_counter() - t0
        assert gen.engine is not None
        out["start_s"] = gen.engine.start_s
        _same_tokens(ours, native)
        out["updates"] = [gen.last_update]

        # vLLM's local parameters: the direct path gives what the full-tensor path gives
        direct, upd_direct = _engine_params(gen, shard, full=False)
        full, upd_full = _engine_params(gen, shard, full=True)
        assert any("qkv_proj" in n for n in direct) and any("gate_up_proj" in n for n in direct)
        assert sorted(direct) == sorted(full)
        for name, t in direct.items():
            assert torch.equal(t, full[name]), name
        out["updates"] += [upd_direct, upd_full]

        # a training step elsewhere, the move back to the generate layout: the engine follows
        train_one_step(train)
        shard = realloc.move(TRAIN, GEN, keep_source=True)
        out["moved"].append(realloc.last_stats.bytes_sent)
        native2 = generate(shard, ids, mask, cfg)
        after = gen.generate(shard, ids, mask, cfg, row_offset=0)
        assert not torch.equal(native2.tokens, native.tokens)
        _same_tokens(after, native2)
        assert gen.last_logprob_diff is not None and gen.last_logprob_diff < ATOL
        out["logprob_diff"] = gen.last_logprob_diff
        out["updates"].append(gen.last_update)
    finally:
        gen.close()  # vLLM's shutdown also destroys the default group
    return out


def test_tp2_engine_follows_the_reallocated_shard() -> None:
    ranks = spawn(_rank, 2, timeout_s=300.0)
    n_params = sum(t.numel() for t in random_canonical(SPEC).values())
    for r in ranks:
        # bytes between ranks: the reallocation plan's, each move; nothing more for the engine
        for i in range(2):
            assert sum(x["moved"][i] for x in ranks) == r["plan_bytes"] > 0
        first, direct, full, after = r["updates"]
        for u in (first, direct, after):
            assert u.path == "direct" and u.bytes_sent == 0 and u.gathered == ()
        # the rank's own slices: its half of every split tensor and the replicated norms
        norms = SPEC.hidden_size * (2 * SPEC.num_layers + 1)
        assert first.bytes_local == 4 * ((n_params - norms) // 2 + norms)
        assert first.bytes_loaded == 4 * n_params
        # the reference gathers every split tensor: the other rank's half
        assert full.path == "full" and full.bytes_sent == 4 * (n_params - norms) // 2
    print(  # figures for docs/rollout.md (pytest -s)
        "tp=2 engines:",
        [f"start {r['start_s']:.1f} s, first call {r['first_call_s']:.1f} s" for r in ranks],
        "updates (s, bytes loaded):",
        [[(round(u.seconds, 3), u.bytes_loaded) for u in r["updates"]] for r in ranks],
        "logprob diff:",
        [r["logprob_diff"] for r in ranks],
    )
