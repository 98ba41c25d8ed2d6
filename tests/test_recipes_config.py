"""Recipes: every shipped file reads into its schema; every bad input is one clear message and
writes nothing; overrides merge; the reference in docs/recipes.md is the generated one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lightning_real.cli import main as cli_main
from lightning_real.recipes import build
from lightning_real.recipes.convert import valid_keys
from lightning_real.recipes.errors import RecipeError
from lightning_real.recipes.launch import resolve_world, start_method
from lightning_real.recipes.load import as_mapping, load_recipe
from lightning_real.recipes.reference import reference
from lightning_real.recipes.schema import ALGORITHMS, USES, Recipe, TrainerConfig
from lightning_real.registry import ALGORITHMS as REGISTRY

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("**/*.yaml"))
TINY = ROOT / "recipes" / "tiny"


def _placeholders(path: Path) -> list[str]:
    """Overrides for the keys a recipe leaves '???' (real recipes name no real model here)."""
    return [f"{k}=placeholder" for k in sorted(OmegaConf.missing_keys(OmegaConf.load(path)))]


def test_every_algorithm_has_a_recipe_and_a_tiny_one() -> None:
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    for algo in ALGORITHMS:
        assert f"{algo}.yaml" in names and f"tiny/{algo}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_file_reads_into_its_schema(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path, _placeholders(path))
    assert isinstance(recipe, Recipe)
    assert recipe.algorithm == path.stem  # files are named after their algorithm
    # What --print-config writes reads back into the same recipe.
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(as_mapping(recipe), sort_keys=False))
    assert load_recipe(again) == recipe


@pytest.mark.parametrize("path", sorted(TINY.glob("*.yaml")), ids=lambda p: p.stem)
def test_tiny_recipe_builds_on_its_devices_without_writing(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the tiny recipes write under runs/ of the working folder
    recipe = load_recipe(path)
    trainer, module, dm = build(recipe)
    assert type(module).__name__ == REGISTRY[recipe.algorithm].cls
    assert trainer.num_devices == recipe.trainer.devices == 4
    assert len(dm.train_set) >= recipe.data.batch_size  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama HF folder with the byte tokenizer, standing in for a real checkpoint."""
    from lightning_real.data.tokenizer import byte_tokenizer, save_tokenizer
    from lightning_real.models.hf import save_tiny_hf
    from lightning_real.models.spec import tiny_spec

    folder = tmp_path_factory.mktemp("hf") / "llama"
    save_tiny_hf(tiny_spec("llama"), folder)
    save_tokenizer(byte_tokenizer(), folder)
    return folder


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_full_recipe_builds_with_an_hf_folder(algo: str, tiny_hf: Path, tmp_path: Path) -> None:
    path = ROOT / "recipes" / f"{algo}.yaml"
    kind = {"sft": "sft", "rw": "preference", "dpo": "preference"}.get(algo, "prompts")
    fill = {"data.train": f"${{asset:{kind}}}"}
    missing = sorted(OmegaConf.missing_keys(OmegaConf.load(path)))
    if "reward.fn" in missing:  # a verifiable reward scores prompt rows that carry their answers
        from lightning_real.data.arithmetic import write_arithmetic

        fill["reward.fn"] = "lightning_real.data.arithmetic:exact_match"
        fill["data.train"] = str(write_arithmetic(tmp_path / "arithmetic")["train"])
    overrides = [f"{k}={fill.get(k, tiny_hf)}" for k in missing]
    small = ["data.max_len=128", "data.max_prompt_len=64", "data.batch_size=64"]
    if USES[algo].data == "prompts":
        small.append("generation.max_new_tokens=16")
    if algo == "dapo":
        small.append("grpo.overlong_buffer=4")  # within the shorter responses
    cpu = [
        "trainer.accelerator=cpu",
        "trainer.devices=4",
        "plan=symmetric",
        f"trainer.output_dir={tmp_path}/out",
    ]
    recipe = load_recipe(path, [*overrides, *small, *cpu])
    assert recipe.data.tokenizer == str(tiny_hf)  # ${actor.path} / ${reward.path}
    _, module, _ = build(recipe)
    assert type(module).__name__ == REGISTRY[algo].cls
    assert not (tmp_path / "out").exists()


# ---- bad input: one message, no traceback, nothing written -----------------------------------------
def _fails(capsys: pytest.CaptureFixture[str], tmp_path: Path, recipe: Path | str, *overrides: str) -> str:
    """Run the CLI on a recipe expected to fail; returns its message after checking that nothing
    was written (no output or export folder)."""
    out, exp = tmp_path / "out", tmp_path / "export"
    args = ["run", str(recipe), *overrides, f"trainer.output_dir={out}", f"export.dir={exp}"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-real run: error: ")
    assert not out.exists() and not exp.exists()
    return lines[0]


def test_malformed_yaml_names_file_and_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: sft\nactor:\n  tiny: llama\n data:\n  train: x.jsonl\n")
    msg = _fails(capsys, tmp_path, bad)
    assert f"{bad} line 4, column 2: malformed YAML" in msg


def test_unknown_key_suggests_the_closest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    msg = _fails(capsys, tmp_path, TINY / "ppo.yaml", "ppo.kl_coeff=0.02")
    assert msg.endswith("unknown key 'ppo.kl_coeff'; did you mean 'ppo.kl_coef'?")
    msg = _fails(capsys, tmp_path, TINY / "sft.yaml", "trainr.devices=2")
    assert msg.endswith("unknown key 'trainr'; did you mean 'trainer'?")


def test_unknown_key_in_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = (TINY / "sft.yaml").read_text().replace("  max_steps: 4", "  max_step: 4")
    bad = tmp_path / "typo.yaml"
    bad.write_text(text)
    msg = _fails(capsys, tmp_path, bad)
    assert msg.endswith("unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'?")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.truncation=middle", "key 'data.truncation': 'middle' is not allowed; allowed: left, reject"),
        (
            "trainer.logger=tensorboard",
            "key 'trainer.logger': 'tensorboard' is not allowed; allowed: csv, wandb, none",
        ),
        ("trainer.devices=four", "key 'trainer.devices': expected an integer, got 'four' (str)"),
        ("optim.lr=-1", "key 'optim.lr': -1.0 is not allowed; allowed: a positive number"),
        ("data.batch_size=0", "key 'data.batch_size': 0 is not allowed; allowed: an integer >= 1"),
        (
            "optim.betas=[0.9]",
            "key 'optim.betas': expected a list of 2 values (a number, a number), got 1 values",
        ),
        ("algorithm=rlhf", "key 'algorithm': 'rlhf' is not allowed; allowed: sft, rw, ppo, grpo, remax, dpo"),
        ("trainer.max_steps=0", "key 'trainer.max_steps': 0 is not allowed; allowed: an integer >= 1"),
        ("n_mbs.actor_train=2", "key 'n_mbs': algorithm 'sft' has one call; give one integer, e.g. n_mbs=2"),
        ("ppo.kl_coef=0.1", "section 'ppo' is not used by algorithm 'sft' (it reads: optim); remove it"),
        (
            "critic.tiny=llama",
            "algorithm 'sft' has no critic model (it uses: actor); remove the critic section",
        ),
        (
            "actor.path=???",
            "key 'actor.path' is required: the recipe leaves it '???'; set it, e.g. actor.path=...",
        ),
        ("data.max_len=512", "data.max_len = 512 exceeds the actor model's 256 positions"),
        ("trainer.start", "override 'trainer.start': expected key=value, e.g. trainer.devices=4"),
    ],
)
def test_bad_value_names_key_and_allowed_values(
    override: str, expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert expected in _fails(capsys, tmp_path, TINY / "sft.yaml", override)


def test_bad_value_inside_a_nested_algorithm_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    msg = _fails(capsys, tmp_path, TINY / "ppo.yaml", "ppo.kl_estimator=k4")
    assert msg.endswith("key 'ppo.kl_estimator': 'k4' is not allowed; allowed: k1, k2, k3")
    msg = _fails(capsys, tmp_path, TINY / "ppo.yaml", "reward.rule=judge")
    assert msg.endswith("key 'reward.rule': 'judge' is not allowed; allowed: task")
    msg = _fails(capsys, tmp_path, TINY / "ppo.yaml", "n_mbs.actor_trian=2")
    assert "key 'n_mbs': ppo_graph: n_mbs names unknown calls ['actor_trian']" in msg
    msg = _fails(capsys, tmp_path, TINY / "dpo.yaml", "actor.tiny=null", "actor.rule=task")
    assert "a rule replaces only the reward model of ppo, grpo and remax" in msg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["plan.actor_train=d2x1"], "key 'plan.actor_train': layout 'd2x1': expected degrees like 'd2t2p1'"),
        (
            ["plan.actor_train=d2t2p1@0-1"],
            "key 'plan.actor_train': layout d2t2p1@0-1: dp*tp*pp = 2*2*1 = 4 but 2 ranks are given",
        ),
        (
            ["plan.actor_train=d2t2p2"],
            "key 'plan': call actor_train: layout d2t2p2: dp*tp*pp = 8 must equal the world size 4",
        ),
        (["plan.actor_train=d1t4p1"], "2 key/value heads are not divisible by tp=4"),
        (["plan.actor_gen=d4t1p1"], "key 'plan': names calls ['actor_gen'] that the graph does not have"),
        (["plan=diagonal"], "key 'plan': 'diagonal' is not allowed; allowed: symmetric, disjoint, search"),
        (
            ["plan.actor_train=d4t1p1", "data.batch_size=6"],
            "6 input rows and 6 sequences must both be divisible by dp=4",
        ),
    ],
)
def test_invalid_plan_is_reported_before_launch(
    overrides: list[str], expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert expected in _fails(capsys, tmp_path, TINY / "sft.yaml", *overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["actor.tiny=null", "actor.path={tmp}/nope"],
            "key 'actor.path': model folder '{tmp}/nope' does not exist",
        ),
        (["actor.tiny=null", "actor.path={tmp}"], "key 'actor.path': '{tmp}' has no config.json"),
        (["data.train={tmp}/nope.jsonl"], "key 'data.train': data file '{tmp}/nope.jsonl' does not exist"),
        (["data.val={tmp}/val.jsonl"], "key 'data.val': data file '{tmp}/val.jsonl' does not exist"),
        (["data.tokenizer={tmp}/tok"], "key 'data.tokenizer': tokenizer folder '{tmp}/tok' does not exist"),
        (
            ["trainer.resume_from={tmp}/ckpt"],
            "key 'trainer.resume_from': checkpoint '{tmp}/ckpt' does not exist",
        ),
        (["plan={tmp}/plan.yaml"], "key 'plan': plan file '{tmp}/plan.yaml' does not exist"),
    ],
)
def test_missing_path_is_named(
    overrides: list[str], expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    over = [o.format(tmp=tmp_path) for o in overrides]
    assert expected.format(tmp=tmp_path) in _fails(capsys, tmp_path, TINY / "sft.yaml", *over)


def test_interpolation_of_a_required_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # data.tokenizer: ${actor.path} in the full recipe, with actor.path left '???'
    msg = _fails(capsys, tmp_path, ROOT / "recipes" / "sft.yaml", "data.train=x.jsonl")
    assert msg.endswith(
        "key 'actor.path' is required: the recipe leaves it '???'; set it, e.g. actor.path=..."
    )


@pytest.mark.parametrize(
    ("recipe", "field", "row"),
    [
        ("sft", "response", {"prompt": "abc say a:"}),
        ("dpo", "rejected", {"prompt": "abc say a:", "chosen": "aaa"}),
        ("ppo", "prompt", {"text": "abc say a:"}),
    ],
)
def test_row_missing_a_field_is_one_message(
    recipe: str, field: str, row: dict[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = json.loads((ROOT / "lightning_real/data/assets/preference.jsonl").read_text().splitlines()[0])
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({**good, "response": "aaa"}) + "\n" + json.dumps(row) + "\n")
    msg = _fails(capsys, tmp_path, TINY / f"{recipe}.yaml", f"data.train={rows}", "data.batch_size=1")
    assert msg.endswith(f"{rows} line 2: missing field {field!r} (the row has: {', '.join(row)})")


def test_existing_export_is_not_overwritten(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "export" / "actor").mkdir(parents=True)
    (tmp_path / "export" / "actor" / "keep.txt").write_text("previous run")
    out = tmp_path / "out"
    code = cli_main(
        ["run", str(TINY / "sft.yaml"), f"trainer.output_dir={out}", f"export.dir={tmp_path / 'export'}"]
    )
    assert code == 2
    assert "already exists; give another export.dir or export.overwrite=true" in capsys.readouterr().err
    assert (tmp_path / "export" / "actor" / "keep.txt").read_text() == "previous run"
    assert not out.exists()


def test_recipe_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe("no/such/recipe.yaml")
    assert issubclass(RecipeError, ValueError)


# ---- overrides ---------------------------------------------------------------------------------------
def test_overrides_merge_in_order_over_the_file() -> None:
    r = load_recipe(
        TINY / "ppo.yaml",
        [
            "trainer.devices=2",
            "ppo.kl_coef=0.02",
            "ppo.kl_estimator=k3",
            "optim.betas=[0.9,0.99]",
            "generation.eos_token_id=[1,2]",
            "optim.lr=1e-5",
            "trainer.max_steps=7",
            "trainer.max_steps=9",  # a later override wins
        ],
    )
    assert r.trainer.devices == 2 and r.trainer.max_steps == 9
    assert r.ppo.kl_coef == 0.02 and r.ppo.kl_estimator == "k3"
    assert r.ppo.clip_eps == 0.2  # untouched keys keep the file's or the default value
    assert r.optim.betas == (0.9, 0.99) and r.optim.lr == 1e-5
    assert r.generation.eos_token_id == (1, 2) and r.generation.max_new_tokens == 8
    assert r.data.batch_size == 8 and r.reward.rule == "task"


def test_override_switches_plan_between_name_and_layouts() -> None:
    assert load_recipe(TINY / "ppo.yaml", ["plan.actor_gen=d4t1p1"]).plan == {"actor_gen": "d4t1p1"}
    assert load_recipe(TINY / "sft.yaml", ["plan=disjoint"]).plan == "disjoint"
    assert load_recipe(TINY / "sft.yaml", ["plan.actor_train=d2t2p1"]).plan == {"actor_train": "d2t2p1"}


def test_interpolations_follow_overrides() -> None:
    r = load_recipe(ROOT / "recipes" / "sft.yaml", ["actor.path=/models/a", "data.train=rows.jsonl"])
    assert r.data.tokenizer == "/models/a"
    assert load_recipe(TINY / "sft.yaml").data.train.endswith("lightning_real/data/assets/sft.jsonl")


def test_null_override_unsets_a_role() -> None:
    r = load_recipe(TINY / "sft.yaml", ["actor.tiny=null", "actor.path=/models/a"])
    assert r.actor.tiny is None and r.actor.path == "/models/a"


# ---- launch ------------------------------------------------------------------------------------------
def test_start_method_spawns_when_started_from_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr("sys.argv", ["lightning-real", "run", "r.yaml", "a=1"])
    assert start_method(TrainerConfig(), ["r.yaml", "a=1"]) == "popen"
    assert start_method(TrainerConfig(), ["r.yaml", "a=2"]) == "spawn"
    assert start_method(TrainerConfig(), ()) == "spawn"
    assert start_method(TrainerConfig(start_method="popen"), ()) == "popen"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert start_method(TrainerConfig(start_method="spawn"), ()) == "popen"


def test_devices_follow_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    w = resolve_world(TrainerConfig())
    assert (w.devices, w.num_nodes, w.size) == (4, 2, 8)
    # a recipe's own devices (the tiny recipes say 4) give way to the launcher's world
    w = resolve_world(TrainerConfig(devices=2, num_nodes=1))
    assert (w.devices, w.num_nodes) == (4, 2)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert resolve_world(TrainerConfig(accelerator="cpu")).size == 1


# ---- reference -----------------------------------------------------------------------------------------
def test_reference_covers_every_key_and_is_in_the_docs() -> None:
    text = reference()
    keys = valid_keys(Recipe)
    for key in keys:
        if any(k.startswith(key + ".") for k in keys):
            assert f"### `{key}`" in text, key  # a section
        elif not re.match(r"^(critic|reward|ref)\.", key):  # the role sections share actor's table
            assert f"| `{key}` |" in text, key
    docs = (ROOT / "docs" / "recipes.md").read_text()
    assert text in docs, "docs/recipes.md is out of date: paste `lightning-real run --help-config` into it"
