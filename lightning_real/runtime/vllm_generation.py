"""``engine.generation_backend=vllm``: generate calls sampled by an in-process vLLM engine.

One engine per data-parallel replica of the generate call (each rank of a ``dNt1p1`` layout),
started on the first call. Before every call the engine takes the call shard's current weights
by the *full-tensor path*: the shard's tensors under their HF names, loaded with vLLM's
in-place reload (each call says so in the log with the bytes and seconds). The direct path
(the reallocation plan writing into vLLM's fused ``qkv_proj`` / ``gate_up_proj`` slices) is not
built yet.

What this backend returns follows the native contract: ``response_logprobs`` are recomputed
with the call shard's forward at the configured temperature (the engine's own log-probs are
raw, at temperature 1); at temperature 1 the mean absolute gap between the two is kept in
``last_logprob_diff``. Sampling streams are vLLM's, seeded per row from the step's seed and the
row's global index, so samples do not depend on the layout, but they are not the native
generator's samples; greedy tokens are the same.

Limits, each refused with the option named: pipeline parallelism and tensor parallelism of the
generate call (vLLM's own tensor parallelism over a replica's ranks is not wired), a generate
layout that does not span the whole ``torch.distributed`` world (vLLM builds its groups over the
whole world, collectively, so every rank must start an engine at the same time).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.layout import Layout
from lightning_real.models.forward import forward_logprobs
from lightning_real.models.generate import GenerationConfig, GenerationOutput, mix_seed
from lightning_real.models.hf_convert import canonical_to_hf
from lightning_real.models.shard import ModelShard
from lightning_real.runtime.vllm_engine import VllmConfig, VllmEngine, VllmUnavailable, import_vllm

log = logging.getLogger(__name__)


def check_vllm_layout(layout: Layout, world_size: int, call: str) -> None:
    """Refuse a generate layout this backend cannot run, naming the option."""
    if layout.pp != 1 or layout.tp != 1:
        raise VllmUnavailable(
            f"engine.generation_backend=vllm: generate call {call!r} runs on {layout} (tp={layout.tp}, "
            f"pp={layout.pp}); this backend runs one tensor-parallel-1 engine per data-parallel replica: "
            "allowed: a dNt1p1 layout for the call, or engine.generation_backend=native"
        )
    if layout.size != world_size:
        raise VllmUnavailable(
            f"engine.generation_backend=vllm: generate call {call!r} runs on {layout}, {layout.size} "
            f"of the {world_size} ranks; vLLM builds its process groups over the whole torch.distributed "
            "world, so the call's layout must span every rank; allowed: a layout over all ranks, or "
            "engine.generation_backend=native"
        )


def full_hf_tensors(shard: ModelShard) -> dict[str, torch.Tensor]:
    """The shard's whole model under HF names (a tp=1, pp=1 shard holds every canonical tensor)."""
    if shard.layout.tp != 1 or shard.layout.pp != 1:
        raise VllmUnavailable(f"the full-tensor path reads a tp=1, pp=1 shard; this one is on {shard.layout}")
    canonical: dict[str, torch.Tensor] = {}
    for ps, p in shard.params():
        canonical.setdefault(ps.key, ps.from_locals([p.detach()]))
    return canonical_to_hf(shard.spec, canonical)


class VllmGenerator:
    """Generate calls through one vLLM engine on this rank (its data-parallel replica)."""

    backend = "vllm"

    def __init__(self, rounds: int = 1, config: VllmConfig | None = None) -> None:
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"VllmGenerator rounds={rounds!r}; allowed: an integer >= 1")
        # vLLM batches continuously within its KV-cache budget: the plan's rounds do not split the
        # rows here.
        self.rounds = rounds
        self.config = config or VllmConfig()
        self.engine: VllmEngine | None = None
        self.last_update: tuple[int, float] | None = None
        """(bytes, seconds) of the latest weight update."""
        self.last_logprob_diff: float | None = None
        """Mean absolute gap between the engine's and the shard's log-probs of the latest call's
        response tokens (at temperature 1 only; None otherwise)."""
        import_vllm()  # a missing extra fails when the runtime is built, not at the first call

    def _engine(self, shard: ModelShard) -> VllmEngine:
        if self.engine is None:
            dtype = next(p for _, p in shard.params()).dtype
            self.engine = VllmEngine(shard.spec, dtype, self.config)
            log.info("vLLM engine started in %.1f s", self.engine.start_s)
        return self.engine

    def update_weights(self, shard: ModelShard) -> tuple[int, float]:
        """Load ``shard``'s current weights into the engine (full-tensor path); (bytes, seconds)."""
        engine = self._engine(shard)
        nbytes, seconds = engine.load_weights(full_hf_tensors(shard).items())
        if self.last_update is None:
            # Once, where a run's log shows it (Lightning's rank-zero logger): every call updates.
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            rank_zero_info(
                f"vLLM weight update: full-tensor path (load by HF names), {nbytes} bytes per replica "
                "before every generate call (the direct path through the reallocation plan is not built)"
            )
        self.last_update = (nbytes, seconds)
        log.info(
            "vLLM weight update: full-tensor path (load by HF names), %d bytes in %.3f s", nbytes, seconds
        )
        return nbytes, seconds

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
        self.update_weights(shard)
        engine = self._engine(shard)
        b = prompts.shape[0]
        if config.seed is None:
            base = int(torch.randint(0, 2**62, (1,), dtype=torch.long).item())
        else:
            base = config.seed
        first = shard.groups.dp_rank * b if row_offset is None else row_offset
        mask = prompt_mask.bool().cpu()
        ids = prompts.cpu()
        rows = [ids[i][mask[i]].tolist() for i in range(b)]
        params = [self.sampling_params(config, mix_seed(base, first + i)) for i in range(b)]
        outs = engine.generate(rows, params[0] if config.greedy else params)
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
