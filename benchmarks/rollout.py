"""Rollout engines side by side: native generator against vLLM, and vLLM's weight update.

One process, one model from the same weights, the same left-padded prompts:

* generation: ``--batch`` prompts of up to ``--prompt`` tokens, ``--new`` new tokens each, greedy,
  ``engine.generation_backend=native`` (``models.generate.generate``) against ``vllm``
  (``VllmGenerator``: weights pushed, then vLLM's continuous batching, then the native-contract
  log-probs recomputed by the shard's forward); the tokens must be the same. Each is the best
  of ``--reps`` interleaved repetitions, after one warm-up each (vLLM's first batch is slow).
  vLLM's time is also given without the weight update and the log-prob recomputation.
* weight update at tp=1 (the direct path: the shard's tensors under HF names, vLLM's in-place
  reload and a prefix-cache reset) for models of several widths: bytes, seconds, GB/s.

Needs vLLM (``.venv-vllm``, made by ``scripts/setup_vllm.sh``).

Run: ``.venv-vllm/bin/python benchmarks/rollout.py [--reps 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.distributed.groups import GroupRegistry, LayoutGroups
from lightning_real.distributed.launch import free_port
from lightning_real.layout import Layout
from lightning_real.models.generate import GenerationConfig, generate
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.runtime.vllm_engine import VllmConfig
from lightning_real.runtime.vllm_generation import VllmGenerator


def _spec(hidden: int, layers: int) -> ModelSpec:
    return tiny_spec(
        "llama",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        num_kv_heads=max(1, hidden // 128),
        ffn_hidden_size=hidden * 3,
        vocab_size=4096,
        max_position_embeddings=1024,
    )


def _prompts(b: int, s: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for row in range(b):
        mask[row, : (row * 7) % (s // 2)] = 0
    return ids * mask, mask


def _best(fn: Any, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def generation(groups: LayoutGroups, args: argparse.Namespace) -> dict[str, Any]:
    spec = _spec(args.hidden, args.layers)
    shard = ModelShard.from_canonical(spec, groups, random_canonical(spec, seed=1, std=0.1))
    ids, mask = _prompts(args.batch, args.prompt, spec.vocab_size)
    cfg = GenerationConfig(max_new_tokens=args.new, greedy=True)
    gen = VllmGenerator(config=VllmConfig(max_model_len=args.prompt + args.new, max_num_seqs=args.batch))
    native = generate(shard, ids, mask, cfg)
    ours = gen.generate(shard, ids, mask, cfg, row_offset=0)  # warm-up: start, first batch
    same = bool(torch.equal(native.tokens, ours.tokens))
    assert gen.engine is not None
    prompts = [ids[i][mask[i].bool()].tolist() for i in range(args.batch)]
    params = gen.sampling_params(cfg, 0)
    t_native = t_vllm = t_engine = float("inf")
    for _ in range(args.reps):
        t_native = min(t_native, _best(lambda: generate(shard, ids, mask, cfg), 1))
        t_vllm = min(t_vllm, _best(lambda: gen.generate(shard, ids, mask, cfg, row_offset=0), 1))
        t_engine = min(t_engine, _best(lambda: gen.engine.generate(prompts, params), 1))  # type: ignore[union-attr]
    toks = args.batch * args.new
    return {
        "model": f"llama h{args.hidden} L{args.layers} ({sum(t.numel() for t in random_canonical(spec).values()) / 1e6:.1f}M params)",
        "batch": args.batch,
        "prompt": args.prompt,
        "new": args.new,
        "same_tokens": same,
        "native_tok_s": toks / t_native,
        "vllm_tok_s": toks / t_vllm,
        "vllm_engine_only_tok_s": toks / t_engine,
        "vllm_start_s": gen.engine.start_s,
    }


def updates(groups: LayoutGroups, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for hidden, layers in ((128, 2), (256, 4), (512, 4), (1024, 4)):
        spec = _spec(hidden, layers)
        shard = ModelShard.from_canonical(spec, groups, random_canonical(spec, seed=2, std=0.02))
        gen = VllmGenerator(config=VllmConfig(max_model_len=128, max_num_seqs=4, kv_cache_bytes=1 << 27))
        gen.update_weights(shard)  # starts the engine
        best = min((gen.update_weights(shard) for _ in range(args.reps)), key=lambda u: u.seconds)
        rows.append(
            {
                "model": f"h{hidden} L{layers}",
                "bytes": best.bytes_loaded,
                "seconds": best.seconds,
                "gb_s": best.bytes_loaded / best.seconds / 1e9,
            }
        )
        gen.engine.llm = None  # type: ignore[union-attr]  # drop without vLLM's shutdown (it ends the world)
        gen.engine = None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    groups = GroupRegistry().for_layout(Layout.parse("d1t1p1@0").resolve(1))
    out = {
        "torch_threads": torch.get_num_threads(),
        "generation": generation(groups, args),
        "updates": updates(groups, args),
    }
    g = out["generation"]
    print(
        f"generation, {g['model']}, {g['batch']} x ({g['prompt']} + {g['new']}) greedy, same tokens: {g['same_tokens']}"
    )
    print(
        f"  native {g['native_tok_s']:.0f} tok/s | vllm {g['vllm_tok_s']:.0f} tok/s "
        f"(engine alone {g['vllm_engine_only_tok_s']:.0f} tok/s) | vllm start {g['vllm_start_s']:.1f} s"
    )
    print("weight update, tp=1 (direct path):")
    for r in out["updates"]:
        print(
            f"  {r['model']}: {r['bytes'] / 1e6:.1f} MB in {r['seconds'] * 1e3:.1f} ms ({r['gb_s']:.2f} GB/s)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
