"""The vLLM generation backend against the native generator and transformers, on CPU.

Runs in ``.venv-vllm`` (``scripts/setup_vllm.sh``; ``.ci/run`` runs this folder there). One
engine serves the whole module (starting one and its first batch take about 30 s on 2 cores):
the tests share a one-rank gloo world in this process, built once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_real.distributed.groups import GroupRegistry, LayoutGroups
from lightning_real.distributed.launch import free_port
from lightning_real.layout import Layout
from lightning_real.models.generate import GenerationConfig, GenerationOutput, generate
from lightning_real.models.hf import hf_model
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import tiny_spec
from lightning_real.modules.calls import generate_call
from lightning_real.runtime.generation import make_generator
from lightning_real.runtime.vllm_engine import VllmConfig, VllmUnavailable, check_servable
from lightning_real.runtime.vllm_generation import VllmGenerator
from tests.with_vllm.batches import PAD, prompts, train_one_step

# head size 32: vLLM's CPU attention has no kernel for tiny_spec's 16.
SPEC = tiny_spec("llama", hidden_size=128, num_layers=2)
NEW = 12
# fp32 on CPU, three implementations summing in different orders (seen: 2e-6 on log-probs).
ATOL = 1e-4
STD = 0.1  # std 0.1: tiny random models emit varied tokens (0.02 repeats one token)
# 32-token blocks: the 70-token prompt fills two, which the prefix cache keeps.
CONFIG = VllmConfig(max_model_len=128, max_num_seqs=16, kv_cache_bytes=1 << 28, block_size=32)


@dataclass
class World:
    groups: LayoutGroups
    canonical: dict[str, torch.Tensor]
    gen: VllmGenerator
    threads: int
    """torch's intra-op threads before the engine started."""


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    groups = GroupRegistry().for_layout(Layout.parse("d1t1p1@0").resolve(1))
    gen = VllmGenerator(config=CONFIG)
    try:
        yield World(groups, random_canonical(SPEC, seed=11, std=STD), gen, torch.get_num_threads())
    finally:
        gen.close()  # vLLM's shutdown also destroys the default group
        if dist.is_initialized():
            dist.destroy_process_group()


def _shard(w: World, canonical: dict[str, torch.Tensor] | None = None) -> ModelShard:
    return ModelShard.from_canonical(SPEC, w.groups, canonical or w.canonical)


def _fields(out: GenerationOutput) -> dict[str, torch.Tensor]:
    return {
        "tokens": out.tokens,
        "response_mask": out.response_mask,
        "response_lengths": out.response_lengths,
        "truncated": out.truncated,
    }


def _hf_greedy(canonical: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model: Any = hf_model(SPEC, canonical)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=PAD,
        )
    return out[:, ids.shape[1] :]


def test_greedy_equals_native_and_transformers(world: World) -> None:
    ids, mask = prompts()
    shard = _shard(world)
    cfg = GenerationConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD)
    native = generate(shard, ids, mask, cfg)
    ours = world.gen.generate(shard, ids, mask, cfg, row_offset=0)
    for k, v in _fields(native).items():
        assert torch.equal(getattr(ours, k), v), k
    assert torch.equal(ours.tokens[:, ids.shape[1] :], _hf_greedy(world.canonical, ids, mask))
    torch.testing.assert_close(ours.response_logprobs, native.response_logprobs, atol=ATOL, rtol=0)
    # the engine's own log-probs (temperature 1) against the shard's
    assert world.gen.last_logprob_diff is not None and world.gen.last_logprob_diff < ATOL
    # tp=1: the direct path hands over every parameter once, fp32, and communicates nothing
    n_params = sum(t.numel() for t in world.canonical.values())
    u = world.gen.last_update
    assert u is not None and u.path == "direct" and u.bytes_sent == 0
    assert u.bytes_loaded == u.bytes_local == 4 * n_params
    # vLLM lowers torch's threads and disables set_num_threads while it starts: both are back
    assert torch.get_num_threads() == world.threads
    torch.set_num_threads(world.threads + 1)
    assert torch.get_num_threads() == world.threads + 1
    torch.set_num_threads(world.threads)
    # the generate call of the RLHF modules reports the engine's log-prob gap
    rows, metrics = generate_call(world.gen, cfg, lambda: 0)(shard, {"prompts": ids, "prompt_mask": mask})
    assert torch.equal(rows["seq"], native.tokens)
    assert 0 <= metrics["actor/rollout_logprob_diff"] < ATOL


def test_eos_ends_rows_as_native(world: World) -> None:
    ids, mask = prompts()
    shard = _shard(world)
    free = generate(shard, ids, mask, GenerationConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD))
    # an EOS that row 0 emits at its 4th token: that row ends there, the others as they emit it
    eos = int(free.tokens[0, ids.shape[1] + 3])
    cfg = GenerationConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD, eos_token_id=eos)
    native = generate(shard, ids, mask, cfg)
    ours = world.gen.generate(shard, ids, mask, cfg, row_offset=0)
    assert int(native.response_lengths[0]) <= 4
    for k, v in _fields(native).items():
        assert torch.equal(getattr(ours, k), v), k
    torch.testing.assert_close(ours.response_logprobs, native.response_logprobs, atol=ATOL, rtol=0)


def test_engine_follows_a_training_step(world: World, caplog: pytest.LogCaptureFixture) -> None:
    ids, mask = prompts()
    shard = _shard(world)
    cfg = GenerationConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD)
    before = world.gen.generate(shard, ids, mask, cfg, row_offset=0)
    train_one_step(shard)
    native = generate(shard, ids, mask, cfg)
    with caplog.at_level(logging.INFO, logger="lightning_real.runtime.vllm_generation"):
        after = world.gen.generate(shard, ids, mask, cfg, row_offset=0)
    assert "direct path" in caplog.text
    # the step changed what the model says, and the engine says what the trained shard says
    assert not torch.equal(native.tokens, before.tokens)
    for k, v in _fields(native).items():
        assert torch.equal(getattr(after, k), v), k
    torch.testing.assert_close(after.response_logprobs, native.response_logprobs, atol=ATOL, rtol=0)
    assert world.gen.last_logprob_diff is not None and world.gen.last_logprob_diff < ATOL


def test_engine_memory_is_released_between_calls_and_restored(world: World) -> None:
    ids, mask = prompts()
    shard = _shard(world)
    cfg = GenerationConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD)
    native = generate(shard, ids, mask, cfg)
    gen = world.gen
    first = gen.generate(shard, ids, mask, cfg, row_offset=0)
    engine = gen.engine
    assert engine is not None and not engine.sleep_mode  # CPU: no vLLM sleep mode, storages freed here
    # after the call: weights and cache freed (release=True is the default)
    assert engine.released == (True, True) and engine.resident_bytes() == 0
    assert gen.last_release_bytes == engine.weight_bytes + engine.cache_bytes
    assert engine.cache_bytes == CONFIG.kv_cache_bytes and engine.weight_bytes > 0
    # restored for the next call, weights first (the update refills them), the cache second
    engine.restore_weights()
    assert engine.released == (False, True)
    assert engine.resident_bytes() == engine.weight_bytes
    again = gen.generate(shard, ids, mask, cfg, row_offset=0)
    assert torch.equal(again.tokens, native.tokens) and torch.equal(first.tokens, native.tokens)
    # release=False keeps both resident
    kept = replace(gen.config, release=False)
    gen.config = kept
    try:
        gen.generate(shard, ids, mask, cfg, row_offset=0)
        assert engine.released == (False, False)
        assert engine.resident_bytes() == engine.weight_bytes + engine.cache_bytes
    finally:
        gen.config = CONFIG


def test_sampling_streams_are_per_row(world: World) -> None:
    ids, mask = prompts()
    shard = _shard(world)
    cfg = GenerationConfig(max_new_tokens=NEW, temperature=0.8, top_k=50, seed=5, pad_token_id=PAD)
    a = world.gen.generate(shard, ids, mask, cfg, row_offset=0)
    b = world.gen.generate(shard, ids, mask, cfg, row_offset=0)
    assert torch.equal(a.tokens, b.tokens)
    # row 2 alone, at its global index, draws what it drew inside the batch
    alone = world.gen.generate(shard, ids[2:3], mask[2:3], cfg, row_offset=2)
    assert torch.equal(alone.tokens, a.tokens[2:3])
    other = world.gen.generate(
        shard, ids, mask, GenerationConfig(**{**cfg.__dict__, "seed": 6}), row_offset=0
    )
    assert not torch.equal(other.tokens, a.tokens)
    # the returned log-probs are log_softmax(logits / temperature) of the sampled tokens (the
    # native contract), here against transformers on row 0 (no padding)
    model: Any = hf_model(SPEC, world.canonical)
    s = ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=a.tokens[:1]).logits[0, s - 1 : -1].float()
    ref = torch.log_softmax(logits / 0.8, -1).gather(1, a.tokens[0, s:, None])[:, 0]
    torch.testing.assert_close(a.response_logprobs[0], ref, atol=ATOL, rtol=0)


def test_models_it_cannot_serve_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # (the layout refusals need no vLLM: tests/test_vllm_options.py)
    from vllm.model_executor.models import ModelRegistry

    # every family of ModelSpec is in vLLM 0.32's registry: the check is seen with one taken out
    archs = set(ModelRegistry.get_supported_archs())
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"} <= archs
    monkeypatch.setattr(ModelRegistry, "get_supported_archs", lambda: archs - {"Qwen2ForCausalLM"})
    with pytest.raises(VllmUnavailable, match=r"no model Qwen2ForCausalLM \(family 'qwen2'\)"):
        check_servable(tiny_spec("qwen2", hidden_size=128), torch.device("cpu"))
    monkeypatch.undo()
    with pytest.raises(VllmUnavailable, match=r"head size 16"):
        check_servable(tiny_spec("llama"), torch.device("cpu"))
    with pytest.raises(VllmUnavailable, match=r"'value' head"):
        check_servable(tiny_spec("llama", "value", hidden_size=128), torch.device("cpu"))
    assert make_generator("vllm").backend == "vllm"
