"""CPU demo: one actor trains under one layout and is reallocated to others, on 4 gloo processes.

1. writes a tiny LLaMA-family checkpoint in HF format (random weights, nothing downloaded);
2. loads it as a megatron-core model under the training layout ``d2t2p1`` (4 ranks);
3. takes one SFT step (AdamW) under that layout;
4. moves the trained parameters to the layouts a generation call would use (``d1t1p4``,
   ``d4t1p1``) and to two ranks only (``d1t2p1@2-3``), checking each time that the logits equal
   the training layout's, and reporting the bytes sent against the lower bound;
5. exports the trained actor as an HF checkpoint that ``transformers`` loads.

Run: ``.venv/bin/python examples/realloc_demo.py [--out runs/demo]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.forward import forward_logits
from lightning_real.models.hf import load_hf, save_hf, save_tiny_hf
from lightning_real.models.optim import OptimConfig
from lightning_real.models.spec import tiny_spec
from lightning_real.models.train import TrainConfig, TrainEngine, split_for_dp
from lightning_real.models.vocab_parallel import vocab_parallel_logprobs
from lightning_real.realloc import Reallocator

TRAIN = "d2t2p1"
TARGETS = ["d1t1p4", "d4t1p1", "d1t2p1@2-3"]


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (8, 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones(8, 23)}


def _worker(rank: int, world: int, ckpt: str, out: str) -> list[str]:
    reg = GroupRegistry()
    layouts = [Layout.parse(s).resolve(world) for s in [TRAIN, *TARGETS]]
    for lay in layouts:  # groups are created collectively, in one order, on every rank
        reg.for_layout(lay)
    train_lay = layouts[0]
    actor = load_hf(ckpt, reg.for_layout(train_lay))
    lines: list[str] = []

    def sft_loss(out, mb):
        lp = vocab_parallel_logprobs(out[:, :-1], mb["input_ids"][:, 1:], engine.tp_group)
        return -(lp * mb["loss_mask"]).sum(), {}

    engine = TrainEngine(actor, sft_loss, TrainConfig(optim=OptimConfig(lr=1e-3)))
    g = actor.groups
    batch = _batch()
    metrics = engine.step(split_for_dp(batch, train_lay.dp, g.dp_rank)) if actor.member else {}
    if metrics:
        lines.append(
            f"SFT step under {train_lay}: loss {metrics['loss']:.4f}, grad norm {metrics['grad_norm']:.4f}"
        )
    probe = batch["input_ids"][:2]
    ref = forward_logits(actor, probe, torch.ones_like(probe)) if actor.member else None
    realloc = Reallocator(actor.spec, reg)
    realloc.adopt(actor)
    for lay in layouts[1:]:
        t0 = time.perf_counter()
        dst = realloc.move(train_lay, lay, keep_source=True)
        dt = time.perf_counter() - t0
        plan = realloc.plan(train_lay, lay)
        if dst.member:
            logits = forward_logits(dst, probe, torch.ones_like(probe))
            if ref is not None:
                err = float((logits - ref).abs().max())
                lines.append(
                    f"move {train_lay} -> {lay}: {plan.bytes_sent / 1e6:.2f} MB sent "
                    f"(lower bound {plan.lower_bound_bytes / 1e6:.2f} MB), {dt * 1e3:.0f} ms, "
                    f"max |logits - training layout's| = {err:.1e}"
                )
        realloc.release(lay)
    save_hf(actor, out)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/realloc-demo", help="folder for the checkpoints")
    args = ap.parse_args()
    out = Path(args.out)
    spec = tiny_spec("llama", num_layers=4, hidden_size=128, num_heads=8, num_kv_heads=4, ffn_hidden_size=256)
    ckpt = save_tiny_hf(spec, out / "actor-init", seed=0)
    print(f"tiny actor: {spec.num_params() / 1e6:.2f}M parameters, HF checkpoint at {ckpt}")
    t0 = time.time()
    results = spawn(_worker, 4, str(ckpt), str(out / "actor-trained"))
    seen: set[str] = set()
    for lines in results:  # ranks report what they took part in; print each event once
        for line in lines:
            head = line.split(":")[0]
            if head not in seen:
                seen.add(head)
                print(line)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out / "actor-trained")
    print(
        f"transformers loaded the exported actor: {type(model).__name__} ({time.time() - t0:.1f} s on 4 processes)"
    )


if __name__ == "__main__":
    main()
