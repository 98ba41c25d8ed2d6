"""``engine.generation_backend=vllm``: generate calls sampled by in-process vLLM engines.

One engine per data-parallel replica of the generate call, started on the first call: on a
``dNt1p1`` layout one per rank, on ``dNtTp1`` one tensor-parallel engine over the ``T`` ranks of
each replica (an engine object per rank, vLLM's ``external_launcher``; vLLM's tensor-parallel
groups are consecutive ranks, as a layout's are, and this is checked when it starts). Before every
call each rank writes its own tensor-parallel shard of the call's copy into its engine
(:mod:`~lightning_real.runtime.vllm_weights`: the *direct path*, no communication); a tensor
whose rows vLLM splits differently from megatron (a vocabulary padded differently) is gathered
over the replica's tensor-parallel group instead (the *full-tensor path*), and the log names it.

What this backend returns follows the native contract: ``response_logprobs`` are recomputed
with the call shard's forward at the configured temperature (the engine's own log-probs are
raw, at temperature 1); at temperature 1 the mean absolute gap between the two is kept in
``last_logprob_diff``. Sampling streams are vLLM's, seeded per row from the step's seed and the
row's global index, so samples do not depend on the layout, but they are not the native
generator's samples; greedy tokens are the same.

Limits, each refused with the option named: pipeline parallelism of the generate call, a
generate layout that does not span the whole ``torch.distributed`` world (vLLM builds its groups
over the whole world, collectively, so every rank must start an engine at the same time).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.layout import Layout
from lightning_real.models.forward import forward_logprobs
from lightning_real.models.generate import GenerationConfig, GenerationOutput, mix_seed
from lightning_real.models.hf_convert import hf_names
from lightning_real.models.shard import ModelShard
from lightning_real.runtime.vllm_engine import VllmConfig, VllmEngine, VllmUnavailable, import_vllm
from lightning_real.runtime.vllm_weights import EngineFeed, WeightUpdate, gathered_keys

log = logging.getLogger(__name__)


def check_vllm_layout(layout: Layout, world_size: int, call: str) -> None:
    """Refuse a generate layout this backend cannot run, naming the option."""
    if layout.pp != 1:
        raise VllmUnavailable(
            f"engine.generation_backend=vllm: generate call {call!r} runs on {layout} (tp={layout.tp}, "
            f"pp={layout.pp}); this backend runs one vLLM engine per data-parallel replica, tensor-parallel "
            "over the replica's ranks, without pipeline parallelism: allowed: a dNtTp1 layout for the "
            "call, or engine.generation_backend=native"
        )
    if layout.size != world_size:
        raise VllmUnavailable(
            f"engine.generation_backend=vllm: generate call {call!r} runs on {layout}, {layout.size} "
            f"of the {world_size} ranks; vLLM builds its process groups over the whole torch.distributed "
            "world, so the call's layout must span every rank; allowed: a layout over all ranks, or "
            "engine.generation_backend=native"
        )


def check_vllm_placement(engine_rank: int, engine_ranks: tuple[int, ...], shard: ModelShard) -> None:
    """Refuse an engine whose tensor-parallel rank or group differs from the shard's: it would
    read another rank's slices of every tensor."""
    g = shard.groups
    want = tuple(shard.layout.rank_at(g.dp_rank, t, 0) for t in range(shard.layout.tp))
    if engine_rank != g.tp_rank or engine_ranks != want:
        raise VllmUnavailable(
            f"engine.generation_backend=vllm: on rank {g.rank}, vLLM's tensor-parallel rank is "
            f"{engine_rank} in ranks {list(engine_ranks)}, the layout {shard.layout}'s is {g.tp_rank} in "
            f"ranks {list(want)}; vLLM groups consecutive ranks of the world; allowed: a dNtTp1 layout "
            "whose ranks are in order, or engine.generation_backend=native"
        )


def _announce(shard: ModelShard, gather: frozenset[str]) -> None:
    """Say once, where a run's log shows it (Lightning's rank-zero logger), how weights reach vLLM."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    msg = (
        "vLLM weight update: direct path (each rank writes its own tensor-parallel shard into its "
        f"engine, no communication) before every generate call on {shard.layout}"
    )
    if gather:
        names = sorted(n for k in gather for n in hf_names(shard.spec, k))
        msg += (
            f"; full-tensor path (gathered over the tensor-parallel group) for {', '.join(names)}: vLLM "
            "splits their vocabulary rows differently from megatron (its padding to a multiple of 64 "
            f"against pad_vocab_to_multiple_of={shard.spec.pad_vocab_to_multiple_of} x tp)"
        )
    rank_zero_info(msg)


def _base_seed(shard: ModelShard, seed: int | None) -> int:
    """The call's sampling seed, the same on every rank of a replica."""
    if seed is not None:
        return seed
    t = torch.randint(0, 2**62, (1,), dtype=torch.long)
    if shard.layout.tp > 1:
        # The replica's engines run one schedule each: they must draw the same tokens.
        dist.broadcast(t, shard.layout.rank_at(shard.groups.dp_rank, 0, 0), group=shard.groups.tp)
    return int(t.item())


class VllmGenerator:
    """Generate calls through one vLLM engine on this rank (its part of its data-parallel replica)."""

    backend = "vllm"

    def __init__(self, rounds: int = 1, config: VllmConfig | None = None) -> None:
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"VllmGenerator rounds={rounds!r}; allowed: an integer >= 1")
        # vLLM batches continuously within its KV-cache budget: the plan's rounds do not split the
        # rows here.
        self.rounds = rounds
        self.config = config or VllmConfig()
        self.engine: VllmEngine | None = None
        self._gather: frozenset[str] = frozenset()
        """Canonical keys the direct path cannot serve on this engine (gathered instead)."""
        self._layout: Layout | None = None
        """The generate layout the engine serves."""
        self.last_update: WeightUpdate | None = None
        """What the latest weight update did on this rank."""
        self.last_release_bytes = 0
        """Bytes of weights and KV cache the engine freed on this rank after the latest call
        (``VllmConfig.release``)."""
        self.last_logprob_diff: float | None = None
        """Mean absolute gap between the engine's and the shard's log-probs of the latest call's
        response tokens (at temperature 1 only; None otherwise)."""
        import_vllm()  # a missing extra fails when the runtime is built, not at the first call

    def _engine(self, shard: ModelShard) -> VllmEngine:
        if self.engine is None:
            dtype = next(p for _, p in shard.params()).dtype
            engine = VllmEngine(shard.spec, dtype, self.config, tp=shard.layout.tp)
            self.engine = engine
            log.info("vLLM engine (tp=%d) started in %.1f s", engine.tp, engine.start_s)
            check_vllm_placement(*engine.tp_placement(), shard)
            self._gather = gathered_keys(shard, engine.vocab_rows_per_rank())
            self._layout = shard.layout
            _announce(shard, self._gather)
        elif shard.layout != self._layout:
            raise VllmUnavailable(
                f"engine.generation_backend=vllm: the engine was started for a copy on {self._layout}; "
                f"this call's copy is on {shard.layout}; allowed: one generate layout per engine"
            )
        return self.engine

    def update_weights(self, shard: ModelShard, full: bool = False) -> WeightUpdate:
        """Write ``shard``'s current weights into the engine (collective over the replica's
        tensor-parallel group when a tensor is gathered).

        ``full``: every tensor by the full-tensor path (gathered), the reference the direct path
        is checked against.
        """
        engine = self._engine(shard)
        engine.restore_weights()  # a released engine gets its weights back first, the cache later
        gather = frozenset(ps.key for ps, _ in shard.params()) if full else self._gather
        feed = EngineFeed(shard, gather)
        loaded, seconds = engine.load_weights(feed)
        update = feed.record(loaded, seconds)
        self.last_update = update
        log.info(
            "vLLM weight update: %s path, %d bytes sent, %d bytes of the shard written, %d bytes loaded, "
            "in %.3f s",
            update.path,
            update.bytes_sent,
            update.bytes_local,
            update.bytes_loaded,
            seconds,
        )
        return update

    def sampling_params(self, config: GenerationConfig, seed: int) -> Any:
        """vLLM's SamplingParams for ``config`` with the given row seed."""
        from vllm.sampling_params import SamplingParams

        greedy = config.greedy
        return SamplingParams(
            n=1,
            max_tokens=config.max_new_tokens,
            temperature=0.0 if greedy else config.temperature,
            top_k=0 if greedy else config.top_k,
            top_p=1.0 if greedy else config.top_p,
            stop_token_ids=list(config.eos_ids),
            ignore_eos=not config.eos_ids,
            logprobs=0,
            detokenize=False,
            seed=None if greedy else seed,
        )

    def generate(
        self,
        shard: ModelShard,
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        config: GenerationConfig,
        row_offset: int | None,
    ) -> GenerationOutput:
        if shard.module is None:
            raise RuntimeError(
                f"rank {shard.groups.rank} is not in layout {shard.layout}; it cannot generate"
            )
        world = dist.get_world_size() if dist.is_initialized() else 1
        check_vllm_layout(shard.layout, world, "generate")
        # Weights first (the update writes them), the KV cache second, as late as possible.
        self.update_weights(shard)
        engine = self._engine(shard)
        engine.restore_cache()
        b = prompts.shape[0]
        base = _base_seed(shard, config.seed)
        first = shard.groups.dp_rank * b if row_offset is None else row_offset
        mask = prompt_mask.bool().cpu()
        ids = prompts.cpu()
        rows = [ids[i][mask[i]].tolist() for i in range(b)]
        params = [self.sampling_params(config, mix_seed(base, first + i)) for i in range(b)]
        outs = engine.generate(rows, params[0] if config.greedy else params)
        if self.config.release:
            # Every other call of the iteration runs on these devices (the engine spans the world).
            self.last_release_bytes = engine.release()
        return self._assemble(shard, prompts, prompt_mask, config, outs)

    def _assemble(
        self,
        shard: ModelShard,
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        config: GenerationConfig,
        outs: list[Any],
    ) -> GenerationOutput:
        b, s = prompts.shape
        n = config.max_new_tokens
        device = prompts.device
        resp = torch.full((b, n), config.pad_token_id, dtype=torch.long)
        rmask = torch.zeros(b, n, dtype=torch.long)
        engine_lp = torch.zeros(b, n, dtype=torch.float32)
        eos = set(config.eos_ids)
        truncated = torch.zeros(b, dtype=torch.bool)
        for i, o in enumerate(outs):
            c = o.outputs[0]
            toks = list(c.token_ids)[:n]
            resp[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            rmask[i, : len(toks)] = 1
            if c.logprobs is not None:
                for j, (tok, d) in enumerate(zip(toks, c.logprobs)):
                    engine_lp[i, j] = d[tok].logprob
            truncated[i] = len(toks) == n and not (toks and toks[-1] in eos)
        tokens = torch.cat([prompts.cpu(), resp], 1).to(device)
        rmask = rmask.to(device)
        attn = torch.cat([prompt_mask.long().to(device), rmask], 1)
        # The native contract: log_softmax(logits / temperature) of each response token, from the
        # call shard (the engine's are raw, temperature 1).
        lp = forward_logprobs(shard, tokens, attn, temperature=config.temperature)[:, s - 1 :].float()
        lp = lp * rmask
        if config.temperature == 1.0 and rmask.any():
            gap = (lp.cpu() - engine_lp).abs()[rmask.cpu().bool()]
            self.last_logprob_diff = float(gap.mean())
        else:
            self.last_logprob_diff = None
        return GenerationOutput(
            tokens=tokens,
            response_logprobs=lp,
            response_mask=rmask,
            response_lengths=rmask.sum(1),
            truncated=truncated.to(device),
        )

    def close(self) -> None:
        """Drop the engine (see :meth:`VllmEngine.close`)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
