"""RLOO, Pass@k, REINFORCE++ (and its baseline variant) and the compute_advantages entry point.

Expected numbers are computed by hand in the comments or by plain Python loops written here,
never by the functions under test. Tolerance: 1e-6 absolute for float32 arithmetic on numbers of
order 1; 1e-5 where a result goes through whitening (rsqrt of a variance plus 1e-8).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lightning_real.algorithms import (
    ADV_ESTIMATORS,
    AdvantageConfig,
    compute_advantages,
    discounted_returns,
    group_advantages,
    passk_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
)

TOL = 1e-6
WTOL = 1e-5


def close(x, y, tol: float = TOL) -> bool:
    return torch.allclose(
        torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32), atol=tol
    )


def whiten_list(xs: list[float]) -> list[float]:
    """Population whitening written out (what the estimators must do over the masked tokens)."""
    mu = statistics.fmean(xs)
    sd = statistics.pstdev(xs)
    return [(x - mu) / sd for x in xs]


# ---- RLOO ---------------------------------------------------------------------------------------
def test_rloo_leave_one_out_by_hand():
    # group [1, 0, 0, 1]: others' means 1/3, 2/3, 2/3, 1/3 -> A = [2/3, -2/3, -2/3, 2/3]
    # group [3, 1, 2] (n = 3): A = [3 - 1.5, 1 - 2.5, 2 - 2] = [1.5, -1.5, 0]
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    assert close(adv, [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    adv = rloo_advantages(torch.tensor([3.0, 1.0, 2.0, 0.0, 0.0, 6.0]), 3)
    assert close(adv, [1.5, -1.5, 0.0, -3.0, -3.0, 6.0])


def test_rloo_matches_a_loop_on_random_groups():
    torch.manual_seed(0)
    scores = torch.randn(24)
    n = 6
    adv = rloo_advantages(scores, n)
    s = scores.tolist()
    for i in range(24):
        g = (i // n) * n
        others = [s[j] for j in range(g, g + n) if j != i]
        assert abs(float(adv[i]) - (s[i] - sum(others) / len(others))) < TOL
    with pytest.raises(ValueError, match="groups of 5"):
        rloo_advantages(scores, 5)


# ---- Pass@k -------------------------------------------------------------------------------------
def test_passk_gives_the_gap_to_the_second_best_only_to_the_best():
    scores = torch.tensor([0.1, 0.7, 0.4, 0.2, 0.9, 0.3, 0.9, 0.0])
    adv = passk_advantages(scores, 4, scale_by_std=False)
    # group 1: best 0.7 (row 1), second 0.4 -> 0.3; group 2: tie 0.9 / 0.9 -> 0 everywhere
    assert close(adv, [0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # group 1's unbiased std: mean 0.35, squared deviations 0.0625 + 0.1225 + 0.0025 + 0.0225 = 0.21,
    # / 3 = 0.07 -> the gap is divided by sqrt(0.07) (+ eps)
    adv = passk_advantages(scores, 4, scale_by_std=True, eps=0.0)
    assert close(adv[:4], [0.0, 0.3 / math.sqrt(0.07), 0.0, 0.0], 1e-5)
    assert float(adv[4:].abs().max()) == 0.0


def test_passk_on_random_groups_is_nonzero_at_most_once_per_group():
    torch.manual_seed(1)
    scores = torch.rand(40)
    adv = passk_advantages(scores, 5, scale_by_std=False).view(-1, 5)
    g = scores.view(-1, 5)
    for row, a in zip(g.tolist(), adv):
        best = max(range(5), key=lambda j: row[j])
        second = sorted(row)[-2]
        assert abs(float(a[best]) - (row[best] - second)) < TOL
        assert int((a != 0).sum()) <= 1


# ---- REINFORCE++ --------------------------------------------------------------------------------
def test_discounted_returns_skip_masked_positions():
    rewards = torch.tensor([[7.0, 1.0, 9.0, 2.0, 3.0, 5.0]])
    mask = torch.tensor([[0, 1, 0, 1, 1, 0]])
    # masked actions 1, 3, 4 with rewards 1, 2, 3 and gamma 0.5: G4 = 3, G3 = 2 + 1.5, G1 = 1 + 0.5 * 3.5
    ret = discounted_returns(rewards, mask, gamma=0.5)
    assert close(ret, [[0.0, 2.75, 0.0, 3.5, 3.0, 0.0]])


def test_reinforce_pp_returns_and_global_whitening_by_hand():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    logp = torch.tensor([[0.0, -1.0, -2.0, -1.0], [-1.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.5, -1.0], [-1.0, -1.0, 0.0, 0.0]])
    scores = torch.tensor([1.0, -1.0])
    adv, ret = reinforce_pp_advantages(scores, mask, logp, ref, kl_coef=0.1, gamma=0.9)
    # row 0: k1 KL [., 0.5, -0.5, 0] -> rewards [0, -0.05, 0.05, 1.0]
    #   returns: t3 = 1.0, t2 = 0.05 + 0.9 * 1.0 = 0.95, t1 = -0.05 + 0.9 * 0.95 = 0.805
    # row 1: no KL, score -1 on its last action (t1): t1 = -1.0, t0 = 0.9 * -1.0 = -0.9
    expected = [[0.0, 0.805, 0.95, 1.0], [-0.9, -1.0, 0.0, 0.0]]
    assert close(ret, expected)
    # advantages: the five returns whitened together (one mean and std for the whole batch)
    w = whiten_list([0.805, 0.95, 1.0, -0.9, -1.0])
    assert close(adv, [[0.0, w[0], w[1], w[2]], [w[3], w[4], 0.0, 0.0]], WTOL)
    vals = adv[mask.bool()]
    assert abs(float(vals.mean())) < WTOL and abs(float(vals.std(unbiased=False)) - 1) < WTOL


def test_reinforce_pp_baseline_subtracts_the_group_mean_then_whitens():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), mask, group_size=2)
    # group mean 0.5: shaped scores [0.5, -0.5], gamma 1 and no KL -> every token's return is its score
    assert close(ret, [[0.5, 0.5, 0.5], [-0.5, -0.5, 0.0]])
    # five tokens [.5, .5, .5, -.5, -.5]: mean 0.1, population var 0.24
    a, b = 0.4 / math.sqrt(0.24), -0.6 / math.sqrt(0.24)
    assert close(adv, [[a, a, a], [b, b, 0.0]], WTOL)
    # without the baseline the same scores give [1, 1, 1, 0, 0] -> whitened the same way
    _, ret = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), mask)
    assert close(ret, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def test_reinforce_pp_on_a_random_padded_batch_matches_a_loop():
    torch.manual_seed(2)
    b, t, gamma, coef = 6, 9, 0.95, 0.05
    mask = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        start = int(torch.randint(0, 4, ()))
        mask[i, start : start + int(torch.randint(1, t - start + 1, ()))] = 1
    logp, ref = torch.randn(b, t) * 0.3, torch.randn(b, t) * 0.3
    scores = torch.randn(b)
    adv, ret = reinforce_pp_advantages(scores, mask, logp, ref, kl_coef=coef, gamma=gamma)
    flat = []
    for i in range(b):
        idx = [j for j in range(t) if mask[i, j]]
        r = {j: -coef * float(logp[i, j] - ref[i, j]) for j in idx}
        r[idx[-1]] += float(scores[i])
        g = 0.0
        for j in reversed(idx):
            g = r[j] + gamma * g
            assert abs(float(ret[i, j]) - g) < 1e-5
            flat.append((i, j, g))
    w = whiten_list([g for _, _, g in flat])
    for (i, j, _), wv in zip(flat, w):
        assert abs(float(adv[i, j]) - wv) < WTOL
    assert float(adv[~mask.bool()].abs().max()) == 0.0


# ---- the entry point ----------------------------------------------------------------------------
def test_compute_advantages_dispatches_to_each_estimator():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 0, 0]])
    m = mask.float()
    adv, ret = compute_advantages(AdvantageConfig("rloo", group_size=4), scores, mask)
    assert close(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]).unsqueeze(-1) * m)
    assert torch.equal(adv, ret)
    adv, _ = compute_advantages(AdvantageConfig("grpo", group_size=4, scale_by_std=False), scores, mask)
    assert close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]).unsqueeze(-1) * m)
    adv, _ = compute_advantages(AdvantageConfig("grpo", group_size=2), scores, mask)
    assert close(adv, group_advantages(scores, 2).unsqueeze(-1) * m)
    adv, _ = compute_advantages(
        AdvantageConfig("grpo_passk", group_size=2, scale_by_std=False),
        torch.tensor([0.2, 0.9, 0.5, 0.5]),
        mask,
    )
    assert close(adv, torch.tensor([0.0, 0.7, 0.0, 0.0]).unsqueeze(-1) * m)
    adv, _ = compute_advantages(AdvantageConfig("reinforce_plus_plus_baseline", group_size=2), scores, mask)
    expected, _ = reinforce_pp_advantages(scores, mask, group_size=2)
    assert close(adv, expected)
    adv, _ = compute_advantages(
        AdvantageConfig("remax"), scores, mask, greedy_scores=torch.tensor([0.5, 0.5, 0.5, 0.5])
    )
    assert close(adv, remax_advantages(scores, torch.full((4,), 0.5), mask)[0])
    with pytest.raises(ValueError, match="greedy_scores"):
        compute_advantages(AdvantageConfig("remax"), scores, mask)


def test_compute_advantages_gae_without_whitening_by_hand():
    # gamma = lam = 1, no KL: A_t = score - V_t on the masked actions, returns = score
    cfg = AdvantageConfig("gae", gamma=1.0, lam=1.0, whiten=False)
    mask = torch.tensor([[0, 1, 1, 1]])
    values = torch.tensor([[9.0, 0.2, 0.4, 0.6]])
    adv, ret = compute_advantages(cfg, torch.tensor([1.0]), mask, values=values)
    assert close(adv, [[0.0, 0.8, 0.6, 0.4]])
    assert close(ret, [[0.0, 1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="needs values"):
        compute_advantages(cfg, torch.tensor([1.0]), mask)


def test_advantage_config_errors_name_the_field():
    assert len(ADV_ESTIMATORS) == 7
    with pytest.raises(ValueError, match=r"AdvantageConfig.estimator='ppo'; allowed: gae, grpo, grpo_passk"):
        AdvantageConfig("ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"AdvantageConfig.group_size=1 with estimator='rloo'"):
        AdvantageConfig("rloo")
    with pytest.raises(ValueError, match=r"AdvantageConfig.kl_coef=0.1 with estimator='grpo'"):
        AdvantageConfig("grpo", group_size=4, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"AdvantageConfig.gamma=0.9 with estimator='rloo'"):
        AdvantageConfig("rloo", group_size=4, gamma=0.9)
    with pytest.raises(ValueError, match=r"AdvantageConfig.kl_estimator='k9'"):
        AdvantageConfig("gae", kl_estimator="k9")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"kl_coef=0.2 with estimator='rloo'"):
        compute_advantages(
            AdvantageConfig("rloo", group_size=2), torch.zeros(2), torch.ones(2, 1), kl_coef=0.2
        )
