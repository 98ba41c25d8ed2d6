"""Training steps under parallel layouts, checked against one process on real gloo groups.

One spawned world of 4 processes per model runs the same two training steps (AdamW, clipping,
warm-up) from the same canonical weights and global batch under d1t2p2, d2t1p1, d1t1p2, d1t2p1
and the engine on one process, beside a plain-PyTorch reference on one process (full-vocabulary
log-softmax, ``loss.backward()``, ``clip_grad_norm_``, ``torch.optim.AdamW``). Loss, grad norm,
metrics, the clipped gradients and the updated weights, gathered back to canonical tensors, must
match the reference. The batch is left-padded unevenly, so replicas hold different token counts.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.optim import OptimConfig, decays, lr_at
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import WORD_EMBEDDINGS, ParamSpec, random_canonical
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.models.train import TrainConfig, TrainEngine, split_for_dp
from lightning_real.models.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs

WORLD = 4
B, S = 8, 12
PAD = [5, 0, 3, 0, 0, 7, 0, 0]  # left padding per row: replicas of d2 get 10 and 5 padded slots
OPT = OptimConfig(lr=2e-3, eps=1e-6, weight_decay=0.1, max_grad_norm=0.5, warmup_steps=2)
STEPS = 2

# (name, layout, n_mbs) run one after another; runs in one tuple share the world concurrently
# on disjoint ranks. "ref" is the plain-PyTorch reference.
PHASES: list[list[tuple[str, str, int]]] = [
    [("d1t2p2", "d1t2p2", 4)],
    [("d2t1p1", "d2t1p1@0-1", 2), ("d1t1p2", "d1t1p2@2-3", 3)],
    [("d1t2p1", "d1t2p1@0-1", 1), ("ref", "d1t1p1@2", 1), ("d1t1p1", "d1t1p1@3", 2)],
]


def _spec(name: str) -> ModelSpec:
    return {
        "llama": tiny_spec("llama"),  # GQA: 4 query heads, 2 kv heads
        "gpt2": tiny_spec("gpt2"),  # tied embeddings, learned positions, biases
        "qwen2-value": tiny_spec("qwen2", "value"),
    }[name]


def _batch(spec: ModelSpec) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, spec.vocab_size, (B, S), generator=gen)
    pad = torch.ones(B, S, dtype=torch.long)
    for r, n in enumerate(PAD):
        pad[r, :n] = 0
    labels = torch.roll(ids, -1, dims=1)
    # Predict the next real token: not from padding, not past the end.
    loss_mask = pad * torch.roll(pad, -1, dims=1)
    loss_mask[:, -1] = 0
    returns = torch.randn(B, S, generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": pad,
        "labels": labels,
        "loss_mask": loss_mask,
        "returns": returns,
    }


def _lm_loss(tp_group: Any, output: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple:
    m = mb["loss_mask"].float()
    logp = vocab_parallel_logprobs(output, mb["labels"], tp_group)
    ent = vocab_parallel_entropy(output, tp_group)
    return -(logp * m).sum(), {"entropy": (ent.detach() * m).sum()}


def _value_loss(output: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple:
    m = mb["loss_mask"].float()
    return 0.5 * ((output.squeeze(-1).float() - mb["returns"]) ** 2 * m).sum(), {}


def _snapshot(shard: ModelShard, grads: bool = False) -> list[tuple[ParamSpec, torch.Tensor]]:
    return [(ps, (p.grad if grads else p).detach().clone()) for ps, p in shard.params()]


def _reference(shard: ModelShard, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Plain PyTorch on one process: full-vocabulary loss over the whole batch, no microbatches."""
    model = shard.module
    params = shard.params()
    opt = torch.optim.AdamW(
        [
            {"params": [p for ps, p in params if decays(ps)], "weight_decay": OPT.weight_decay},
            {"params": [p for ps, p in params if not decays(ps)], "weight_decay": 0.0},
        ],
        lr=OPT.lr,
        betas=OPT.betas,
        eps=OPT.eps,
        foreach=False,
    )
    pad = batch["attention_mask"]
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
    mask = causal.view(1, 1, S, S) | (pad == 0).view(B, 1, 1, S)
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    m = batch["loss_mask"].float()
    out: dict[str, Any] = {"metrics": [], "params": [], "grads": []}
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        y = model(batch["input_ids"], pos, mask).float()
        if shard.spec.head == "lm":
            logp_all = torch.log_softmax(y, dim=-1)
            logp = logp_all.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
            loss = -(logp * m).sum() / m.sum()
            ent = -(logp_all.exp() * logp_all).sum(-1)
            extra = {"entropy": float((ent * m).sum().detach() / m.sum())}
        else:
            loss = 0.5 * ((y.squeeze(-1) - batch["returns"]) ** 2 * m).sum() / m.sum()
            extra = {}
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.max_grad_norm)
        for g in opt.param_groups:
            g["lr"] = lr_at(OPT, step)
        opt.step()
        out["metrics"].append({"loss": float(loss.detach()), "grad_norm": float(norm), **extra})
        out["params"].append(_snapshot(shard))
        out["grads"].append(_snapshot(shard, grads=True))
    return out


def _train(shard: ModelShard, batch: dict[str, torch.Tensor], n_mbs: int, resume: bool) -> dict[str, Any]:
    """STEPS engine steps; with ``resume`` also re-run the last step from a saved checkpoint."""
    spec, g = shard.spec, shard.groups
    loss_fn = functools.partial(_lm_loss, g.tp) if spec.head == "lm" else _value_loss
    cfg = TrainConfig(n_mbs=n_mbs, optim=OPT)
    engine = TrainEngine(shard, loss_fn, cfg)
    local = split_for_dp(batch, g.layout.dp, g.dp_rank)
    out: dict[str, Any] = {"coords": g.coords, "metrics": [], "params": [], "grads": []}
    saved: tuple[bytes, list] | None = None
    for step in range(STEPS):
        if resume and step == STEPS - 1:
            buf = io.BytesIO()
            torch.save(engine.state_dict(), buf)
            saved = (buf.getvalue(), _snapshot(shard))
        out["metrics"].append(engine.step(local))
        out["params"].append(_snapshot(shard))
        out["grads"].append(_snapshot(shard, grads=True))
    if saved is not None:
        # Restore the weights and a fresh engine's optimizer from the checkpoint, redo the step.
        with torch.no_grad():
            for (_, p), (_, w) in zip(shard.params(), saved[1]):
                p.copy_(w)
        again = TrainEngine(shard, loss_fn, cfg)
        again.load_state_dict(torch.load(io.BytesIO(saved[0]), weights_only=False))
        out["resumed_metrics"] = again.step(local)
        out["resumed_params"] = _snapshot(shard)
        exp_avg = again.optimizer.state[shard.params()[0][1]]["exp_avg"]
        out["state_shape"] = (tuple(exp_avg.shape), tuple(shard.params()[0][1].shape))
    return out


def _loss_curve(shard: ModelShard, batch: dict[str, torch.Tensor], steps: int) -> list[float]:
    g = shard.groups
    cfg = TrainConfig(n_mbs=2, optim=OptimConfig(lr=1e-2, max_grad_norm=1.0))
    engine = TrainEngine(shard, functools.partial(_lm_loss, g.tp), cfg)
    local = split_for_dp(batch, g.layout.dp, g.dp_rank)
    return [engine.step(local)["loss"] for _ in range(steps)]


def _world(rank: int, world: int, model: str, curve_steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    spec = _spec(model)
    canonical = random_canonical(spec, seed=3)
    batch = _batch(spec)
    registry = GroupRegistry()
    layouts = [Layout.parse(text).resolve(world) for phase in PHASES for _, text, _ in phase]
    registry.build(layouts)  # same order on every rank
    results: dict[str, Any] = {}
    for phase in PHASES:
        for name, text, n_mbs in phase:
            groups = registry.for_layout(Layout.parse(text).resolve(world))
            if not groups.member:
                # Ranks outside the layout return at once with nothing to report.
                outside = TrainEngine(ModelShard.build(spec, groups), _value_loss)
                results[f"{name}_outside"] = outside.step(batch)
                continue
            shard = ModelShard.from_canonical(spec, groups, canonical)
            if name == "ref":
                results[name] = _reference(shard, batch)
            else:
                results[name] = _train(shard, batch, n_mbs, resume=name == "d1t2p2")
        dist.barrier()
    if curve_steps:
        groups = registry.for_layout(layouts[0])
        results["curve"] = _loss_curve(ModelShard.from_canonical(spec, groups, canonical), batch, curve_steps)
    return results


def _canonical(entries: list[tuple[tuple[int, int, int], list[tuple[ParamSpec, torch.Tensor]]]], dp: int = 0):
    """Reassemble canonical tensors from the ranks of replica ``dp`` (first stage wins for tied keys)."""
    parts: dict[str, dict[int, torch.Tensor]] = {}
    specs: dict[str, ParamSpec] = {}
    for (d, t, _), plist in sorted(entries, key=lambda e: e[0][2]):
        if d != dp:
            continue
        for ps, x in plist:
            if ps.key in specs and specs[ps.key].local_name != ps.local_name:
                continue  # the tied output copy; checked separately
            specs[ps.key] = ps
            parts.setdefault(ps.key, {})[t] = x
    return {k: specs[k].from_locals([v[t] for t in sorted(v)]) for k, v in parts.items()}


@functools.cache
def _run(model: str) -> tuple[list[dict[str, Any]], int]:
    return spawn(_world, WORLD, model, 10 if model == "llama" else 0), WORLD


def _results(model: str, name: str) -> list[dict[str, Any]]:
    per_rank, _ = _run(model)
    return [r[name] for r in per_rank if name in r]


MODELS = ["llama", "gpt2", "qwen2-value"]
LAYOUTS = ["d1t2p2", "d2t1p1", "d1t1p2", "d1t2p1", "d1t1p1"]


@pytest.mark.parametrize("model", MODELS)
def test_matches_single_process_reference(model: str) -> None:
    (ref,) = _results(model, "ref")
    ref_params = [_canonical([((0, 0, 0), ref["params"][s])]) for s in range(STEPS)]
    ref_grads = [_canonical([((0, 0, 0), ref["grads"][s])]) for s in range(STEPS)]
    w0 = random_canonical(_spec(model), seed=3)
    for name in LAYOUTS:
        runs = _results(model, name)
        assert runs, name
        for s in range(STEPS):
            # fp32 throughout; sums are re-ordered by tp all-reduces, microbatches and dp averaging.
            for r in runs:
                got, want = r["metrics"][s], ref["metrics"][s]
                assert set(got) == set(want) | {"lr"}, (name, got)
                for k in want:
                    assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-6), (name, s, k, got, want)
                assert got["lr"] == pytest.approx(lr_at(OPT, s), rel=1e-12)
                assert r["metrics"][s] == runs[0]["metrics"][s], "metrics differ between ranks"
            entries = [(r["coords"], r["grads"][s]) for r in runs]
            grads = _canonical(entries)
            params = _canonical([(r["coords"], r["params"][s]) for r in runs])
            assert set(grads) == set(ref_grads[s]) == set(params)
            for k in params:
                # Clipped gradients: atol 1e-7 on values of order 1e-3 (about 1e-4 relative).
                torch.testing.assert_close(grads[k], ref_grads[s][k], atol=1e-7, rtol=1e-4, msg=f"{name} {k}")
                # Weights after AdamW: atol 2e-6 against per-step moves of lr = 1e-3..2e-3.
                torch.testing.assert_close(params[k], ref_params[s][k], atol=2e-6, rtol=0, msg=f"{name} {k}")
        # Every key moved (the step did something to every tensor).
        assert all(not torch.equal(params[k], w0[k]) for k in params), name


@pytest.mark.parametrize("model", MODELS)
def test_replicas_and_tied_copies_stay_equal(model: str) -> None:
    for name in ("d2t1p1", "d1t2p2", "d1t1p2"):
        runs = _results(model, name)
        # Data-parallel replicas hold identical weights after every step (bitwise).
        lay = Layout.parse(name)
        for s in range(STEPS):
            by_dp = [_canonical([(r["coords"], r["params"][s]) for r in runs], dp=d) for d in range(lay.dp)]
            for d in range(1, lay.dp):
                for k in by_dp[0]:
                    assert torch.equal(by_dp[0][k], by_dp[d][k]), (name, k)
            if _spec(model).tied_embeddings and lay.pp > 1:
                first = [x for r in runs for ps, x in r["params"][s] if ps.local_name == WORD_EMBEDDINGS]
                copy = [x for r in runs for ps, x in r["params"][s] if ps.local_name == "output_layer.weight"]
                assert len(first) == len(copy) == lay.tp * lay.dp
                # Same tp order on both stages: runs are listed in rank order.
                for a, b in zip(first, copy):
                    assert torch.equal(a, b), name


def test_ranks_outside_a_layout_get_nothing() -> None:
    per_rank, _ = _run("qwen2-value")
    outside = [v for r in per_rank for k, v in r.items() if k.endswith("_outside")]
    # Idle ranks per run: d2t1p1, d1t1p2 and d1t2p1 leave 2 each, the two one-rank runs 3 each.
    assert len(outside) == 2 + 2 + 2 + 3 + 3 and all(v == {} for v in outside)


@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_resume_is_exact(model: str) -> None:
    for r in _results(model, "d1t2p2"):
        assert r["resumed_metrics"] == r["metrics"][-1]
        for (ps, a), (_, b) in zip(r["resumed_params"], r["params"][-1]):
            assert torch.equal(a, b), ps.local_name
        # The optimizer state is this rank's shard, not the full tensor.
        assert r["state_shape"][0] == r["state_shape"][1]


def test_loss_goes_down() -> None:
    curves = _results("llama", "curve")
    assert len(curves) == WORLD and all(c == curves[0] for c in curves)
    c = curves[0]
    assert c[-1] < 0.8 * c[0], c
    assert sum(b < a for a, b in itertools.pairwise(c)) >= 8, c


def test_vocab_parallel_helpers_without_groups() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    lp = vocab_parallel_logprobs(logits, labels, None)
    full = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(lp, full.gather(-1, labels.unsqueeze(-1)).squeeze(-1), atol=1e-6, rtol=0)
    ent = vocab_parallel_entropy(logits, None)
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1), atol=1e-6, rtol=0)
    # Gradient of the entropy against autograd through the plain formula (atol 1e-6, fp32 math).
    (g1,) = torch.autograd.grad(ent.sum(), logits)
    ref = torch.log_softmax(logits, -1)
    (g2,) = torch.autograd.grad(-(ref.exp() * ref).sum(), logits)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


def test_bad_config_is_named() -> None:
    with pytest.raises(ValueError, match=r"TrainConfig\.n_mbs"):
        TrainConfig(n_mbs=0)
    with pytest.raises(ValueError, match=r"OptimConfig\.max_grad_norm"):
        OptimConfig(max_grad_norm=-1.0)
    with pytest.raises(ValueError, match=r"OptimConfig\.lr"):
        OptimConfig(lr=0.0)
    with pytest.raises(ValueError, match=r"OptimConfig\.min_lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3)


def test_lr_schedule() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=4, decay_steps=10, min_lr=0.1)
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 4) == 1.0
    assert lr_at(cfg, 9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cfg, 14) == pytest.approx(0.1) and lr_at(cfg, 100) == pytest.approx(0.1)
