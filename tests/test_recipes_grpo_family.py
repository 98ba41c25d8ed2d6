"""Recipes of GRPO's family: each algorithm name is a preset of the grpo section, which the keys
a recipe gives override; verifiable rewards and validation keys; one clear message per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_real.algorithms.grpo import PRESETS, GRPOConfig
from lightning_real.cli import main as cli_main
from lightning_real.data.arithmetic import write_arithmetic
from lightning_real.recipes import build
from lightning_real.recipes.load import load_recipe
from lightning_real.registry import ALGORITHMS, GRPO_FAMILY

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


def test_the_family_is_the_presets_and_runs_on_grpos_module() -> None:
    assert tuple(PRESETS) == GRPO_FAMILY
    for name in GRPO_FAMILY:
        assert ALGORITHMS[name].cls == "GRPOModule"
        GRPOConfig.preset(name)  # every preset is a valid configuration


def test_algorithm_name_presets_the_grpo_section_and_keys_override_it() -> None:
    r = load_recipe(TINY / "dapo.yaml")
    g = r.grpo
    assert (g.clip_eps_high, g.loss_agg, g.kl_coef, g.dynamic_sampling) == (0.28, "token-mean", 0.0, True)
    assert (g.group_size, g.max_gen_rounds, g.overlong_buffer) == (4, 2, 2)  # the file's keys
    r = load_recipe(TINY / "dapo.yaml", ["grpo.clip_eps_high=0.3", "grpo.dynamic_sampling=false"])
    assert r.grpo.clip_eps_high == 0.3 and not r.grpo.dynamic_sampling
    # the same keys under algorithm grpo keep GRPO's defaults for what they leave out
    r = load_recipe(TINY / "dapo.yaml", ["algorithm=grpo"])
    assert r.grpo.clip_eps_high is None and r.grpo.loss_agg == "seq-mean-token-mean"
    gspo = load_recipe(TINY / "gspo.yaml").grpo
    assert (gspo.policy_loss, gspo.clip_eps, gspo.clip_eps_high) == ("gspo", 3e-4, 4e-4)
    assert load_recipe(TINY / "reinforce_pp.yaml").grpo.group_size == 1


def test_presets_reach_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, module, dm = build(load_recipe(TINY / "dr_grpo.yaml"))
    policy = module.policy  # type: ignore[attr-defined]
    assert (policy.loss_agg, policy.loss_agg_len) == ("seq-mean-token-sum-norm", 8)  # max_new_tokens
    assert module.role_training("actor").norm_key is None  # type: ignore[attr-defined]  # per sequence
    _, module, dm = build(load_recipe(TINY / "dapo.yaml"))
    # dynamic sampling: one batch of prompts per generation round
    assert dm.config.batch_size == 4 * 2 == module.prompts_per_step  # type: ignore[attr-defined]
    assert module.real_graph().names == ("actor_gen", "actor_train")
    _, module, _ = build(load_recipe(TINY / "gspo.yaml"))
    assert "actor_inf" in module.real_graph().names  # truncated importance sampling


def _fails(capsys: pytest.CaptureFixture[str], tmp_path: Path, recipe: Path, *overrides: str) -> str:
    args = ["run", str(recipe), *overrides, f"trainer.output_dir={tmp_path / 'out'}", "export.dir=null"]
    assert cli_main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-real run: error: "), lines
    assert not (tmp_path / "out").exists()
    return lines[0]


@pytest.mark.parametrize(
    ("recipe", "overrides", "expected"),
    [
        (
            "rloo",
            ["grpo.adv_estimator=gae"],
            "key 'grpo.adv_estimator': 'gae' is not allowed; allowed: grpo, grpo_passk, rloo, "
            "reinforce_plus_plus, reinforce_plus_plus_baseline",
        ),
        (
            "gspo",
            ["grpo.dual_clip=3"],
            "key 'grpo.dual_clip': 3.0 is not allowed; allowed: null with policy_loss='gspo'",
        ),
        ("rloo", ["grpo.group_size=1"], "key 'grpo.group_size': 1 is not allowed; allowed: an integer >= 2"),
        (
            "rloo",
            ["grpo.loss_agg=seq-mean"],
            "key 'grpo.loss_agg': 'seq-mean' is not allowed; allowed: token-mean",
        ),
        ("rloo", ["grpo.reward_kl_coef=0.1"], "key 'grpo.reward_kl_coef': 0.1 is not allowed; allowed: 0"),
        (
            "dapo",
            ["grpo.overlong_buffer=9"],
            "overlong_buffer=9; allowed: an integer in [0, generation.max_new_tokens=8]",
        ),
        (
            "dapo",
            ["reward.rule=null", "reward.tiny=llama"],
            "dynamic_sampling=True scores every generation round",
        ),
        ("grpo", ["trainer.val_before_training=true"], "key 'trainer.val_before_training': needs data.val"),
        ("grpo", ["trainer.val_every_n_steps=-1"], "key 'trainer.val_every_n_steps': -1 is not allowed"),
        (
            "grpo",
            ["reward.rule=null", "reward.fn=no_such_module:score"],
            "key 'reward.fn': reward function 'no_such_module:score': cannot import",
        ),
        (
            "grpo",
            ["reward.fn=lightning_real.data.arithmetic:exact_match"],
            "reward: give one of path, tiny, rule, fn",
        ),
    ],
)
def test_bad_family_keys_are_one_message(
    recipe: str, overrides: list[str], expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert expected in _fails(capsys, tmp_path, TINY / f"{recipe}.yaml", *overrides)


def test_verifiable_reward_reads_the_ground_truth_of_train_and_val(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_arithmetic(tmp_path / "data", max_operand=9, eval_rows=20, sft_rows=50)
    fn = ["reward.rule=null", "reward.fn=lightning_real.data.arithmetic:exact_match"]
    data = [f"data.train={files['train']}", f"data.val={files['eval']}"]
    monkeypatch.chdir(tmp_path)
    _, module, _ = build(load_recipe(TINY / "grpo.yaml", [*fn, *data]))
    assert module.reward_needs_index  # type: ignore[attr-defined]
    assert "index" in module.real_graph().sources
    train = [r for r in files["train"].read_text().splitlines()]
    assert len(module.reward_rule.ground_truth) == len(train)  # type: ignore[attr-defined]
    assert len(module.val_reward.ground_truth) == 20  # type: ignore[attr-defined]
    # prompt rows without the answer field: the file, the line and the key that names the field
    msg = _fails(capsys, tmp_path, TINY / "grpo.yaml", *fn)  # the shipped prompts have no answers
    assert "prompts.jsonl line 1: missing field 'answer'" in msg and "data.answer_key" in msg
