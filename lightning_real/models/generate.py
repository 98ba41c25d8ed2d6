"""Batched autoregressive generation with a KV cache under any tensor/pipeline layout.

Each data-parallel replica generates for the rows it is given. The prompt is run once
(prefill), then one token per step is decoded against a KV cache
(:class:`lightning_real.models.decode.StageDecoder`): every stage keeps the keys and values of
its own layers.
Hidden states go stage to stage with point-to-point messages, the last stage samples, and
the sampled tokens are broadcast over the pipeline group so the first stage can embed them
and every stage agrees on when all rows have finished.

Sampling is vocab-parallel: a tensor-parallel rank only holds ``V/tp`` logits. Greedy and
plain sampling reduce each slice to one candidate (Gumbel-max: ``argmax(z - log E)`` with
``E ~ Exp(1)``); top-k gathers ``k`` candidates per rank; only top-p without top-k gathers the
whole vocabulary. The noise ``E`` is drawn for the full vocabulary from a generator seeded
the same on every rank of the replica, so all tensor ranks pick the same token and the same
seed yields the same tokens under any tp/pp split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.models.decode import StageDecoder
from lightning_real.models.forward import attention_mask_4d, position_ids
from lightning_real.models.shard import ModelShard


@dataclass(frozen=True)
class GenerationConfig:
    """How to extend prompts."""

    max_new_tokens: int = 32
    """Most tokens generated per row (the response width of the output)."""
    greedy: bool = False
    """Take the most likely token at every step (temperature, top_k, top_p then only affect logprobs)."""
    temperature: float = 1.0
    """Logits are divided by this before sampling and before computing the returned logprobs."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches top_p (after top_k); 1 disables."""
    eos_token_id: int | tuple[int, ...] | None = None
    """Token id(s) that end a response; None generates max_new_tokens for every row."""
    pad_token_id: int = 0
    """Id written after a row's end (and expected as left padding in prompts)."""
    seed: int | None = None
    """Sampling seed, mixed with the data-parallel index so replicas draw different noise;
    None draws a fresh seed from the torch RNG of the replica's first rank."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"GenerationConfig.max_new_tokens={self.max_new_tokens!r}; must be an integer >= 1"
            )
        if not self.temperature > 0:
            raise ValueError(f"GenerationConfig.temperature={self.temperature!r}; must be > 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"GenerationConfig.top_k={self.top_k!r}; must be 0 (off) or a positive integer")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p={self.top_p!r}; must be in (0, 1] (1 = off)")
        if any(not isinstance(t, int) or t < 0 for t in self.eos_ids):
            raise ValueError(
                f"GenerationConfig.eos_token_id={self.eos_token_id!r}; must be None, a token id or a tuple of ids"
            )

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids as a tuple (empty when none)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)


@dataclass(frozen=True)
class GenerationOutput:
    """Prompts and their responses, identical on every rank of the replica, on the model's device."""

    tokens: torch.Tensor
    """[b, s + max_new_tokens] long: the left-padded prompt, then the response, then pad."""
    response_logprobs: torch.Tensor
    """[b, max_new_tokens] float32: log-probability of each response token under the
    unfiltered policy at the configured temperature, ``log_softmax(logits / temperature)``
    (top-k/top-p filtering is not applied); 0 where ``response_mask`` is 0."""
    response_mask: torch.Tensor
    """[b, max_new_tokens] long: 1 for response tokens up to and including the EOS."""
    response_lengths: torch.Tensor
    """[b] long: number of response tokens (EOS included)."""
    truncated: torch.Tensor
    """[b] bool: the row reached max_new_tokens without an EOS."""

    @property
    def prompt_length(self) -> int:
        """Width of the (left-padded) prompt part of ``tokens``."""
        return self.tokens.shape[1] - self.response_mask.shape[1]


# ---- checks ---------------------------------------------------------------------------------------
def _check_inputs(
    shard: ModelShard, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: GenerationConfig
) -> None:
    if shard.module is None:
        raise RuntimeError(f"rank {shard.groups.rank} is not in layout {shard.layout}; it cannot generate")
    if shard.spec.head != "lm":
        raise ValueError(f"generate needs an 'lm' head; this model's head is {shard.spec.head!r}")
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} must both be [batch, seq]"
        )
    m = prompt_mask.long()
    if ((m != 0) & (m != 1)).any():
        raise ValueError("prompt_mask must hold only 0 (padding) and 1 (token)")
    if (m[:, 1:] < m[:, :-1]).any():
        raise ValueError("prompts must be left-padded: prompt_mask must be 0...0 1...1 in every row")
    if (m[:, -1] == 0).any():
        raise ValueError("every prompt needs at least one token (a row of prompt_mask is all 0)")
    total = prompt_ids.shape[1] + cfg.max_new_tokens
    if total > shard.spec.max_position_embeddings:
        raise ValueError(
            f"prompt width {prompt_ids.shape[1]} + max_new_tokens {cfg.max_new_tokens} = {total} exceeds "
            f"the model's max_position_embeddings={shard.spec.max_position_embeddings}"
        )


# ---- sampling -------------------------------------------------------------------------------------
def _replica_seed(shard: ModelShard, seed: int | None, device: torch.device, per_row: bool = False) -> int:
    """One seed shared by the replica's ranks; different per data-parallel replica unless ``per_row``
    (then rows carry their own streams, keyed by their global index)."""
    g = shard.groups
    if seed is None:
        t = torch.randint(0, 2**62, (1,), dtype=torch.long).to(device)
        if shard.layout.tp * shard.layout.pp > 1:
            dist.broadcast(t, shard.layout.rank_at(g.dp_rank, 0, 0), group=g.mp)
        seed = int(t.item())
    if per_row:
        return seed % (2**63)
    return mix_seed(seed, g.dp_rank)


def mix_seed(seed: int, index: int) -> int:
    """The sampling seed of stream ``index`` (a replica or a global row) under ``seed``."""
    # Odd 64-bit multiplier: distinct (seed, index) pairs give distinct streams.
    return (seed * 0x9E3779B97F4A7C15 + index) % (2**63)


class VocabParallelSampler:
    """Next tokens from logits split over a tensor-parallel group; every tp rank gets the same answer.

    Tensor-parallel rank ``r`` holds logit columns ``r*V/tp ... (r+1)*V/tp - 1``. Per call:
    one all-gather of a few candidates per rank and one all-reduce for the log-probabilities
    (top-p without top-k gathers the whole slice instead of candidates).
    """

    def __init__(
        self,
        config: GenerationConfig,
        vocab_size: int,
        seed: int,
        device: torch.device,
        tp_group: Any = None,
        rows: tuple[int, int] | None = None,
    ) -> None:
        self.cfg = config
        self.vocab = vocab_size
        self.group = tp_group
        self.tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        # One stream per global row index: a row's draws do not depend on which replica holds it.
        self.row_gens = (
            None
            if rows is None
            else [torch.Generator(device=device).manual_seed(mix_seed(seed, r)) for r in range(*rows)]
        )

    def _noise(self, b: int, device: torch.device) -> torch.Tensor:
        """``log E`` with ``E ~ Exp(1)`` for every row and every token id of the full vocabulary."""
        if self.row_gens is None:
            return torch.empty(b, self.vocab, device=device).exponential_(generator=self.gen).log_()
        if len(self.row_gens) != b:
            raise RuntimeError(f"sampler made for {len(self.row_gens)} rows got {b}")
        rows = [torch.empty(self.vocab, device=device).exponential_(generator=g) for g in self.row_gens]
        return torch.stack(rows).log_()

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every tp rank's ``x`` along the last dimension."""
        if self.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, -1)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` [b, V/tp] (this rank's slice) -> (tokens [b], log-probs [b] at the temperature)."""
        cfg = self.cfg
        b, width = logits.shape
        # A padded vocabulary's slices reach past the vocabulary; its padding logits are -inf.
        if width * self.tp < self.vocab:
            raise RuntimeError(
                f"logit slice of width {width} x tp={self.tp} does not cover vocab {self.vocab}"
            )
        z = logits.float() / cfg.temperature
        lo = self.tp_rank * width
        noise = None
        if not cfg.greedy:
            # Full-vocabulary noise indexed by global token id: the draw does not depend on tp.
            noise = torch.nn.functional.pad(self._noise(b, z.device), (0, width * self.tp - self.vocab))
        if cfg.greedy or (cfg.top_k == 0 and cfg.top_p == 1.0):
            # Gumbel-max: argmax(z - log E) is a draw from softmax(z); each rank offers its best.
            score = z if noise is None else z - noise[:, lo : lo + width]
            best, idx = score.max(-1, keepdim=True)
            zmax = z.max(-1, keepdim=True).values
            # float64 carries scores and ids exactly: one collective instead of three.
            cand = self._gather(torch.cat([best, idx + lo, zmax], -1).double()).view(b, self.tp, 3)
            pick = cand[:, :, 0].argmax(-1, keepdim=True)
            tokens = cand[:, :, 1].gather(-1, pick).squeeze(-1).long()
            top = cand[:, :, 2].amax(-1).float()
        else:
            assert noise is not None
            tokens, top = self._filtered(z, lo, noise)
        return tokens, self._logprob(z, tokens, lo, top)

    def _filtered(self, z: torch.Tensor, lo: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k / top-p draw over candidates gathered from every tp rank; also the global max of ``z``."""
        cfg = self.cfg
        b, width = z.shape
        if cfg.top_k > 0:
            vals, ids = z.topk(min(cfg.top_k, width), -1)
            ids = ids + lo
        else:
            vals = z
            ids = torch.arange(lo, lo + width, device=z.device).expand_as(z)
        n = vals.shape[-1]
        cand = self._gather(torch.cat([vals, ids], -1).double()).view(b, self.tp, 2, n)
        vals = cand[:, :, 0].reshape(b, -1).float()
        ids = cand[:, :, 1].reshape(b, -1).long()
        # The global top-k lies within the union of every rank's local top-k.
        k = min(cfg.top_k, vals.shape[-1]) if cfg.top_k > 0 else vals.shape[-1]
        vals, order = vals.topk(k, -1)
        ids = ids.gather(-1, order)
        top = vals[:, 0]
        if cfg.top_p < 1.0:
            probs = vals.softmax(-1)
            before = probs.cumsum(-1) - probs
            vals = vals.masked_fill(before >= cfg.top_p, float("-inf"))  # the most likely always stays
        pick = (vals - noise.gather(-1, ids)).argmax(-1, keepdim=True)
        return ids.gather(-1, pick).squeeze(-1), top

    def _logprob(self, z: torch.Tensor, tokens: torch.Tensor, lo: int, top: torch.Tensor) -> torch.Tensor:
        """``log_softmax(z)[tokens]`` over the full vocabulary; ``top`` is the global max of ``z``."""
        z = z - top[:, None]
        local = tokens - lo
        inside = (local >= 0) & (local < z.shape[-1])
        picked = z.gather(-1, local.clamp(0, z.shape[-1] - 1)[:, None]).squeeze(-1)
        picked = torch.where(inside, picked, torch.zeros_like(picked))  # may be a -inf padding column
        # One all-reduce for both sums: the picked logit lives on exactly one rank.
        sums = torch.stack([picked, z.exp().sum(-1)], 0)
        if self.tp > 1:
            dist.all_reduce(sums, group=self.group)
        return sums[0] - sums[1].log()


# ---- generation -----------------------------------------------------------------------------------
def generate(
    shard: ModelShard,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: GenerationConfig,
    row_offset: int | None = None,
) -> GenerationOutput:
    """Extend left-padded prompts [b, s] by up to ``config.max_new_tokens`` tokens.

    Every rank of one data-parallel replica calls this with the same prompts; every one of
    them gets the same output. Stops early once every row has produced an EOS (the output
    keeps its full width, padded).

    ``row_offset``: the global index of this replica's first row. Given, every row samples from
    its own stream seeded by (seed, global row index), so a batch draws the same tokens under
    any layout, data-parallel degree included (RLHF runs rely on it to compare plans). None:
    one stream per replica (faster with many rows).
    """
    _check_inputs(shard, prompt_ids, prompt_mask, config)
    g, lay = shard.groups, shard.layout
    runner = StageDecoder(shard, prompt_ids.shape[0], prompt_ids.shape[1] + config.max_new_tokens)
    device = runner.device
    ids = prompt_ids.to(device).long()
    pmask = prompt_mask.to(device).long()
    b, s = ids.shape
    new = config.max_new_tokens
    last = g.is_last_stage
    # Collective when seed is None: every rank of the replica takes part, not only the samplers.
    per_row = row_offset is not None
    seed = 0 if config.greedy else _replica_seed(shard, config.seed, device, per_row)
    tp_group = g.tp if lay.tp > 1 else None
    rows = (row_offset, row_offset + b) if row_offset is not None and not config.greedy else None
    sampler = (
        VocabParallelSampler(config, shard.spec.vocab_size, seed, device, tp_group, rows) if last else None
    )
    last_rank = lay.rank_at(g.dp_rank, g.tp_rank, lay.pp - 1)
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=device)

    response = torch.full((b, new), config.pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(b, new, dtype=torch.float32, device=device)
    alive = torch.ones(b, new, dtype=torch.long, device=device)  # response_mask
    done = torch.zeros(b, dtype=torch.bool, device=device)
    hit_eos = torch.zeros(b, dtype=torch.bool, device=device)
    # Keys a decode query may attend to: the prompt's real tokens and every generated one.
    visible = torch.cat([pmask.bool(), torch.ones(b, new, dtype=torch.bool, device=device)], 1)
    lengths = pmask.sum(1)

    # No padding: the prefill is plainly causal (SDPA's causal kernel, no mask built).
    prefill_mask = None if bool(pmask.all()) else ~attention_mask_4d(pmask)
    with torch.no_grad():
        step_ids, step_pos, step_mask = ids, position_ids(pmask), prefill_mask
        for t in range(new):
            logits = runner(step_ids, step_pos, step_mask)
            tok = torch.empty(b, dtype=torch.long, device=device)
            if last:
                assert sampler is not None and logits is not None
                tok, lp = sampler(logits)
                tok = tok.masked_fill(done, config.pad_token_id)
                logprobs[:, t] = lp.masked_fill(done, 0.0)
            if lay.pp > 1:
                dist.broadcast(tok, last_rank, group=g.pp)
            alive[:, t] = (~done).long()
            response[:, t] = tok
            is_eos = torch.isin(tok, eos) & ~done
            hit_eos |= is_eos
            done |= is_eos
            if bool(done.all()) or t == new - 1:
                break
            # The next step feeds this token at sequence index s + t.
            step_ids = tok[:, None]
            step_pos = (lengths + t)[:, None]
            # Without padding every cached key is visible: no mask to build or apply.
            step_mask = None if prefill_mask is None else visible[:, None, None, : s + t + 1]

    alive[:, t + 1 :] = 0
    if lay.pp > 1:
        # Log-probabilities live on the last stage only; one broadcast at the end.
        dist.broadcast(logprobs, last_rank, group=g.pp)
    return GenerationOutput(
        tokens=torch.cat([ids, response], 1),
        response_logprobs=logprobs,
        response_mask=alive,
        response_lengths=alive.sum(1),
        truncated=~hit_eos,
    )
