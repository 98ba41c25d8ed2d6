"""The engine beside transformers, side by side in one run: training step, inference, generation, memory.

Speed (``--only speed``), on one process and on ``--world`` processes (gloo on CPU), the same
llama-style model from the same weights and the same batch:

* training step (forward, backward, global-norm clipping, AdamW) on 8 x 256 tokens: our
  ``TrainEngine`` (SDPA attention, ZeRO-1 over the replicas when there are several) against
  transformers' ``LlamaForCausalLM`` (its SDPA attention) with ``torch.optim.AdamW`` (and torch
  DDP over the replicas);
* inference: next-token log-probabilities of 16 x 256 tokens, ``forward_logprobs`` against the
  transformers forward plus ``log_softmax``;
* generation: 16 prompts of 64 tokens, 64 new tokens each, greedy, our ``generate`` against
  transformers' ``generate`` (the tokens must be the same).

Each side runs alone in its own processes (neither beside the other's model, allocator state
or threads), the two alternating ``--rounds`` times (ours, theirs, ours, theirs); in each, every
call gets a warm-up, one untimed run that gives the peak memory (the heap sampler never runs
during a timed run) and ``--reps`` timed runs. Tokens per second over all processes, from the
best of a side's timed runs. ``--precision bf16-mixed`` runs ours in bf16-mixed and transformers'
training under ``torch.autocast(bfloat16)`` (Lightning's ``bf16-mixed``), its inference and
generation on a bf16 copy (greedy tokens then need not agree: the two round differently).
Memory (``--only memory``): the peak bytes per rank of two training
steps for several layout x precision x optimizer cases (``PeakMemory``: glibc's heap on CPU,
``max_memory_allocated`` on CUDA), beside the planner's prediction for the same call
(:func:`lightning_real.planner.memory.call_memory`).

Packing (``--only packing``): one training step and one inference forward on 16 rows whose lengths
spread evenly from 16 to 256 tokens, padded against packed into rows of ``--token-budget`` tokens;
real (non-padding) tokens per second.

Run: ``python benchmarks/engine.py [--reps 3] [--world 4] [--only speed|memory|packing] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peak_memory import PeakMemory

from lightning_real.compat import device, has_cuda
from lightning_real.dataflow import MFC
from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.features import RuntimeFeatures
from lightning_real.layout import Layout
from lightning_real.models.build import BuildOptions
from lightning_real.models.forward import forward_logprobs
from lightning_real.models.generate import GenerationConfig, generate
from lightning_real.models.hf import hf_model
from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import ModelSpec
from lightning_real.models.train import TrainConfig, TrainEngine
from lightning_real.models.vocab_parallel import next_token_logprobs
from lightning_real.planner.flops import forward_flops, generate_flops, train_flops
from lightning_real.planner.memory import call_memory

MODELS = {
    # hidden, layers, heads, kv heads, ffn, vocab
    "bench": ModelSpec("llama", 8192, 512, 8, 8, 4, 1408, max_position_embeddings=512),
    "small": ModelSpec("llama", 4096, 256, 4, 4, 2, 704, max_position_embeddings=512),
    "0.5b": ModelSpec("llama", 32000, 1024, 24, 16, 8, 2816, max_position_embeddings=2048),
}
TRAIN_BATCH, SEQ = 8, 256
PACK_ROWS = 16  # lengths 16..SEQ, evenly spread
INFER_BATCH = 16
GEN_BATCH, GEN_PROMPT, GEN_NEW = 16, 64, 64
OPT = OptimConfig(lr=1e-4, max_grad_norm=1.0)
MEMORY_CASES: list[tuple[str, str, str]] = [
    # (layout, precision, optimizer)
    ("d1t1p1", "32-true", "replicated"),
    ("d1t1p1", "bf16-mixed", "replicated"),
    ("d2t1p1", "32-true", "replicated"),
    ("d2t1p1", "32-true", "distributed"),
    ("d2t1p1", "bf16-mixed", "distributed"),
    ("d1t2p1", "32-true", "replicated"),
    ("d1t1p2", "32-true", "replicated"),
    ("d4t1p1", "32-true", "distributed"),
]


def _sync() -> None:
    if has_cuda():
        torch.cuda.synchronize()


def _timed(fn: Any) -> float:
    """Seconds of ``fn()``, the slowest rank's, after a barrier."""
    if dist.is_initialized():
        dist.barrier()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _ids(rows: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(1, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _sft_loss(tp: Any) -> Any:
    def loss(out: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        lp = next_token_logprobs(out, mb["input_ids"], tp)
        return -lp.sum(), {}

    return loss


def _side(rank: int, world: int, model: str, reps: int, precision: str, side: str) -> dict[str, Any]:
    """One side (``ours`` or ``theirs``) alone in its processes: each call's timed runs, its peak
    memory and the generated tokens."""
    spec = MODELS[model]
    dev = device()
    canonical = random_canonical(spec, seed=0)
    groups = GroupRegistry().for_layout(Layout(world, 1, 1, tuple(range(world))))
    dtype = torch.float32 if precision == "32-true" else torch.bfloat16
    per = TRAIN_BATCH // world
    ids = _ids(TRAIN_BATCH, SEQ, spec.vocab_size, 1)[rank * per : (rank + 1) * per].to(dev)
    iper = INFER_BATCH // world
    iids = _ids(INFER_BATCH, SEQ, spec.vocab_size, 2)[rank * iper : (rank + 1) * iper].to(dev)
    gper = GEN_BATCH // world
    gids = _ids(GEN_BATCH, GEN_PROMPT, spec.vocab_size, 3)[rank * gper : (rank + 1) * gper].to(dev)
    gmask = torch.ones_like(gids)
    out: dict[str, torch.Tensor] = {}
    if side == "ours":
        ours = ModelShard.from_canonical(spec, groups, canonical, BuildOptions(dtype=dtype, attention="sdpa"))
        engine = TrainEngine(
            ours,
            _sft_loss(groups.tp),
            TrainConfig(optim=OPT, norm_key=None, distributed_optimizer=world > 1, precision=precision),  # type: ignore[arg-type]
        )
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        imask = torch.ones_like(iids)
        cfg = GenerationConfig(max_new_tokens=GEN_NEW, greedy=True, eos_token_id=None, pad_token_id=0)

        def train() -> None:
            engine.step(batch)

        def infer() -> None:
            forward_logprobs(ours, iids, imask)

        def gen() -> None:
            out["tokens"] = generate(ours, gids, gmask, cfg).tokens

    else:
        # fp32 parameters under bf16 autocast for training (Lightning's bf16-mixed), a bf16 copy
        # for inference and generation
        theirs = hf_model(spec, canonical).to(dev).train()
        frozen = theirs if dtype == torch.float32 else hf_model(spec, canonical).to(dev, dtype)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype != torch.float32)
        ddp: Any = torch.nn.parallel.DistributedDataParallel(theirs) if world > 1 else theirs
        opt = torch.optim.AdamW(theirs.parameters(), lr=OPT.lr, betas=OPT.betas, eps=OPT.eps)

        def train() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast:
                logits = ddp(ids).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            (-lp.sum() / (TRAIN_BATCH / world)).backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), OPT.max_grad_norm)
            opt.step()

        def infer() -> None:
            with torch.no_grad():
                logits = frozen(iids).logits.float()
                torch.log_softmax(logits[:, :-1], -1).gather(-1, iids[:, 1:, None])

        def gen() -> None:
            with torch.no_grad():
                frozen.eval()
                out["tokens"] = frozen.generate(
                    gids,
                    attention_mask=gmask,
                    max_new_tokens=GEN_NEW,
                    min_new_tokens=GEN_NEW,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )
                frozen.train()

    result: dict[str, Any] = {}
    for name, fn in (("train", train), ("inference", infer), ("generate", gen)):
        fn()  # warm-up: lazily built state (optimizer moments, DDP buckets) exists after it
        # Peak memory from one run apart from the timed ones: the heap sampler's thread (every
        # 0.2 ms, taking the GIL and malloc's lock) would slow what it measures.
        with PeakMemory() as peak:
            fn()
        result[name] = {"s": [_timed(fn) for _ in range(reps)], "peak_bytes": peak.peak}
    result["tokens"] = out["tokens"].cpu()
    return result


def _speed(world: int, model: str, reps: int, precision: str, rounds: int, threads: int) -> dict[str, Any]:
    """Both sides, each in its own processes, alternating ``rounds`` times (ours, theirs, ours,
    ...): neither runs beside the other's model, allocator state or threads, and drift of the
    machine falls on both. Tokens/s from the best of all timed runs."""
    spec = MODELS[model]
    runs: dict[str, list[list[dict[str, Any]]]] = {"ours": [], "theirs": []}
    for _ in range(rounds):
        for side in runs:
            runs[side].append(
                spawn(_side, world, model, reps, precision, side, threads=threads, timeout_s=1800)
            )
    tokens = {
        "train": float(TRAIN_BATCH * SEQ),
        "inference": float(INFER_BATCH * SEQ),
        "generate": float(GEN_BATCH * GEN_NEW),
    }
    flops = {
        "train": train_flops(spec, TRAIN_BATCH, SEQ),
        "inference": forward_flops(spec, INFER_BATCH, SEQ),
        "generate": generate_flops(spec, GEN_BATCH, GEN_PROMPT, GEN_NEW),
    }
    result: dict[str, Any] = {}
    for name, n in tokens.items():
        row: dict[str, Any] = {"flops": flops[name]}
        for side, per_round in runs.items():
            # _timed reports the slowest rank's seconds to every rank; rank 0's list says it
            times = [t for ranks in per_round for t in ranks[0][name]["s"]]
            row[f"{side}_s"] = times
            row[f"{side}_tok_s"] = n / min(times)
            row[f"{side}_peak_bytes"] = max(r[name]["peak_bytes"] for ranks in per_round for r in ranks)
        result[name] = row
    result["generate"]["same_tokens"] = all(
        torch.equal(a["tokens"], b["tokens"])
        for rounds_a, rounds_b in zip(runs["ours"], runs["theirs"], strict=True)
        for a, b in zip(rounds_a, rounds_b, strict=True)
    )
    return result


def _memory(
    rank: int, world: int, model: str, layout: str, precision: str, optimizer: str
) -> dict[str, float]:
    spec = MODELS[model]
    lay = Layout.parse(layout).resolve(world)
    reg = GroupRegistry()
    groups = reg.for_layout(lay)
    canonical = random_canonical(spec, seed=0)
    dtype = torch.float32 if precision == "32-true" else torch.bfloat16
    ids = _ids(TRAIN_BATCH, SEQ, spec.vocab_size, 1)
    per = TRAIN_BATCH // lay.dp
    c = groups.coords
    assert c is not None
    batch = {
        "input_ids": ids[c[0] * per : (c[0] + 1) * per],
        "attention_mask": torch.ones(per, SEQ, dtype=torch.long),
    }
    cfg = TrainConfig(
        optim=OPT,
        norm_key=None,
        precision=precision,  # type: ignore[arg-type]
        distributed_optimizer=optimizer == "distributed",
        n_mbs=2 if lay.pp > 1 else 1,
    )
    with PeakMemory() as peak:
        shard = ModelShard.from_canonical(spec, groups, canonical, BuildOptions(dtype=dtype))
        engine = TrainEngine(shard, _sft_loss(groups.tp), cfg)
        for _ in range(2):
            engine.step(batch)
    feats = RuntimeFeatures(precision=precision, optimizer=optimizer)  # type: ignore[arg-type]
    call = MFC("t", "actor", "train", (), (), batch_size=TRAIN_BATCH, prompt_len=SEQ, gen_len=0)
    pred = call_memory(call, spec, lay.dp, lay.tp, lay.pp, cfg.n_mbs, feats)
    return {"measured": float(peak.peak), "predicted": pred.total}


def _packing(rank: int, world: int, model: str, reps: int, budget: int) -> dict[str, Any]:
    """Padded against packed rows on one batch whose lengths spread from 16 to ``SEQ`` tokens."""
    spec = MODELS[model]
    groups = GroupRegistry().for_layout(Layout(1, 1, 1, (0,)))
    canonical = random_canonical(spec, seed=0)
    lengths = torch.linspace(16, SEQ, PACK_ROWS).round().long()
    ids = _ids(PACK_ROWS, SEQ, spec.vocab_size, 4)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    real = float(lengths.sum())
    out: dict[str, Any] = {"rows": PACK_ROWS, "real_tokens": real, "padded_tokens": float(PACK_ROWS * SEQ)}
    engines = {}
    for name, tb in (("padded", None), ("packed", budget)):
        shard = ModelShard.from_canonical(spec, groups, canonical, BuildOptions(attention="sdpa"))
        engines[name] = (
            shard,
            TrainEngine(shard, _sft_loss(groups.tp), TrainConfig(optim=OPT, norm_key=None, token_budget=tb)),
            tb,
        )
    for shard, engine, tb in engines.values():  # warm-up
        engine.step(batch)
        forward_logprobs(shard, batch["input_ids"], mask, token_budget=tb)
    times: dict[str, list[float]] = {f"{k}_{c}": [] for k in engines for c in ("train", "inference")}
    for _ in range(reps):
        for name, (shard, engine, tb) in engines.items():
            times[f"{name}_train"].append(_timed(lambda e=engine: e.step(batch)))
            times[f"{name}_inference"].append(
                _timed(lambda s=shard, t=tb: forward_logprobs(s, batch["input_ids"], mask, token_budget=t))
            )
    for key, ts in times.items():
        out[key] = {"s": ts, "real_tok_s": real / min(ts)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench", choices=sorted(MODELS))
    ap.add_argument("--reps", type=int, default=3, help="timed runs per call in each process (default 3)")
    ap.add_argument(
        "--rounds", type=int, default=2, help="processes per side of each speed run, alternating (default 2)"
    )
    ap.add_argument("--world", type=int, default=4, help="processes of the multi-process run (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one-process run (default 2)")
    ap.add_argument("--only", choices=("speed", "memory", "packing"), default=None)
    ap.add_argument("--token-budget", type=int, default=512, help="packed row length of the packing run")
    ap.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    ap.add_argument(
        "--worlds", default=None, help="comma-separated process counts of the speed runs (default 1,WORLD)"
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (H200 bf16, measured: 790)"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    report: dict[str, Any] = {"model": args.model, "params": MODELS[args.model].num_params()}
    if args.only in (None, "speed"):
        worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else [1, args.world]
        for world in worlds:
            threads = args.threads if world == 1 else 1
            res = _speed(world, args.model, args.reps, args.precision, args.rounds, threads)
            report[f"speed_{world}"] = res
            print(
                f"\n{world} process(es), {MODELS[args.model].num_params() / 1e6:.1f}M parameters, {args.precision}"
            )
            print(
                "| call | ours (tokens/s) | transformers (tokens/s) | ours / transformers | ours MFU | peak memory ours / theirs |"
            )
            print("|---|---|---|---|---|---|")
            for name, r in res.items():
                ratio = r["ours_tok_s"] / r["theirs_tok_s"]
                mfu = ""
                if args.peak_tflops:
                    r["ours_mfu"] = r["flops"] / min(r["ours_s"]) / (world * args.peak_tflops * 1e12)
                    r["theirs_mfu"] = r["flops"] / min(r["theirs_s"]) / (world * args.peak_tflops * 1e12)
                    mfu = f"{r['ours_mfu']:.1%} (theirs {r['theirs_mfu']:.1%})"
                mem = f"{r['ours_peak_bytes'] / 1e6:.0f} / {r['theirs_peak_bytes'] / 1e6:.0f} MB"
                print(
                    f"| {name} | {r['ours_tok_s']:.0f} | {r['theirs_tok_s']:.0f} | {ratio:.2f}x | {mfu} | {mem} |"
                )
            print(f"generate: same tokens as transformers: {res['generate']['same_tokens']}")
    if args.only in (None, "memory"):
        print("\n| layout | precision | optimizer | measured peak / rank | planner | measured / planner |")
        print("|---|---|---|---|---|---|")
        rows = []
        for layout, precision, optimizer in MEMORY_CASES:
            world = Layout.parse(layout).size
            per_rank = spawn(_memory, world, args.model, layout, precision, optimizer, timeout_s=1800)
            measured = max(r["measured"] for r in per_rank)
            predicted = max(r["predicted"] for r in per_rank)
            rows.append(
                {
                    "layout": layout,
                    "precision": precision,
                    "optimizer": optimizer,
                    "measured": measured,
                    "predicted": predicted,
                }
            )
            print(
                f"| {layout} | {precision} | {optimizer} | {measured / 1e6:.0f} MB | {predicted / 1e6:.0f} MB "
                f"| {measured / predicted:.2f} |"
            )
        report["memory"] = rows
    if args.only in (None, "packing"):
        res = spawn(
            _packing, 1, args.model, args.reps, args.token_budget, threads=args.threads, timeout_s=1800
        )[0]
        report["packing"] = res
        print(
            f"\npacking: {res['rows']} rows of 16-{SEQ} tokens ({res['real_tokens']:.0f} real of "
            f"{res['padded_tokens']:.0f} padded), token budget {args.token_budget}"
        )
        print("| call | padded (real tokens/s) | packed (real tokens/s) | packed / padded |")
        print("|---|---|---|---|")
        for call in ("train", "inference"):
            a, b = res[f"padded_{call}"]["real_tok_s"], res[f"packed_{call}"]["real_tok_s"]
            print(f"| {call} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
