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

Each measurement is the best of ``--reps`` interleaved repetitions (ours, theirs, ours, ...), tokens
per second over all processes. Memory (``--only memory``): the peak bytes per rank of two training
steps for several layout x precision x optimizer cases (``PeakMemory``: glibc's heap on CPU,
``max_memory_allocated`` on CUDA), beside the planner's prediction for the same call
(:func:`lightning_real.planner.memory.call_memory`).

Run: ``python benchmarks/engine.py [--reps 3] [--world 4] [--only speed|memory] [--json out.json]``
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
from lightning_real.models.vocab_parallel import vocab_parallel_logprobs
from lightning_real.planner.flops import forward_flops, generate_flops, train_flops
from lightning_real.planner.memory import call_memory

MODELS = {
    # hidden, layers, heads, kv heads, ffn, vocab
    "bench": ModelSpec("llama", 8192, 512, 8, 8, 4, 1408, max_position_embeddings=512),
    "small": ModelSpec("llama", 4096, 256, 4, 4, 2, 704, max_position_embeddings=512),
    "0.5b": ModelSpec("llama", 32000, 1024, 24, 16, 8, 2816, max_position_embeddings=2048),
}
TRAIN_BATCH, SEQ = 8, 256
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
        lp = vocab_parallel_logprobs(out[:, :-1], mb["input_ids"][:, 1:], tp)
        return -lp.sum(), {}

    return loss


def _speed(rank: int, world: int, model: str, reps: int, precision: str) -> dict[str, Any]:
    spec = MODELS[model]
    dev = device()
    canonical = random_canonical(spec, seed=0)
    reg = GroupRegistry()
    groups = reg.for_layout(Layout(world, 1, 1, tuple(range(world))))
    dtype = torch.float32 if precision == "32-true" else torch.bfloat16
    ours = ModelShard.from_canonical(spec, groups, canonical, BuildOptions(dtype=dtype, attention="sdpa"))
    engine = TrainEngine(
        ours,
        _sft_loss(groups.tp),
        TrainConfig(optim=OPT, norm_key=None, distributed_optimizer=world > 1, precision=precision),  # type: ignore[arg-type]
    )
    # transformers' side: fp32 parameters under bf16 autocast for training (Lightning's bf16-mixed),
    # a bf16 copy for inference and generation
    theirs = hf_model(spec, canonical).to(dev).train()
    frozen = theirs if dtype == torch.float32 else hf_model(spec, canonical).to(dev, dtype)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype != torch.float32)
    ddp: Any = theirs
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(theirs)
    opt = torch.optim.AdamW(theirs.parameters(), lr=OPT.lr, betas=OPT.betas, eps=OPT.eps)

    per = TRAIN_BATCH // world
    ids = _ids(TRAIN_BATCH, SEQ, spec.vocab_size, 1)[rank * per : (rank + 1) * per].to(dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = float(TRAIN_BATCH * SEQ)

    def ours_train() -> None:
        engine.step(batch)

    def theirs_train() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = ddp(ids).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        (-lp.sum() / (TRAIN_BATCH / world)).backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), OPT.max_grad_norm)
        opt.step()

    iper = INFER_BATCH // world
    iids = _ids(INFER_BATCH, SEQ, spec.vocab_size, 2)[rank * iper : (rank + 1) * iper].to(dev)
    imask = torch.ones_like(iids)

    def ours_infer() -> None:
        forward_logprobs(ours, iids, imask)

    def theirs_infer() -> None:
        with torch.no_grad():
            logits = frozen(iids).logits.float()
            torch.log_softmax(logits[:, :-1], -1).gather(-1, iids[:, 1:, None])

    gper = GEN_BATCH // world
    gids = _ids(GEN_BATCH, GEN_PROMPT, spec.vocab_size, 3)[rank * gper : (rank + 1) * gper].to(dev)
    gmask = torch.ones_like(gids)
    cfg = GenerationConfig(max_new_tokens=GEN_NEW, greedy=True, eos_token_id=None, pad_token_id=0)
    out: dict[str, Any] = {}

    def ours_gen() -> None:
        out["ours"] = generate(ours, gids, gmask, cfg).tokens

    def theirs_gen() -> None:
        with torch.no_grad():
            frozen.eval()
            out["theirs"] = frozen.generate(
                gids,
                attention_mask=gmask,
                max_new_tokens=GEN_NEW,
                min_new_tokens=GEN_NEW,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            frozen.train()

    cases = {
        "train": (ours_train, theirs_train, tokens),
        "inference": (ours_infer, theirs_infer, float(INFER_BATCH * SEQ)),
        "generate": (ours_gen, theirs_gen, float(GEN_BATCH * GEN_NEW)),
    }
    flops = {
        "train": train_flops(spec, TRAIN_BATCH, SEQ),
        "inference": forward_flops(spec, INFER_BATCH, SEQ),
        "generate": generate_flops(spec, GEN_BATCH, GEN_PROMPT, GEN_NEW),
    }
    result: dict[str, Any] = {}
    for name, (a, b, n) in cases.items():
        a(), b()  # warm-up
        ta, tb, ma, mb = [], [], 0, 0
        for _ in range(reps):
            with PeakMemory() as pa:
                ta.append(_timed(a))
            with PeakMemory() as pb:
                tb.append(_timed(b))
            ma, mb = max(ma, pa.peak), max(mb, pb.peak)
        result[name] = {
            "ours_tok_s": n / min(ta),
            "theirs_tok_s": n / min(tb),
            "ours_s": ta,
            "theirs_s": tb,
            "ours_peak_bytes": ma,
            "theirs_peak_bytes": mb,
            "flops": flops[name],
        }
    result["generate"]["same_tokens"] = bool(torch.equal(out["ours"].cpu(), out["theirs"].cpu()))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench", choices=sorted(MODELS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--world", type=int, default=4, help="processes of the multi-process run (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one-process run (default 2)")
    ap.add_argument("--only", choices=("speed", "memory"), default=None)
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
            res = spawn(
                _speed, world, args.model, args.reps, args.precision, threads=threads, timeout_s=1800
            )[0]
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
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
