"""Checks of a recipe that need no model or data: roles, paths, plan strings, counts.

They run before anything is built or written, so a typo in a path or a layout costs a second,
not a process launch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lightning_real.recipes.errors import RecipeError
from lightning_real.recipes.schema import MISSING, ROLES, USES, ModelSourceConfig, Recipe

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_roles(recipe: Recipe) -> None:
    """Each role the algorithm needs is given once, and no role it does not use is given."""
    use = USES[recipe.algorithm]
    for role in ROLES:
        src: ModelSourceConfig = getattr(recipe, role)
        if not src.given:
            if role in use.required:
                extra = ", or reward.rule=task" if role == "reward" and role not in use.trained else ""
                raise RecipeError(
                    f"algorithm {recipe.algorithm!r} needs a {role} model: give {role}.path (an HF folder) "
                    f"or {role}.tiny (llama, qwen2, gpt2){extra}"
                )
            continue
        if role not in use.roles:
            raise RecipeError(
                f"algorithm {recipe.algorithm!r} has no {role} model (it uses: {', '.join(use.roles)}); "
                f"remove the {role} section"
            )
        given = [k for k in ("path", "tiny", "rule", "fn") if getattr(src, k) is not None]
        if len(given) > 1:
            raise RecipeError(f"{role}: give one of path, tiny, rule, fn; got {' and '.join(given)}")
        for key in ("rule", "fn"):
            if getattr(src, key) is not None and (role != "reward" or role in use.trained):
                raise RecipeError(
                    f"key '{role}.{key}': a rule replaces only the reward model of ppo, grpo and remax; "
                    f"give {role}.path or {role}.tiny"
                )


def check_model_path(key: str, path: str) -> None:
    """``path`` is an HF checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"key {key!r}: model folder {path!r} does not exist")
    if not (p / "config.json").is_file():
        raise RecipeError(f"key {key!r}: {path!r} has no config.json (expected an HF checkpoint folder)")


def check_paths(recipe: Recipe) -> None:
    """Model folders, data files, the tokenizer, a plan file and the resume checkpoint exist."""
    for role in ROLES:
        src: ModelSourceConfig = getattr(recipe, role)
        if src.path is not None:
            check_model_path(f"{role}.path", src.path)
    d = recipe.data
    if not d.train or d.train == MISSING:
        raise RecipeError("key 'data.train' is required: a JSONL file or a saved HF dataset folder")
    for key, path in (("data.train", d.train), ("data.val", d.val)):
        if path is not None and not Path(path).exists():
            raise RecipeError(f"key {key!r}: data file {path!r} does not exist")
    if d.tokenizer is not None:
        tok = Path(d.tokenizer)
        if not tok.is_dir():
            raise RecipeError(f"key 'data.tokenizer': tokenizer folder {d.tokenizer!r} does not exist")
        if not any((tok / f).is_file() for f in _TOKENIZER_FILES):
            raise RecipeError(
                f"key 'data.tokenizer': {d.tokenizer!r} holds neither {' nor '.join(_TOKENIZER_FILES)}"
            )
    if recipe.trainer.resume_from is not None:
        check_resume(recipe.trainer.resume_from)


def check_resume(resume: str) -> None:
    """``resume`` is a complete checkpoint folder, or the one an interrupted save left beside it
    (``<name>.old``, which the run loads); otherwise the error names the newest complete one."""
    from lightning_real.checkpoint.folders import CheckpointError, complete_folder
    from lightning_real.checkpoint.sharded import META_FILE, newest_checkpoint

    path = Path(resume)
    try:
        complete_folder(path, META_FILE)
        return
    except CheckpointError:
        pass
    if not path.exists():
        problem = f"checkpoint {resume!r} does not exist"
    else:
        problem = f"{resume!r} has no {META_FILE} (expected a checkpoint folder written by a recipe run)"
    newest = newest_checkpoint(path.parent)
    hint = (
        f"; the newest complete checkpoint beside it is {str(newest)!r}: pass trainer.resume_from={newest}"
        if newest is not None and newest != path
        else ""
    )
    raise RecipeError(f"key 'trainer.resume_from': {problem}{hint}")


def check_plan_text(recipe: Recipe) -> None:
    """The plan is a known name, an existing YAML file, or a mapping of parsable layouts."""
    from lightning_real.layout import Layout, LayoutError
    from lightning_real.plans import PLAN_NAMES

    plan = recipe.plan
    if isinstance(plan, Mapping):
        if not plan:
            raise RecipeError("key 'plan': an empty mapping; give a layout per call or a plan name")
        for call, text in plan.items():
            try:
                Layout.parse(text)
            except LayoutError as e:
                raise RecipeError(f"key 'plan.{call}': {e}") from None
        return
    if plan.strip().lower() in PLAN_NAMES:
        return
    if plan.strip().lower().endswith((".yaml", ".yml")):
        if not Path(plan).is_file():
            raise RecipeError(f"key 'plan': plan file {plan!r} does not exist")
        return
    raise RecipeError(
        f"key 'plan': {plan!r} is not allowed; allowed: {', '.join(PLAN_NAMES)}, a plan YAML file, "
        "or a mapping from call name to layout (plan.actor_train=d1t2p2)"
    )


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise RecipeError(f"key {key!r}: {value} is not allowed; allowed: an integer >= {low}")


def check_counts(recipe: Recipe) -> None:
    """Steps, intervals, microbatches and export roles are in range."""
    t = recipe.trainer
    _at_least("trainer.max_steps", t.max_steps, 1)
    _at_least("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    _at_least("trainer.val_every_n_steps", t.val_every_n_steps, 0)
    if t.val_before_training and (recipe.data.val is None or USES[recipe.algorithm].data != "prompts"):
        raise RecipeError(
            "key 'trainer.val_before_training': needs data.val and a rollout algorithm "
            "(ppo, remax or GRPO's family), which evaluates held-out prompts"
        )
    _at_least("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps, 0)
    if t.keep_checkpoints == 0 or t.keep_checkpoints < -1:
        raise RecipeError(
            f"key 'trainer.keep_checkpoints': {t.keep_checkpoints} is not allowed; allowed: -1 (all) or an integer >= 1"
        )
    _at_least("strategy.search_steps", recipe.strategy.search_steps, 1)
    if recipe.strategy.gpus_per_node is not None:
        _at_least("strategy.gpus_per_node", recipe.strategy.gpus_per_node, 1)
    timeout = recipe.strategy.timeout_s
    if timeout is not None and not timeout > 0:
        raise RecipeError(
            f"key 'strategy.timeout_s': {timeout} is not allowed; allowed: a number of seconds > 0, or null"
        )
    use = USES[recipe.algorithm]
    if isinstance(recipe.n_mbs, Mapping):
        if recipe.algorithm in ("sft", "rw"):
            raise RecipeError(
                f"key 'n_mbs': algorithm {recipe.algorithm!r} has one call; give one integer, e.g. n_mbs=2"
            )
        for call, n in recipe.n_mbs.items():
            _at_least(f"n_mbs.{call}", n, 1)
    else:
        _at_least("n_mbs", recipe.n_mbs, 1)
    roles = recipe.export.roles
    if roles is not None:
        for role in roles:
            if role not in use.trained:
                raise RecipeError(
                    f"key 'export.roles': {role!r} is not allowed for {recipe.algorithm!r}; "
                    f"allowed: {', '.join(use.trained)} (the trained models)"
                )
        if recipe.export.dir is None:
            raise RecipeError("key 'export.roles' is set but export.dir is null; give export.dir")


def export_roles(recipe: Recipe) -> tuple[str, ...]:
    """Roles written at the end (none without ``export.dir``)."""
    if recipe.export.dir is None:
        return ()
    return recipe.export.roles if recipe.export.roles is not None else USES[recipe.algorithm].trained[:1]


def check_export(recipe: Recipe) -> None:
    """Export folders do not exist yet, unless overwriting is asked for."""
    if recipe.export.dir is None or recipe.export.overwrite:
        return
    for role in export_roles(recipe):
        folder = Path(recipe.export.dir) / role
        if folder.exists():
            raise RecipeError(
                f"key 'export.dir': {str(folder)!r} already exists; give another export.dir "
                "or export.overwrite=true"
            )


def validate(recipe: Recipe) -> None:
    """Every check that needs neither models nor data."""
    check_roles(recipe)
    check_counts(recipe)
    check_plan_text(recipe)
    check_paths(recipe)
    check_export(recipe)
