"""DAPO's dynamic sampling (keep mask, refill over generation rounds) and overlong reward shaping.

Expected values are written out by hand. Tolerance: 1e-6 absolute where floats are compared.
"""

from __future__ import annotations

import pytest
import torch

from lightning_real.algorithms import (
    DAPOConfig,
    concat_rows,
    keep_groups,
    overlong_penalty,
    refill_groups,
    select_rows,
)

TOL = 1e-6


def test_keep_groups_drops_groups_whose_scores_are_all_equal():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0, 1e-3])
    assert keep_groups(scores, 3).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="groups of 5"):
        keep_groups(scores, 5)


def test_select_and_concat_rows_pad_on_the_left():
    a = {"seq": torch.tensor([[1, 2], [3, 4]]), "rewards": torch.tensor([0.5, 1.0])}
    b = {"seq": torch.tensor([[5, 6, 7]]), "rewards": torch.tensor([2.0])}
    out = concat_rows([a, b], pad_values={"seq": 9})
    assert out["seq"].tolist() == [[9, 1, 2], [9, 3, 4], [5, 6, 7]]
    assert out["rewards"].tolist() == [0.5, 1.0, 2.0]
    assert select_rows(out, torch.tensor([False, True, True]))["seq"].tolist() == [[9, 3, 4], [5, 6, 7]]
    with pytest.raises(ValueError, match="different keys"):
        concat_rows([a, {"seq": b["seq"]}])


def test_refill_collects_kept_groups_over_rounds_up_to_the_target():
    n = 2
    # round 1: three groups, rows 0..5; group 1 has spread, groups 0 and 2 not
    r1 = {"seq": torch.arange(12).view(6, 2), "rewards": torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])}
    keep1 = keep_groups(r1["rewards"], n)
    assert keep1.tolist() == [False, True, False]
    buf, full = refill_groups(None, r1, keep1, n, target_groups=2)
    assert not full
    assert buf["seq"].tolist() == [[4, 5], [6, 7]]
    # round 2: wider sequences (longer prompts), groups 0 and 1 kept; only one more group fits
    r2 = {"seq": torch.arange(100, 118).view(6, 3), "rewards": torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])}
    keep2 = keep_groups(r2["rewards"], n)
    assert keep2.tolist() == [True, True, False]
    buf, full = refill_groups(buf, r2, keep2, n, target_groups=2)
    assert full
    assert buf["seq"].tolist() == [[0, 4, 5], [0, 6, 7], [100, 101, 102], [103, 104, 105]]
    assert buf["rewards"].tolist() == [0.0, 1.0, 0.0, 1.0]  # rows 2, 3 of round 1, rows 0, 1 of round 2
    # a round with nothing kept leaves the buffer as it was
    same, full = refill_groups(buf, r1, torch.zeros(3, dtype=torch.bool), n, target_groups=3)
    assert not full and torch.equal(same["seq"], buf["seq"])


def test_overlong_penalty_in_its_three_regions():
    # L_max = 20, L_cache = 5: 0 up to 15, then (15 - |y|) / 5, -1 beyond 20
    lengths = torch.tensor([3, 15, 16, 18, 20, 21, 40])
    pen = overlong_penalty(lengths, max_len=20, cache_len=5)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0]), atol=TOL)
    half = overlong_penalty(lengths, 20, 5, factor=0.5)
    assert torch.allclose(half, torch.tensor([0.0, 0.0, -0.1, -0.3, -0.5, -0.5, -0.5]), atol=TOL)
    with pytest.raises(ValueError, match="cache_len=0"):
        overlong_penalty(lengths, 20, 0)


def test_dapo_config_errors_name_the_field():
    assert DAPOConfig(overlong_max_len=20, overlong_cache=5).overlong_cache == 5
    with pytest.raises(ValueError, match=r"DAPOConfig.overlong_cache=0; allowed: an integer in \[1, "):
        DAPOConfig(overlong_max_len=20)
    with pytest.raises(ValueError, match=r"DAPOConfig.max_gen_rounds=0; allowed: an integer >= 1"):
        DAPOConfig(max_gen_rounds=0)
    with pytest.raises(ValueError, match=r"DAPOConfig.overlong_max_len=0"):
        DAPOConfig(overlong_max_len=0)
