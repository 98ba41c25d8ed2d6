"""The CPU parity checks again on CUDA with NCCL: the same workers, references and assertions.

Each test runs a CPU test module's worker in a world of NCCL processes, one GPU each (``spawn``
picks NCCL when there are enough GPUs and pins rank ``r`` to ``cuda:r``; models are built with
``.cuda()`` there and every entry point moves its inputs to the model's device). Results are
moved to the CPU in the worker, after checking that every CUDA tensor came from the rank's own
GPU, and then compared exactly as the CPU tests compare them. Tests skip, with the reason, when
fewer GPUs than they need are present.

Tolerance: logits, log-probabilities and values must equal transformers' (fp32, on the CPU) within
``CUDA_ATOL = 1e-4``; cuBLAS and the CPU sum in different orders (the CPU tests measure ~1e-6 and
allow 1e-5), while a wrong head, vocabulary or pipeline split is off by more than 1e-2. Greedy
tokens and HF round trips must be exact; training keeps tests/test_train.py's tolerances.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_forward
import test_generate
import test_hf
import test_train
import test_vocab_padding
import torch
import torch.distributed as dist

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.generate import GenerationConfig, generate
from lightning_real.models.hf import (
    gather_canonical,
    load_hf,
    read_canonical,
    save_hf,
    save_tiny_hf,
    write_hf,
)
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import tiny_spec

pytestmark = pytest.mark.cuda

CUDA_ATOL = 1e-4


def _gpus(n: int) -> pytest.MarkDecorator:
    found = torch.cuda.device_count()
    return pytest.mark.skipif(
        found < n or not dist.is_nccl_available(),
        reason=f"needs {n} CUDA GPU{'s' if n > 1 else ''} with NCCL; this machine has {found}",
    )


# ---- running a CPU test's worker on CUDA ranks ----------------------------------------------------
def _to_cpu(x: Any, devices: set[torch.device]) -> Any:
    """``x`` with every tensor (inside dicts, lists and tuples) on the CPU; notes their devices."""
    if isinstance(x, torch.Tensor):
        devices.add(x.device)
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v, devices) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v, devices) for v in x)
    return x


def _on_cpu(rank: int, world: int, fn: Callable[..., Any], *args: Any) -> tuple[list[str], Any]:
    """Run a worker; return the CUDA devices its results came from and the results on the CPU."""
    devices: set[torch.device] = set()
    out = _to_cpu(fn(rank, world, *args), devices)
    return sorted(str(d) for d in devices if d.type == "cuda"), out


def cuda_spawn(fn: Callable[..., Any], world: int, *args: Any, **kwargs: Any) -> list[Any]:
    """``spawn`` on NCCL with results on the CPU; asserts rank ``r`` computed on ``cuda:r``."""
    per_rank = spawn(_on_cpu, world, fn, *args, backend="nccl", **kwargs)
    for rank, (devices, _) in enumerate(per_rank):
        assert set(devices) <= {f"cuda:{rank}"}, f"rank {rank} returned tensors from {devices}"
    return [out for _, out in per_rank]


# ---- one GPU: a single process against transformers on the CPU ------------------------------------
def _greedy_world(rank: int, world: int, eos: dict[str, dict[str, Any]]) -> dict:
    """tests/test_generate.py's greedy runs (every EOS choice) under d1t1p1."""
    reg = GroupRegistry()
    groups = reg.for_layout(Layout.parse("d1t1p1").resolve(world))
    ids, mask = test_generate._prompts()
    out: dict = {}
    for fam in test_generate.FAMILIES:
        shard = ModelShard.from_canonical(tiny_spec(fam), groups, test_generate._canonical(fam))
        for name, e in eos[fam].items():
            cfg = GenerationConfig(
                max_new_tokens=test_generate.NEW, greedy=True, eos_token_id=e, pad_token_id=test_generate.PAD
            )
            res = generate(shard, ids, mask, cfg)
            out[(fam, name, "d1t1p1")] = (0, test_generate.B, test_generate._as_tuple(res))
    return out


def _hf_world(rank: int, world: int, root: str) -> dict:
    """Load, gather and save the checkpoints of ``root`` under d1t1p1."""
    groups = GroupRegistry().for_layout(Layout.parse("d1t1p1").resolve(world))
    out: dict = {}
    for name, head in (("gpt2", "lm"), ("qwen2", "value")):
        shard = load_hf(Path(root) / f"{name}-src", groups, head=head)
        assert shard.module is not None
        out[name] = (str(next(shard.module.parameters()).device), gather_canonical(shard))
        save_hf(shard, Path(root) / f"{name}-out")
    return out


@_gpus(1)
def test_one_gpu_forward_matches_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_forward, "ATOL", CUDA_ATOL)
    results = cuda_spawn(test_forward._world, 1, ["d1t1p1"], False)
    test_forward._check(results, ["d1t1p1"], 1)


@_gpus(1)
def test_one_gpu_greedy_matches_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    eos = test_generate._eos_choices()
    results = cuda_spawn(_greedy_world, 1, eos)
    monkeypatch.setattr(test_generate, "GREEDY_LAYOUTS", ("d1t1p1",))
    test_generate.test_greedy_matches_transformers((eos, results))


@_gpus(1)
def test_one_gpu_hf_round_trip_is_bit_identical(tmp_path: Path) -> None:
    specs = {"gpt2": tiny_spec("gpt2"), "qwen2": tiny_spec("qwen2", "value")}
    for name, spec in specs.items():
        save_tiny_hf(spec, tmp_path / f"{name}-src", seed=9)
    (result,) = cuda_spawn(_hf_world, 1, str(tmp_path))
    for name, spec in specs.items():
        truth = random_canonical(spec, 9)
        device, gathered = result[name]
        assert device == "cuda:0"
        back = read_canonical(tmp_path / f"{name}-out", spec)
        for got in (gathered, back):
            assert sorted(got) == sorted(truth) and all(torch.equal(got[k], truth[k]) for k in truth)


# ---- two GPUs ------------------------------------------------------------------------------------------
@_gpus(2)
def test_two_gpus_forward_matches_transformers_and_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    """tp=2, pp=2, dp=2 and a one-rank layout in a 2-GPU world (tests/test_forward.py)."""
    monkeypatch.setattr(test_forward, "ATOL", CUDA_ATOL)
    monkeypatch.setattr(test_forward, "spawn", cuda_spawn)
    test_forward.test_two_processes_match_transformers_and_pack()


@_gpus(2)
def test_two_gpus_hf_export_round_trips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Per-stage export, bit-identical reload, errors on every rank (tests/test_hf.py)."""
    monkeypatch.setattr(test_hf, "ATOL", CUDA_ATOL)
    monkeypatch.setattr(test_hf, "spawn", cuda_spawn)
    test_hf.test_per_stage_export_loads_in_transformers(tmp_path)


@_gpus(2)
def test_two_gpus_padded_vocabulary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Odd vocabularies under tp=2: logits, greedy, sampling, export, realloc (tests/test_vocab_padding.py)."""
    for name, spec in test_vocab_padding.SPECS.items():
        write_hf(spec, test_vocab_padding._truth(spec), tmp_path / f"{name}-src")
    world = (tmp_path, cuda_spawn(test_vocab_padding._world, 2, str(tmp_path)))
    monkeypatch.setattr(test_vocab_padding, "ATOL", CUDA_ATOL)
    for name in test_vocab_padding.SPECS:
        test_vocab_padding.test_tp2_matches_transformers(world, name)
        test_vocab_padding.test_sampling_ignores_padding_and_tp(world, name)
        test_vocab_padding.test_export_gather_and_realloc_give_the_checkpoint_back(world, name)


# ---- four GPUs -----------------------------------------------------------------------------------------
def _train_world(rank: int, world: int, model: str) -> dict[str, Any]:
    """tests/test_train.py's steps under d1t2p2, and its plain-PyTorch reference on one GPU."""
    spec = test_train._spec(model)
    canonical = random_canonical(spec, seed=3)
    batch = test_train._batch(spec)
    reg = GroupRegistry()
    full, one = (reg.for_layout(Layout.parse(x).resolve(world)) for x in ("d1t2p2", "d1t1p1@0"))
    out = {"d1t2p2": test_train._train(ModelShard.from_canonical(spec, full, canonical), batch, 4, False)}
    if one.member:
        shard = ModelShard.from_canonical(spec, one, canonical)
        dev = next(shard.module.parameters()).device  # type: ignore[union-attr]
        # The reference builds its masks with plain factory calls: make them land on the GPU.
        with torch.device(dev):
            out["ref"] = test_train._reference(shard, {k: v.to(dev) for k, v in batch.items()})
    return out


@_gpus(4)
def test_four_gpus_forward_matches_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """tp=2 x pp=2, dp=2 x pp=2, dp=2 x tp=2 and uneven stages (tests/test_forward.py)."""
    monkeypatch.setattr(test_forward, "ATOL", CUDA_ATOL)
    monkeypatch.setattr(test_forward, "spawn", cuda_spawn)
    test_forward.test_four_processes_match_transformers()


@_gpus(4)
def test_four_gpus_generation_matches_transformers() -> None:
    """Greedy under every tp/pp/dp layout equals transformers' generate; seeded sampling agrees
    across layouts (tests/test_generate.py)."""
    eos = test_generate._eos_choices()
    runs = (eos, cuda_spawn(test_generate._world, 4, eos))
    test_generate.test_greedy_matches_transformers(runs)
    test_generate.test_eos_stops_rows_at_different_steps(runs)
    test_generate.test_sampling_is_seeded_and_layout_independent(runs)


@_gpus(4)
@pytest.mark.parametrize("model", test_train.MODELS)
def test_four_gpus_training_step_matches_single_gpu(monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    """Two AdamW steps under tp=2, pp=2 equal plain PyTorch on one GPU (tests/test_train.py)."""
    results = cuda_spawn(_train_world, 4, model)
    monkeypatch.setattr(test_train, "_run", lambda name: (results, 4))
    monkeypatch.setattr(test_train, "LAYOUTS", ["d1t2p2"])
    test_train.test_matches_single_process_reference(model)
