"""PPO, GRPO, ReMax, DPO, SFT and reward-model math against values computed by hand.

Tolerance: 1e-6 absolute (float32 arithmetic on numbers of order 1) unless a test says otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_real.algorithms import (
    AdaptiveKLController,
    DPOConfig,
    FixedKLController,
    GRPOConfig,
    PPOConfig,
    RunningMeanStd,
    compute_gae,
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    group_advantages,
    grpo_loss,
    kl_controller,
    kl_per_token,
    masked_mean,
    masked_whiten,
    pairwise_loss,
    policy_loss,
    ppo_experience,
    remax_advantages,
    sequence_logps,
    sft_loss,
    shape_scores,
    split_values,
    token_logprobs,
    token_rewards,
    value_loss,
)

TOL = 1e-6


def close(x, y, tol: float = TOL) -> bool:
    return torch.allclose(
        torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32), atol=tol
    )


# ---- GAE -------------------------------------------------------------------------------------
R = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
V = torch.tensor([[0.5, 0.6, 0.7, 0.8]])
# gamma 0.9, lam 0.5, by hand:
# d3 = 1 - 0.8 = 0.2                  A3 = 0.2
# d2 = 0.9*0.8 - 0.7 = 0.02           A2 = 0.02 + 0.45*0.2    = 0.11
# d1 = 0.9*0.7 - 0.6 = 0.03           A1 = 0.03 + 0.45*0.11   = 0.0795
# d0 = 0.9*0.6 - 0.5 = 0.04           A0 = 0.04 + 0.45*0.0795 = 0.075775
ADV = torch.tensor([[0.075775, 0.0795, 0.11, 0.2]])


def test_gae_by_hand():
    adv, ret = compute_gae(R, V, torch.ones(1, 4), gamma=0.9, lam=0.5)
    assert close(adv, ADV)
    assert close(ret, ADV + V)


def test_gae_bootstraps_a_truncated_row():
    # V_next after the last token = 2: d3 = 1 + 0.9*2 - 0.8 = 2.0, A2 = 0.02 + 0.45*2 = 0.92,
    # A1 = 0.03 + 0.45*0.92 = 0.444, A0 = 0.04 + 0.45*0.444 = 0.2398
    adv, _ = compute_gae(R, V, torch.ones(1, 4), 0.9, 0.5, bootstrap=torch.tensor([2.0]))
    assert close(adv, [[0.2398, 0.444, 0.92, 2.0]])


def test_gae_skips_masked_positions():
    # Left padding, a hole in the middle and right padding: same advantages on the real tokens.
    r = torch.tensor([[9.0, 0.0, 0.0, 7.0, 0.0, 1.0, 5.0]])
    v = torch.tensor([[9.0, 0.5, 0.6, 7.0, 0.7, 0.8, 5.0]])
    m = torch.tensor([[0, 1, 1, 0, 1, 1, 0]])
    adv, ret = compute_gae(r, v, m, 0.9, 0.5)
    assert close(adv[m.bool()], ADV[0])
    assert close(adv[~m.bool()], 0.0) and close(ret[~m.bool()], 0.0)


def test_split_values_takes_the_value_after_the_last_action():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    v, boot = split_values(values, mask, no_eos=torch.tensor([1, 1]))
    assert close(v, [[1.0, 2.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    assert close(boot, [3.0, 5.0])
    _, boot = split_values(values, mask, no_eos=torch.tensor([0, 1]))
    assert close(boot, [0.0, 5.0])
    _, boot = split_values(values, mask, no_eos=torch.tensor([1, 1]), truncation="penalty")
    assert close(boot, [0.0, 0.0])


# ---- rewards and KL ------------------------------------------------------------------------------
def test_kl_estimators():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log-ratio r = 0.5
    assert close(kl_per_token(lp, ref, "k1"), [0.5])
    assert close(kl_per_token(lp, ref, "k2"), [0.125])
    assert close(kl_per_token(lp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5])


def test_token_rewards_put_the_score_on_the_last_token():
    lp = torch.tensor([[-1.0, -2.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards, kl = token_rewards(torch.tensor([2.0]), lp, ref, mask, kl_coef=0.1)
    # kl = [0.5, -0.5, 0, (masked)]; rewards = -0.1*kl + score on token 2
    assert close(kl, [[0.5, -0.5, 0.0, 0.0]])
    assert close(rewards, [[-0.05, 0.05, 2.0, 0.0]])


def test_shape_scores_penalty_scaling_and_clip():
    cfg = PPOConfig(truncation="penalty", truncation_penalty=-1.0, reward_clip=1.5)
    out = shape_scores(torch.tensor([0.5, 3.0, 2.0]), torch.tensor([1, 0, 1]), cfg)
    assert close(out, [-0.5, 1.5, 1.0])
    cfg = PPOConfig(reward_scaling="normalize", reward_clip=None)
    norm = RunningMeanStd()
    out = shape_scores(torch.tensor([1.0, 3.0]), torch.tensor([0, 0]), cfg, norm)
    assert close(out, [-1.0, 1.0], 1e-4)  # mean 2, population std 1 (eps 1e-8 in the std)
    with pytest.raises(ValueError, match="needs a RunningMeanStd"):
        shape_scores(torch.tensor([1.0]), torch.tensor([0]), cfg)


def test_running_mean_std_matches_the_whole_stream():
    torch.manual_seed(0)
    a, b = torch.randn(7) * 3 + 1, torch.randn(13) - 2
    rms = RunningMeanStd()
    rms.update(a)
    rms.update(b)
    both = torch.cat([a, b]).double()
    assert abs(rms.mean - float(both.mean())) < 1e-9
    assert abs(rms.var - float(both.var(unbiased=False))) < 1e-9
    assert rms.count == 20


def test_kl_controllers_move_the_right_way():
    up = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    up.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2: x (1 + 0.2 * 100 / 10000)
    assert abs(up.value - 0.1 * 1.002) < 1e-12
    down = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    down.update(current_kl=3.0, n_steps=100)  # error -0.5 clipped to -0.2
    assert abs(down.value - 0.1 * 0.998) < 1e-12
    near = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    near.update(current_kl=6.6, n_steps=1000)  # error 0.1: x 1.01
    assert abs(near.value - 0.101) < 1e-12
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    assert isinstance(kl_controller(PPOConfig(adaptive_kl=True)), AdaptiveKLController)


# ---- whitening -----------------------------------------------------------------------------------
def test_masked_whiten_has_mean_0_std_1_under_the_mask():
    torch.manual_seed(0)
    x = torch.randn(4, 9) * 5 + 3
    mask = torch.rand(4, 9) > 0.4
    x = torch.where(mask, x, torch.full_like(x, 1000.0))  # values off the mask must not matter
    w = masked_whiten(x, mask)
    vals = w[mask]
    assert abs(float(vals.mean())) < 1e-5
    assert abs(float(vals.std(unbiased=False)) - 1.0) < 1e-5
    assert float(w[~mask].abs().max()) == 0.0


# ---- losses ---------------------------------------------------------------------------------------
def test_policy_loss_clipping():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    logp.requires_grad_(True)
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 4), clip_eps=0.2)
    # per token: max(-A r, -A clip(r)): [-1.2 (clipped), 1.5, -0.5, 0.8 (clipped)]
    assert close(loss, (-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert close(m["actor/pg_clipfrac"], 0.5)
    assert close(m["actor/ppo_kl"], -(2 * math.log(1.5) + 2 * math.log(0.5)) / 4)
    loss.backward()
    # clipped tokens carry no gradient; the others d(-A r)/dlogp = -A r / 4
    assert close(logp.grad, [[0.0, 1.5 / 4, -0.5 / 4, 0.0]])


def test_policy_loss_dual_clip_and_sum_reduction():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[5.0, 1.0]]))
    adv = torch.tensor([[-1.0, 2.0]])
    loss, _ = policy_loss(logp, old, adv, torch.ones(1, 2), clip_eps=0.2, dual_clip=3.0, reduction="sum")
    # token 0: max(5, 1.2) = 5 capped at -c A = 3; token 1: ratio 1 -> -2
    assert close(loss, 3.0 - 2.0)
    # asymmetric clip: ratio 1.5 with A=1 is clipped at 1 + 0.28
    loss, _ = policy_loss(
        torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.28
    )
    assert close(loss, -1.28)


def test_value_loss_clipping():
    values = torch.tensor([[1.5, 1.1]])
    old = torch.tensor([[1.0, 1.0]])
    ret = torch.tensor([[2.0, 2.0]])
    loss, m = value_loss(values, old, ret, torch.ones(1, 2), clip_eps=0.2)
    # token 0: clipped 1.2 -> max(0.25, 0.64); token 1 inside the clip: 0.81
    assert close(loss, 0.5 * (0.64 + 0.81) / 2)
    assert close(m["critic/vf_clipfrac"], 0.5)
    loss, _ = value_loss(values, old, ret, torch.ones(1, 2), clip_eps=None)
    assert close(loss, 0.5 * (0.25 + 0.81) / 2)


def test_entropy_and_explained_variance():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, -30.0]])
    ent = entropy_from_logits(logits)
    assert close(ent[0], math.log(4))
    assert close(ent[1], torch.distributions.Categorical(logits=logits[1]).entropy(), 1e-5)
    ret = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.0), ret, mask) == pytest.approx(0.0, abs=1e-6)
    # residual [0.5, -0.5, 0.5]: var 2/9 against var(returns) 2/3 -> 1 - 1/3
    assert explained_variance(ret - torch.tensor([[0.5, -0.5, 0.5, 0.0]]), ret, mask) == pytest.approx(
        2 / 3, abs=1e-6
    )


def test_ppo_experience_without_kl_or_whitening():
    cfg = PPOConfig(kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False)
    values = torch.tensor([[0.0, 0.2, 0.4, 0.6, 9.0]])  # 5 positions, 4 actions
    mask = torch.tensor([[0, 1, 1, 1]])
    lp = torch.zeros(1, 4)
    exp = ppo_experience(torch.tensor([1.0]), values, lp, lp, mask, torch.tensor([0]), cfg)
    # gamma = lam = 1, no bootstrap: A_t = score - V_t on the three response actions
    assert close(exp.advantages, [[0.0, 0.8, 0.6, 0.4]])
    assert close(exp.returns, [[0.0, 1.0, 1.0, 1.0]])
    assert exp.metrics["reward/mean"] == 1.0 and exp.metrics["response_length/mean"] == 3.0
    # truncated and bootstrapped: the value after the last action (9.0) is added
    exp = ppo_experience(torch.tensor([1.0]), values, lp, lp, mask, torch.tensor([1]), cfg)
    assert close(exp.returns, [[0.0, 10.0, 10.0, 10.0]])
    assert exp.metrics["response_length/clip_ratio"] == 1.0


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match=r"PPOConfig.truncation='drop'; allowed: bootstrap, penalty"):
        PPOConfig(truncation="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"PPOConfig.kl_estimator='k4'; allowed: k1, k2, k3"):
        PPOConfig(kl_estimator="k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"GRPOConfig.group_size=1"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match=r"DPOConfig.beta=0"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match=r"reduction='max'; allowed: mean, sum"):
        policy_loss(
            torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), reduction="max"
        )  # type: ignore[arg-type]


# ---- GRPO, ReMax -----------------------------------------------------------------------------------
def test_group_advantages():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(scores, 4, eps=0.0 + 1e-12)
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal -> 0
    a = 0.5 / math.sqrt(1 / 3)
    assert close(adv, [a, -a, -a, a, 0, 0, 0, 0], 1e-5)
    assert close(group_advantages(scores, 4, scale_by_std=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(scores, 3)


def test_grpo_loss_adds_the_k3_kl_per_sequence():
    cfg = GRPOConfig(group_size=2, kl_coef=0.1)
    lp = torch.zeros(2, 3)
    ref = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, m = grpo_loss(lp, lp, ref, torch.tensor([1.0, -1.0]), mask, cfg)
    # ratio 1: pg per token = -A; kl k3 with r = lp - ref = -0.5: exp(0.5) - 1 - 0.5 on one token
    k = math.exp(0.5) - 1.5
    seq0 = (-1.0 * 2 + 0.1 * k) / 2
    seq1 = 1.0
    assert close(loss, (seq0 + seq1) / 2)
    assert close(m["actor/kl_loss"], (k / 2 + 0) / 2)
    tok, _ = grpo_loss(
        lp, lp, ref, torch.tensor([1.0, -1.0]), mask, GRPOConfig(2, kl_coef=0.1, loss_agg="token-mean")
    )
    assert close(tok, (-2.0 + 0.1 * k + 3.0) / 5)


def test_remax_advantages():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, m = remax_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), mask)
    assert close(adv, [[0.5, 0.5, 0.5], [-0.5, -0.5, 0.0]])
    # a KL penalty of 0.1 * 1.0 on the first token only adds to that token's return-to-go
    lp = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    adv, _ = remax_advantages(
        torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), mask, lp, torch.zeros(2, 3), 0.1
    )
    assert close(adv[0], [0.4, 0.5, 0.5])
    assert m["reward/mean"] == 0.5


# ---- DPO, SFT, reward model ---------------------------------------------------------------------------
def test_dpo_loss_at_known_logits():
    loss, m = dpo_loss(
        torch.tensor([-10.0, -12.0]),
        torch.tensor([-12.0, -10.0]),
        torch.tensor([-11.0, -11.0]),
        torch.tensor([-11.0, -11.0]),
        DPOConfig(beta=0.1),
    )
    # pair 1: h = 0.1*1 - 0.1*(-1) = 0.2; pair 2: h = -0.2; loss = log(1 + exp(-h))
    assert close(loss, (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.2))) / 2)
    assert close(m["rewards/chosen"], 0.0) and close(m["rewards/accuracies"], 0.5)
    assert close(m["rewards/margins"], 0.0)
    ls, _ = dpo_loss(
        torch.tensor([-10.0]),
        torch.tensor([-12.0]),
        torch.tensor([-11.0]),
        torch.tensor([-11.0]),
        DPOConfig(0.1, 0.1),
    )
    sig = 1 / (1 + math.exp(-0.2))
    assert close(ls, -0.9 * math.log(sig) - 0.1 * math.log(1 - sig))


def test_sequence_logps_sft_and_token_logprobs():
    tl = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[0, 1, 1]])
    assert close(sequence_logps(tl, mask), [-5.0])
    loss, m = sft_loss(tl, mask)
    assert close(loss, 2.5) and close(m["sft/loss"], 2.5)
    assert close(sft_loss(tl, mask, reduction="sum")[0], 5.0)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    assert close(token_logprobs(logits, torch.tensor([[1]])), [[math.log(0.75)]])


def test_pairwise_loss():
    loss, m = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert close(loss, (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2)
    assert close(m["rm/accuracy"], 0.5) and close(m["rm/margin"], 0.0)


def test_sum_reduction_over_microbatches_equals_the_mean():
    # What TrainEngine does: sum per microbatch, divide by the token count of the whole batch.
    torch.manual_seed(1)
    lp, old, adv = torch.randn(6, 5) * 0.1, torch.randn(6, 5) * 0.1, torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).long()
    whole, _ = policy_loss(lp, old, adv, mask)
    parts = sum(
        policy_loss(lp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], reduction="sum")[0]
        for i in (0, 2, 4)
    )
    assert close(parts / mask.sum(), whole, 1e-6)
    assert close(masked_mean(adv, mask), (adv * mask).sum() / mask.sum())
