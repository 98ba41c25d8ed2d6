"""Policy-loss variants: clip-higher, dual clip, GSPO, loss aggregation modes, the KL loss and TIS.

Expected numbers are computed by hand in the comments or by plain loops written here (verl's and
Dr. GRPO's formulas), never by the functions under test. Tolerance: 1e-6 absolute (float32
arithmetic on numbers of order 1) unless a test says otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_real.algorithms import (
    LOSS_AGG_MODES,
    GRPOConfig,
    PolicyLossConfig,
    agg_loss,
    agg_norm_key,
    agg_normaliser,
    combined_policy_loss,
    grpo_loss,
    gspo_loss,
    kl_loss,
    kl_per_token,
    policy_loss,
    sequence_log_ratio,
    tis_metrics,
    tis_weights,
    value_loss,
)

TOL = 1e-6


def close(x, y, tol: float = TOL) -> bool:
    return torch.allclose(
        torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32), atol=tol
    )


def random_padded_batch(seed: int, b: int = 7, t: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values and a mask with a prompt part, a response of >= 1 token and right padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        start = int(torch.randint(0, 4, (), generator=g))
        length = int(torch.randint(1, t - start + 1, (), generator=g))
        mask[i, start : start + length] = 1
    return x, mask


def verl_agg(x: torch.Tensor, mask: torch.Tensor, mode: str, length: int | None = None) -> float:
    """verl's agg_loss on one batch, written as loops (Dr. GRPO's B x L for the '-norm' mode)."""
    rows = []
    for i in range(x.shape[0]):
        toks = [float(x[i, j]) for j in range(x.shape[1]) if mask[i, j]]
        rows.append(toks)
    if mode == "token-mean":
        flat = [v for r in rows for v in r]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    assert length is not None
    return sum(sum(r) for r in rows) / (len(rows) * length)


# ---- loss aggregation ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_sum_over_its_normaliser_is_verls_mean(mode):
    x, mask = random_padded_batch(0)
    L = 11
    want = verl_agg(x, mask, mode, L)
    total = agg_loss(x, mask, mode, "sum", loss_agg_len=L)
    assert abs(float(total / agg_normaliser(mode, mask)) - want) < 1e-5
    assert abs(float(agg_loss(x, mask, mode, "mean", loss_agg_len=L)) - want) < 1e-5
    # What TrainEngine does: sum over microbatches, one division by the global normaliser, where the
    # normaliser is the global sum of batch[norm_key] (the number of rows when norm_key is None).
    key = agg_norm_key(mode)
    parts = sum(
        float(agg_loss(x[i : i + 3], mask[i : i + 3], mode, "sum", loss_agg_len=L)) for i in (0, 3, 6)
    )
    norm = float(mask.sum()) if key == "action_mask" else float(x.shape[0])
    assert abs(parts / norm - want) < 1e-5


def test_agg_norm_keys_and_errors():
    assert agg_norm_key("token-mean") == "action_mask"
    assert agg_norm_key("token-mean", "loss_mask") == "loss_mask"
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert agg_norm_key(mode) is None
    with pytest.raises(ValueError, match=r"loss_agg='seq-mean'; allowed: token-mean, seq-mean-token-mean"):
        agg_loss(torch.zeros(1, 1), torch.ones(1, 1), "seq-mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs loss_agg_len"):
        agg_loss(torch.zeros(1, 1), torch.ones(1, 1), "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"reduction='max'; allowed: mean, sum"):
        agg_loss(torch.zeros(1, 1), torch.ones(1, 1), "token-mean", "max")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_packable_modes_keep_their_sum_when_rows_are_packed(mode):
    from lightning_real.algorithms.aggregation import agg_packable
    from lightning_real.algorithms.policy import PolicyLossConfig

    x, mask = random_padded_batch(1)
    L = 11
    total = float(agg_loss(x, mask, mode, "sum", loss_agg_len=L))
    # every real token of the batch in one packed row
    packed = float(
        agg_loss(x[mask.bool()][None], torch.ones(1, int(mask.sum())), mode, "sum", loss_agg_len=L)
    )
    assert agg_packable(mode) == (mode != "seq-mean-token-mean")
    assert (abs(packed - total) < 1e-4) == agg_packable(mode)
    cfg = PolicyLossConfig(loss_agg=mode, loss_agg_len=L)
    assert cfg.packable == agg_packable(mode)
    assert not PolicyLossConfig.gspo(loss_agg=mode, loss_agg_len=L).packable  # one ratio per sequence


def test_agg_modes_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # tokens 1, 2, 3 | 4: token-mean 10/4; seq means 2 and 4 -> 3; seq sums 6 and 4 -> 5; / L = 5 -> 1
    assert close(agg_loss(x, mask, "token-mean"), 2.5)
    assert close(agg_loss(x, mask, "seq-mean-token-mean"), 3.0)
    assert close(agg_loss(x, mask, "seq-mean-token-sum"), 5.0)
    assert close(agg_loss(x, mask, "seq-mean-token-sum-norm", loss_agg_len=5), 1.0)
    assert close(agg_loss(x, mask, "seq-mean-token-sum-norm", "sum", loss_agg_len=5), 2.0)


def test_value_loss_seq_mean_token_mean():
    values = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ret = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, m = value_loss(values, values, ret, mask, clip_eps=None, loss_agg="seq-mean-token-mean")
    # 0.5 * err^2: row 0 [0.5, 2.0] -> mean 1.25; row 1 [2.0] -> 2.0; mean over rows 1.625
    assert close(loss, 1.625) and close(m["critic/vf_loss"], 1.625)
    loss, _ = value_loss(values, values, ret, mask, clip_eps=None)
    assert close(loss, (0.5 + 2.0 + 2.0) / 3)


# ---- clip-higher, dual clip ---------------------------------------------------------------------
def test_clip_higher_is_asymmetric():
    ratio = torch.tensor([[1.5, 0.7, 1.25, 0.85]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    ones = torch.ones(1, 4)
    loss, m = policy_loss(torch.log(ratio), torch.zeros(1, 4), adv, ones, clip_eps=0.2, clip_eps_high=0.28)
    # per token max(-A r, -A clip(r, 0.8, 1.28)): [-1.28 (clipped high), 0.8 (clipped low),
    # -1.25 (inside the higher bound), 0.85 (inside)]
    assert close(loss, (-1.28 + 0.8 - 1.25 + 0.85) / 4)
    assert close(m["actor/pg_clipfrac"], 0.5)
    # symmetric 0.2: 1.25 is clipped at 1.2 too
    loss, m = policy_loss(torch.log(ratio), torch.zeros(1, 4), adv, ones, clip_eps=0.2)
    assert close(loss, (-1.2 + 0.8 - 1.2 + 0.85) / 4)
    assert close(m["actor/pg_clipfrac"], 0.75)


def test_dual_clip_and_pg_clipfrac_lower():
    ratio = torch.tensor([[5.0, 2.0, 0.5, 1.0]])
    adv = torch.tensor([[-1.0, -1.0, -1.0, 2.0]])
    logp = torch.log(ratio).requires_grad_(True)
    loss, m = policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), clip_eps=0.2, dual_clip=3.0)
    # token 0: max(5, 1.2) = 5, capped at -c A = 3 (dual clip active); token 1: max(2, 1.2) = 2 < 3;
    # token 2: max(0.5, 0.8) = 0.8 (clipped low); token 3: A = 2, r = 1 -> -2
    assert close(loss, (3.0 + 2.0 + 0.8 - 2.0) / 4)
    assert close(m["actor/pg_clipfrac"], 0.25)
    assert close(m["actor/pg_clipfrac_lower"], 0.25)
    loss.backward()
    # capped and clipped tokens carry no gradient; token 1: d(-A r)/dlogp = r = 2, token 3: -A r = -2
    assert close(logp.grad, [[0.0, 2.0 / 4, 0.0, -2.0 / 4]])
    _, m = policy_loss(torch.log(ratio), torch.zeros(1, 4), adv, torch.ones(1, 4), clip_eps=0.2)
    assert close(m["actor/pg_clipfrac_lower"], 0.0)


def test_policy_loss_weights_multiply_each_token():
    torch.manual_seed(3)
    lp, old, adv = torch.randn(3, 5) * 0.1, torch.randn(3, 5) * 0.1, torch.randn(3, 5)
    mask = torch.ones(3, 5)
    w = torch.rand(3, 5) * 2
    weighted, _ = policy_loss(lp, old, adv, mask, reduction="sum", weights=w)
    r = torch.exp(lp - old)
    per_tok = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    assert close(weighted, (per_tok * w).sum(), 1e-5)


# ---- GSPO ---------------------------------------------------------------------------------------
def test_gspo_ratio_is_exp_of_the_mean_log_ratio():
    old = torch.zeros(2, 4)
    logp = torch.tensor([[0.3, -0.1, 0.1, 9.0], [-0.2, 0.0, 5.0, 5.0]])  # off-mask entries must not count
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert close(sequence_log_ratio(logp, old, mask), [0.1, -0.1])
    adv = torch.tensor([1.0, -1.0])
    # wide clip: loss per sequence -A s_i = [-exp(0.1), exp(-0.1)], averaged over sequences
    loss, m = gspo_loss(logp, old, adv, mask, clip_eps=0.5, clip_eps_high=0.5)
    assert close(loss, (-math.exp(0.1) + math.exp(-0.1)) / 2)
    assert close(m["actor/pg_clipfrac"], 0.0)
    # the paper's clip: s_0 = 1.105 > 1 + 4e-4 with A > 0 and s_1 = 0.905 < 1 - 3e-4 with A < 0: both clipped
    loss, m = gspo_loss(logp, old, adv, mask)
    assert close(loss, (-(1 + 4e-4) + (1 - 3e-4)) / 2)
    assert close(m["actor/pg_clipfrac"], 1.0) and close(m["actor/pg_clipfrac_lower"], 0.0)


def test_gspo_token_form_gradient_equals_the_sequence_objective():
    torch.manual_seed(4)
    b, t = 8, 6
    _, mask = random_padded_batch(5, b, t)
    old = torch.randn(b, t) * 0.5 - 2.0
    base = old + torch.randn(b, t) * 0.08
    adv = torch.randn(b)
    eps_lo, eps_hi = 0.03, 0.04

    tok = base.clone().requires_grad_(True)
    loss, _ = gspo_loss(tok, old, adv, mask, eps_lo, eps_hi, loss_agg="seq-mean-token-mean")
    loss.backward()

    seq = base.clone().requires_grad_(True)
    total = torch.zeros(())
    clipped_rows = 0
    for i in range(b):
        idx = mask[i].bool()
        s = torch.exp((seq[i][idx] - old[i][idx]).mean())
        sc = s.clamp(1 - eps_lo, 1 + eps_hi)
        clipped_rows += int(bool(-adv[i] * sc > -adv[i] * s))
        total = total + torch.maximum(-adv[i] * s, -adv[i] * sc)
    (total / b).backward()
    assert 0 < clipped_rows < b  # both cases are exercised
    assert close(loss, total / b)
    assert close(tok.grad, seq.grad)


# ---- KL loss ------------------------------------------------------------------------------------
def test_kl_loss_estimators_and_the_low_var_kl_clamp():
    lp = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, 14.0, 29.0]])  # r = lp - ref = 0.5, -15, -30
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(15) - 1 - 15, math.exp(20) - 1 - 30]
    assert torch.allclose(kl_per_token(lp, ref, "k3"), torch.tensor([k3]), rtol=1e-5)
    # low_var_kl: r clamped to [-20, 20], the estimate to [-10, 10]
    assert close(kl_per_token(lp, ref, "low_var_kl"), [[k3[0], 10.0, 10.0]])
    assert close(kl_per_token(lp, ref, "k1"), [[0.5, -15.0, -30.0]])
    assert close(kl_per_token(lp, ref, "k2"), [[0.125, 112.5, 450.0]], 1e-4)
    x = lp.clone().requires_grad_(True)
    loss, m = kl_loss(x, ref, torch.ones(1, 3), "low_var_kl")
    assert close(loss, (k3[0] + 20.0) / 3) and close(m["actor/kl_loss"], (k3[0] + 20.0) / 3)
    loss.backward()
    # d k3 / d lp = 1 - exp(-r) at r = 0.5; clamped tokens have no gradient
    assert close(x.grad, [[(1 - math.exp(-0.5)) / 3, 0.0, 0.0]])
    with pytest.raises(ValueError, match="allowed: k1, k2, k3, low_var_kl"):
        kl_per_token(lp, ref, "k4")  # type: ignore[arg-type]


# ---- truncated importance sampling ---------------------------------------------------------------
def test_tis_weight_is_one_for_equal_logprobs_and_capped_otherwise():
    torch.manual_seed(6)
    lp = torch.randn(4, 6)
    assert torch.equal(tis_weights(lp, lp.clone()), torch.ones(4, 6))
    old = torch.log(torch.tensor([[3.0, 0.5, 1.0, 2.5]]))
    w = tis_weights(old, torch.zeros(1, 4), cap=2.0)
    assert close(w, [[2.0, 0.5, 1.0, 2.0]])
    m = tis_metrics(old, torch.zeros(1, 4), torch.ones(1, 4), cap=2.0)
    assert close(m["actor/tis_weight_mean"], (2.0 + 0.5 + 1.0 + 2.0) / 4)
    assert close(m["actor/tis_clipfrac"], 0.5)


def test_combined_loss_with_tis_weights_the_policy_term_only():
    torch.manual_seed(7)
    _, mask = random_padded_batch(8, 5, 6)
    old = torch.randn(5, 6) * 0.3
    lp = old + torch.randn(5, 6) * 0.05
    adv = torch.randn(5)
    plain = PolicyLossConfig()
    tis = PolicyLossConfig(tis_cap=2.0)
    a, _ = combined_policy_loss(lp, old, adv, mask, plain)
    b, mb = combined_policy_loss(lp, old, adv, mask, tis, rollout_logp=old.clone())
    assert torch.equal(a, b)  # native engine: the weights are exactly 1
    assert close(mb["actor/tis_weight_mean"], float(mask.sum()))  # "sum" reduction: a token count
    rollout = old + torch.randn(5, 6) * 0.5
    c, _ = combined_policy_loss(lp, old, adv, mask, tis, rollout_logp=rollout)
    w = torch.exp(old - rollout).clamp(max=2.0)
    r = torch.exp(lp - old)
    A = adv.unsqueeze(-1)
    per_tok = torch.maximum(-A * r, -A * r.clamp(0.8, 1.2)) * w
    assert close(c, (per_tok * mask).sum(), 1e-5)
    with pytest.raises(ValueError, match=r"tis_cap=2\.0 needs rollout_logp"):
        combined_policy_loss(lp, old, adv, mask, tis)


def test_combined_loss_adds_the_kl_loss_and_entropy_bonus():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    ent = torch.tensor([[0.3, 0.5]])
    mask = torch.ones(1, 2)
    cfg = PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_estimator="k1", entropy_coef=0.01)
    loss, m = combined_policy_loss(
        lp, lp, torch.tensor([1.0]), mask, cfg, ref_logp=ref, entropy=ent, reduction="mean"
    )
    # ratio 1: pg = -1 per token; k1 KL [0.5, 0] -> mean 0.25; entropy mean 0.4
    assert close(loss, -1.0 + 0.1 * 0.25 - 0.01 * 0.4)
    assert close(m["actor/kl_loss"], 0.25) and close(m["actor/entropy"], 0.4)
    with pytest.raises(ValueError, match="use_kl_loss=True needs ref_logp"):
        combined_policy_loss(lp, lp, torch.tensor([1.0]), mask, cfg)


def test_policy_loss_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"PolicyLossConfig.policy_loss='cispo'; allowed: vanilla, gspo"):
        PolicyLossConfig(policy_loss="cispo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"PolicyLossConfig.dual_clip=3.0 with policy_loss='gspo'"):
        PolicyLossConfig.gspo(dual_clip=3.0)
    with pytest.raises(ValueError, match=r"PolicyLossConfig.dual_clip=1.0; allowed: a number > 1"):
        PolicyLossConfig(dual_clip=1.0)
    with pytest.raises(
        ValueError, match=r"PolicyLossConfig.loss_agg='seq-mean-token-sum-norm' needs loss_agg_len"
    ):
        PolicyLossConfig(loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"PolicyLossConfig.kl_loss_estimator='k5'"):
        PolicyLossConfig(kl_loss_estimator="k5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"PolicyLossConfig.tis_cap=0; allowed: a number > 0 or None"):
        PolicyLossConfig(tis_cap=0)
    g = PolicyLossConfig.gspo()
    assert (g.clip_eps, g.clip_eps_high, g.loss_agg) == (3e-4, 4e-4, "seq-mean-token-mean")


# ---- GRPO and its variants ---------------------------------------------------------------------
def test_grpo_variants_through_the_policy_loss_config():
    torch.manual_seed(9)
    _, mask = random_padded_batch(10, 6, 7)
    old = torch.randn(6, 7) * 0.3
    lp = old + torch.randn(6, 7) * 0.6
    adv = torch.randn(6)
    A = adv.unsqueeze(-1).expand(6, 7)
    m = mask.float()
    r = torch.exp(lp - old)
    sym = torch.maximum(-A * r, -A * r.clamp(0.8, 1.2))
    # GRPO itself: the same numbers as the shared loss under GRPOConfig.policy_config()
    ref = old + 0.1
    cfg = GRPOConfig(group_size=2, kl_coef=0.05)
    loss, metrics = grpo_loss(lp, old, ref, adv, mask, cfg)
    k3 = kl_per_token(lp, ref, "k3")
    assert close(loss, verl_agg(sym + 0.05 * k3, mask, "seq-mean-token-mean"), 1e-5)
    assert close(metrics["actor/kl_loss"], verl_agg(k3, mask, "seq-mean-token-mean"), 1e-5)
    _, metrics = grpo_loss(lp, old, None, adv, mask, cfg)
    assert close(metrics["actor/kl_loss"], 0.0)
    # DAPO: clip-higher + token-mean, no KL
    dapo = PolicyLossConfig(clip_eps_high=0.28, loss_agg="token-mean")
    loss, _ = combined_policy_loss(lp, old, adv, mask, dapo)
    high = torch.maximum(-A * r, -A * r.clamp(0.8, 1.28))
    assert close(loss, (high * m).sum(), 1e-5)
    # Dr. GRPO's constant normaliser: token sums / L, the engine then divides by the row count
    dr = PolicyLossConfig(loss_agg="seq-mean-token-sum-norm", loss_agg_len=7)
    loss, _ = combined_policy_loss(lp, old, adv, mask, dr, reduction="mean")
    assert close(loss, verl_agg(sym, mask, "seq-mean-token-sum-norm", 7), 1e-5)
    # dual clip reports pg_clipfrac_lower
    dual = PolicyLossConfig(dual_clip=1.5)
    _, metrics = combined_policy_loss(lp, old, adv, mask, dual, reduction="mean")
    lower = ((sym > -A * 1.5) & (A < 0)).float()
    assert float(lower[mask.bool()].sum()) > 0
    assert close(metrics["actor/pg_clipfrac_lower"], float((lower * m).sum() / m.sum()))
    # GSPO with a low_var_kl loss
    gspo = PolicyLossConfig.gspo(use_kl_loss=True, kl_loss_coef=0.05)
    loss, _ = combined_policy_loss(lp, old, adv, mask, gspo, ref_logp=ref, reduction="mean")
    g, _ = gspo_loss(lp, old, adv, mask, 3e-4, 4e-4)
    kl, _ = kl_loss(lp, ref, mask, "low_var_kl", loss_agg="seq-mean-token-mean")
    assert close(loss, g + 0.05 * kl, 1e-5)
