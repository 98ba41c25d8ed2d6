"""The PPO math end to end on one process: a random tiny llama learns the shipped task.

Generation and log-probs come from a transformers ``LlamaForCausalLM`` built from ``tiny_spec``
(no megatron, no process groups); rewards from the task's rule; advantages and losses from
``lightning_real.algorithms``. Everything is seeded, so the run is deterministic on one thread.
"""

from __future__ import annotations

import copy

import torch

from lightning_real.algorithms import PPOConfig, actor_loss, critic_loss, ppo_experience
from lightning_real.algorithms.sft import token_logprobs
from lightning_real.data.collate import collate_prompts
from lightning_real.data.datasets import PromptDataset
from lightning_real.data.task import asset, score_sequences
from lightning_real.data.tokenizer import byte_tokenizer
from lightning_real.models.spec import tiny_spec

GEN = 8  # new tokens per response
BATCH = 32


class _Critic(torch.nn.Module):
    def __init__(self, cfg) -> None:
        import transformers

        super().__init__()
        self.body = transformers.LlamaModel(cfg)
        self.head = torch.nn.Linear(cfg.hidden_size, 1)

    def forward(self, ids, am, pos):
        return self.head(
            self.body(input_ids=ids, attention_mask=am, position_ids=pos).last_hidden_state
        ).squeeze(-1)


def _logp(model, seq, am, pos):
    return token_logprobs(
        model(input_ids=seq, attention_mask=am, position_ids=pos).logits[:, :-1], seq[:, 1:]
    )


def _rollout(actor, tok, batch):
    """Sample responses; the masks and flags the ``actor_gen`` call writes."""
    p = batch["prompts"].shape[1]
    with torch.no_grad():
        out = actor.generate(
            input_ids=batch["prompts"],
            attention_mask=batch["prompt_mask"],
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=GEN,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    seq = torch.nn.functional.pad(out, (0, p + GEN - out.shape[1]), value=tok.pad_token_id)
    is_eos = seq[:, p:] == tok.eos_token_id
    resp = ((is_eos.cumsum(-1) - is_eos.long()) == 0).long()  # up to and including the first EOS
    am = torch.cat([batch["prompt_mask"], resp], 1)
    lm = torch.cat([torch.zeros_like(batch["prompt_mask"]), resp], 1)
    return seq, am, lm, (~is_eos.any(-1)).long()


def test_ppo_raises_the_task_reward_of_a_random_tiny_model():
    import transformers

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = byte_tokenizer()
        cfg_hf = tiny_spec("llama").to_hf_config()
        actor = transformers.LlamaForCausalLM(cfg_hf)
        ref = copy.deepcopy(actor).eval()
        critic = _Critic(cfg_hf)
        opt_a = torch.optim.AdamW(actor.parameters(), lr=3e-3)
        opt_c = torch.optim.AdamW(critic.parameters(), lr=6e-3)
        cfg = PPOConfig(kl_coef=0.01)
        ds = PromptDataset(asset("prompts"), tok)
        g = torch.Generator().manual_seed(0)
        rewards = []
        for _ in range(24):
            idx = torch.randint(len(ds), (BATCH,), generator=g).tolist()
            batch = collate_prompts([ds[i] for i in idx], tok.pad_token_id)
            seq, am, lm, no_eos = _rollout(actor, tok, batch)
            pos = (am.cumsum(-1) - 1).clamp(min=0)
            scores = score_sequences(tok, seq, am, lm)
            mask = lm[:, 1:]
            with torch.no_grad():
                old, ref_lp, values = (
                    _logp(actor, seq, am, pos),
                    _logp(ref, seq, am, pos),
                    critic(seq, am, pos),
                )
            exp = ppo_experience(scores, values, old, ref_lp, mask, no_eos, cfg)
            rewards.append(exp.metrics["reward/mean"])
            for _ in range(2):  # two optimizer steps on the batch; the second is off-policy and clipped
                loss, _ = actor_loss(_logp(actor, seq, am, pos), old, exp.advantages, mask, cfg)
                opt_a.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
                opt_a.step()
                vloss, _ = critic_loss(critic(seq, am, pos)[:, :-1], exp.values, exp.returns, mask, cfg)
                opt_c.zero_grad()
                vloss.backward()
                opt_c.step()
    finally:
        torch.set_num_threads(threads)
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    # A uniform policy over 259 tokens scores about 0.03; writing letters at all is worth 0.25+.
    assert first < 0.06
    assert last > first + 0.1, rewards
