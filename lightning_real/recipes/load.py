"""Read a recipe: a YAML file plus dotted ``key=value`` overrides, merged with OmegaConf and
converted into the :class:`~lightning_real.recipes.schema.Recipe` schema.

Overrides use OmegaConf's dotlist syntax: ``trainer.devices=4``, ``plan=disjoint``,
``plan.actor_train=d1t2p2``, ``optim.betas=[0.9,0.99]``, ``ref.path=null``. They are applied in
order after the file, then ``${...}`` interpolations are resolved, so ``${data.batch_size}``
follows an override. ``${asset:sft}`` names a file of the shipped task
(``lightning_real/data/assets/sft.jsonl``), so the tiny recipes run from any folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_real.recipes.convert import required_error, to_dataclass
from lightning_real.recipes.errors import RecipeError
from lightning_real.recipes.schema import SECTIONS, USES, Recipe


def _asset(kind: str) -> str:
    from lightning_real.data.task import asset

    try:
        return str(asset(kind))
    except ValueError as e:
        raise RecipeError(f"${{asset:{kind}}}: {e}") from None


def _register_resolvers() -> None:
    import omegaconf
    from omegaconf import OmegaConf

    # OmegaConf 2.4 deprecates register_new_resolver (2.1-2.3) for a new register_resolver.
    major, minor = (int(x) for x in omegaconf.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        OmegaConf.register_resolver("asset", _asset, replace=True)
    else:
        OmegaConf.register_new_resolver("asset", _asset, replace=True)


def read_yaml(path: str | Path) -> Any:
    """The recipe file as an OmegaConf node; malformed YAML names the file, line and column."""
    import yaml
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {str(p)!r} does not exist (give a recipe YAML, e.g. recipes/sft.yaml)")
    try:
        node = OmegaConf.load(p)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(s for s in (e.problem, e.context) if s) or "cannot parse"
        raise RecipeError(f"{p}{where}: malformed YAML: {what}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: malformed YAML: {e}") from None
    if not OmegaConf.is_dict(node):
        raise RecipeError(f"{p}: expected a mapping of keys at the top level (algorithm: ..., actor: ...)")
    return node


def parse_overrides(overrides: Sequence[str]) -> Any:
    """The overrides as one OmegaConf node (in order: a later one wins)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    nodes = []
    for o in overrides:
        key, eq, _ = o.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"override {o!r}: expected key=value, e.g. trainer.devices=4")
        try:
            nodes.append(OmegaConf.from_dotlist([o]))
        except OmegaConfBaseException as e:
            raise RecipeError(f"override {o!r}: {_first_line(e)}") from None
    return OmegaConf.merge(*nodes) if nodes else OmegaConf.create({})


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def merged_mapping(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe file with the overrides applied and interpolations resolved, as plain data."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    node = read_yaml(path)
    overrides_node = parse_overrides(overrides)
    try:
        merged = OmegaConf.merge(node, overrides_node)
        data = OmegaConf.to_container(merged, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:
        missing = re.search(r"Missing mandatory value: ([\w.\[\]]+)", str(e))
        if missing:  # an interpolation of a '???' key, e.g. data.tokenizer: ${actor.path}
            raise RecipeError(f"{path}: {required_error(missing.group(1))}") from None
        key = getattr(e, "full_key", None)
        where = f"key {key!r}: " if key else ""
        # OmegaConf prefixes a resolver's own error with 'XError raised while resolving interpolation: '.
        text = re.sub(r"^\w+ raised while resolving interpolation: ", "", _first_line(e))
        raise RecipeError(f"{path}: {where}{text}") from None
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def check_sections(data: Mapping[str, Any], recipe: Recipe) -> None:
    """Sections of another algorithm are mistakes (``ppo.kl_coef`` in a DPO recipe does nothing)."""
    use = USES[recipe.algorithm]
    for section in SECTIONS:
        if section in data and section not in use.sections:
            raise RecipeError(
                f"section {section!r} is not used by algorithm {recipe.algorithm!r} "
                f"(it reads: {', '.join(use.sections)}); remove it"
            )


def with_preset(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with the preset of its algorithm under its ``grpo`` section: ``algorithm: dapo``
    means GRPO's settings with DAPO's (``GRPOConfig.preset``), and the keys the recipe gives win."""
    from lightning_real.algorithms.grpo import PRESETS

    out = dict(data)
    algorithm = out.get("algorithm")
    preset = PRESETS.get(algorithm) if isinstance(algorithm, str) else None
    section = out.get("grpo")
    section = {} if section is None else section
    if preset and isinstance(section, Mapping):
        out["grpo"] = {**preset, **section}
    return out


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe at ``path`` with ``overrides`` (``["trainer.devices=4", ...]``) applied.

    Checks keys, types and values (:class:`RecipeError` naming the file and the key); paths
    and cross-checks against models and data are :func:`~lightning_real.recipes.builder.build`'s.
    """
    data = with_preset(merged_mapping(path, overrides))
    try:
        recipe = to_dataclass(Recipe, data)
        check_sections(data, recipe)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    return recipe


def as_mapping(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a YAML file would hold it (load_recipe reads it back), without the roles
    and sections its algorithm leaves unused."""
    from lightning_real.recipes.convert import to_plain

    use = USES[recipe.algorithm]
    data: dict[str, Any] = to_plain(recipe)
    for role in ("actor", "critic", "reward", "ref"):
        if not getattr(recipe, role).given:
            del data[role]
        else:
            data[role] = {k: v for k, v in data[role].items() if v is not None}
    for section in SECTIONS:
        if section not in use.sections:
            del data[section]
    return data
