"""Verifiable rewards: the arithmetic dataset, answer extraction, exact match, 'module:function'
loading and the batch scorer over token ids. No floating-point tolerances: rewards are 0 or 1.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from lightning_real.data.arithmetic import (
    exact_match,
    extract_answer,
    generate_rows,
    main,
    problems,
    split_problems,
    write_arithmetic,
)
from lightning_real.data.rows import read_rows
from lightning_real.data.verifiable import VerifiableReward, load_reward_fn, read_ground_truth

PROMPT = re.compile(r"What is (\d+)([+-])(\d+)\?")


def solve(prompt: str) -> int:
    a, op, b = PROMPT.fullmatch(prompt).groups()  # type: ignore[union-attr]
    return int(a) + int(b) if op == "+" else int(a) - int(b)


# ---- the dataset --------------------------------------------------------------------------------
def test_arithmetic_rows_are_deterministic_and_correct():
    a, b = generate_rows(seed=3), generate_rows(seed=3)
    assert a == b
    assert generate_rows(seed=4)["train"] != a["train"]
    for kind, key in (("train", "answer"), ("eval", "answer"), ("sft", "response")):
        for row in a[kind]:
            assert str(solve(row["prompt"])) == row[key]
            assert len(row["prompt"].encode()) <= 16  # short for the byte tokenizer
    assert all(int(r["answer"]) >= 0 for r in a["train"])


def test_arithmetic_splits_are_disjoint_and_cover_every_problem():
    train, held = split_problems(seed=0, max_operand=20, eval_rows=50)
    assert len(held) == 50
    assert not set(train) & set(held)
    # 21 * 21 sums plus 21 * 22 / 2 differences with a >= b
    assert len(set(train) | set(held)) == len(problems(20)) == 441 + 231
    rows = generate_rows(seed=0, max_operand=20, eval_rows=50, sft_rows=100)
    train_prompts = {r["prompt"] for r in rows["train"]}
    assert not train_prompts & {r["prompt"] for r in rows["eval"]}
    assert {r["prompt"] for r in rows["sft"]} <= train_prompts
    with pytest.raises(ValueError, match="eval_rows=0"):
        split_problems(eval_rows=0)
    with pytest.raises(ValueError, match=r"ops=\('\*',\)"):
        problems(10, ("*",))


def test_write_arithmetic_and_the_entry_point(tmp_path, capsys):
    paths = write_arithmetic(tmp_path / "a", seed=1, max_operand=10, eval_rows=10, sft_rows=20)
    assert sorted(paths) == ["eval", "sft", "train"]
    rows = read_rows(paths["eval"], ("prompt", "answer"))
    assert len(rows) == 10
    assert read_ground_truth(paths["eval"]) == [r.fields["answer"] for r in rows]
    flags = ["--seed", "1", "--max-operand", "10", "--eval-rows", "10", "--sft-rows", "20"]
    main(["--out", str(tmp_path / "b"), *flags])
    assert "train:" in capsys.readouterr().out
    for name in ("train", "eval", "sft"):
        same = (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{name}.jsonl"
        ).read_bytes()
        assert same, name
    first = json.loads((tmp_path / "b" / "sft.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "response"}


# ---- answers and the reward ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("85", "85"),
        (" 85.", "85"),
        ("The answer is 85!", "85"),
        ("37+48=85", "85"),
        ("5-3", "3"),  # '-' after a digit is the operator
        ("-7", "-7"),
        ("x = -5.", "-5"),
        ("\u221212", "-12"),  # Unicode minus
        ("1,000", "1000"),
        ("007", "7"),
        ("85.0", "85"),
        ("3.50", "3.5"),
        ("-0", "0"),
        ("8 5", "5"),  # the last number
        ("", None),
        ("eighty-five", None),
    ],
)
def test_extract_answer_edge_cases(text, want):
    assert extract_answer(text) == want


def test_exact_match_scores():
    assert exact_match("What is 37+48?", "85", "85") == 1.0
    assert exact_match("What is 37+48?", "It is 85.", "85") == 1.0
    assert exact_match("What is 37+48?", "84", "85") == 0.0
    assert exact_match("What is 37+48?", "84", "85", format_score=0.1) == 0.1
    assert exact_match("What is 37+48?", "no idea", "85", format_score=0.1) == 0.0
    with pytest.raises(ValueError, match="holds no number"):
        exact_match("p", "1", "n/a")


# ---- 'module:function' --------------------------------------------------------------------------
def test_load_reward_fn_and_its_errors(tmp_path, monkeypatch):
    assert load_reward_fn("lightning_real.data.arithmetic:exact_match") is exact_match
    (tmp_path / "my_rewards_mod.py").write_text(
        "class Scorer:\n    @staticmethod\n    def score(p, r, t):\n        return float(r == t)\nLIMIT = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_fn("my_rewards_mod:Scorer.score")
    assert fn("p", "a", "a") == 1.0
    with pytest.raises(
        ValueError, match=r"'no_such_module_xyz:f': cannot import module 'no_such_module_xyz'"
    ):
        load_reward_fn("no_such_module_xyz:f")
    with pytest.raises(
        ValueError, match=r"'my_rewards_mod:nope': module 'my_rewards_mod' has no attribute 'nope'"
    ):
        load_reward_fn("my_rewards_mod:nope")
    with pytest.raises(ValueError, match=r"'my_rewards_mod:LIMIT': 'LIMIT' is a int, not callable"):
        load_reward_fn("my_rewards_mod:LIMIT")
    for bad in ("exact_match", "a:b:c", ":f", "mod:"):
        with pytest.raises(ValueError, match="expected 'module:function'"):
            load_reward_fn(bad)
    sys.modules.pop("my_rewards_mod", None)


# ---- the batch scorer ---------------------------------------------------------------------------
def test_verifiable_reward_scores_generated_rows_by_index():
    from lightning_real.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    prompts = ["What is 2+3?", "What is 10-4?", "What is 2+3?"]
    responses = ["5", "7", "It is 5"]
    truths = ["5", "6", "9"]  # dataset rows 0, 1, 2
    index = torch.tensor([0, 1, 0])  # row 2 of the batch repeats prompt 0 (a group)
    width = 24
    seq = torch.full((3, width), tok.pad_token_id)
    am = torch.zeros(3, width, dtype=torch.long)
    lm = torch.zeros(3, width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p_ids = [tok.bos_token_id, *tok.encode(p, add_special_tokens=False)]
        r_ids = [*tok.encode(r, add_special_tokens=False), tok.eos_token_id]
        start = 14 - len(p_ids)  # left-padded prompt, response after it
        seq[i, start:14] = torch.tensor(p_ids)
        seq[i, 14 : 14 + len(r_ids)] = torch.tensor(r_ids)
        am[i, start : 14 + len(r_ids)] = 1
        lm[i, 14 : 14 + len(r_ids)] = 1
    rew = VerifiableReward("lightning_real.data.arithmetic:exact_match", truths, tok)
    assert rew(seq, am, lm, index).tolist() == [1.0, 0.0, 1.0]
    assert rew.score(seq, am, lm, ["9", "7", "5"]).tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="row index 5 outside the 3 ground-truth rows"):
        rew(seq, am, lm, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="no ground_truth list"):
        VerifiableReward(exact_match, None, tok)(seq, am, lm, index)
