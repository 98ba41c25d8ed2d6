"""What ``lightning-real plan`` prices: the workload of a training recipe, a planner recipe or a preset.

A training recipe of ``lightning-real run`` (one that names an ``algorithm``, see docs/recipes.md)
is read exactly as ``run`` reads it: its module is made (no models are built), and the workload is
that module's own dataflow graph and model specs with the recipe's runtime features
(:func:`lightning_real.recipes.features.recipe_features`). ``KEY=VALUE`` overrides fill its
``???``; a reward ``rule`` is priced as the actor's size. Every algorithm is priced this way.

A planner recipe describes PPO on published models. Keys read (top level, or under a
``planner:`` section that takes precedence; see docs/planner.md):

* ``models``: ``actor`` (required), ``critic``, ``ref``, ``reward``. Each is a preset name
  (``llama2-7b``, ``7b``, ``tiny``), a mapping with ``hf_config`` (a local ``config.json`` or a
  folder holding one), or a mapping of :class:`~lightning_real.models.spec.ModelSpec` fields.
  Critic and reward get a value head; the reference defaults to the actor, the critic to the
  actor's trunk, the reward to the critic.
* ``batch_size`` (512), ``prompt_len`` (128), ``gen_len`` (128), ``ppo_minibatches`` (1);
  also accepted inside ``ppo:`` or ``data:`` sections;
* ``features``: a mapping of :class:`~lightning_real.features.RuntimeFeatures` fields (default:
  the GPU engine's, :data:`~lightning_real.planner.workload.GPU_FEATURES`, which the presets assume).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_real.features import FeatureError, RuntimeFeatures
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.planner.presets import LLAMA2_SIZES, llama2_spec
from lightning_real.planner.workload import GPU_FEATURES, Workload, ppo_workload

PRESETS: tuple[str, ...] = (*(f"{p}-{s}" for p in ("llama2", "ppo") for s in LLAMA2_SIZES), "tiny")
_SCALARS = ("batch_size", "prompt_len", "gen_len", "ppo_minibatches")
_DEFAULTS = {"batch_size": 512, "prompt_len": 128, "gen_len": 128, "ppo_minibatches": 4}
"""The paper's PPO settings (ReaL trained with 4 minibatches per iteration)."""


def model_from(entry: Any, head: Literal["lm", "value"], where: str, base: Path | None = None) -> ModelSpec:
    """A ModelSpec from a recipe's model entry (preset name, ``hf_config`` path or spec fields)."""
    if isinstance(entry, str):
        key = entry.strip().lower()
        if key == "tiny":
            return tiny_spec("llama", head)
        m = re.fullmatch(r"(?:llama-?2-)?(\d+b)", key)
        if m and m.group(1) in LLAMA2_SIZES:
            return llama2_spec(m.group(1), head)
        raise ValueError(
            f"{where}: unknown model {entry!r}; allowed: llama2-7b, llama2-13b, llama2-34b, llama2-70b, tiny, "
            "or a mapping with hf_config or ModelSpec fields"
        )
    if isinstance(entry, dict):
        if "tiny" in entry:
            return tiny_spec(entry["tiny"], head)
        if "hf_config" in entry:
            return _from_hf(Path(entry["hf_config"]), head, where, base)
        fields = dict(entry)
        fields.pop("head", None)
        try:
            return ModelSpec(**fields, head=head)
        except TypeError as e:
            raise ValueError(
                f"{where}: {e}; give ModelSpec fields (family, vocab_size, hidden_size, ...)"
            ) from e
    raise ValueError(f"{where}: expected a preset name or a mapping, got {type(entry).__name__}")


def _from_hf(path: Path, head: Literal["lm", "value"], where: str, base: Path | None) -> ModelSpec:
    if not path.is_absolute() and base is not None:
        path = base / path
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{where}: hf_config {str(path)!r} is not a config.json file or a folder holding one"
        )
    import transformers

    data = json.loads(path.read_text())
    mt = data.get("model_type")
    if mt not in ("llama", "qwen2", "gpt2"):
        raise ValueError(f"{where}: model_type {mt!r} in {path}; allowed: llama, qwen2, gpt2")
    cfg = transformers.AutoConfig.for_model(**data)
    return ModelSpec.from_hf_config(cfg, head=head)


def workload_from_recipe(source: str, dotlist: Sequence[str] = (), **overrides: Any) -> Workload:
    """The workload of a recipe YAML path or a preset name; ``dotlist`` holds ``KEY=VALUE``
    overrides of the YAML, ``overrides`` replace scalars (``batch_size``, ``prompt_len``,
    ``gen_len``, ``ppo_minibatches``) when not None."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ValueError(f"recipe {source!r} does not exist")
        if _is_run_recipe(path):
            return _from_run_recipe(path, dotlist, overrides)
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            conf = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(dotlist)))
            raw = OmegaConf.to_container(conf, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            where = f" at {key} (set it with {key}=...)" if key else ""
            raise ValueError(f"recipe {source!r}: {str(e).splitlines()[0]}{where}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"recipe {source!r}: expected a mapping at the top level")
        return _from_mapping({str(k): v for k, v in raw.items()}, str(path), path.parent, overrides)
    if dotlist:
        raise ValueError(f"KEY=VALUE overrides {list(dotlist)} need a recipe YAML, not the preset {source!r}")
    key = source.strip().lower()
    if key not in PRESETS:
        raise ValueError(
            f"unknown recipe {source!r}: not a YAML file, and not a preset; presets: {', '.join(PRESETS)}"
        )
    model = "tiny" if key == "tiny" else key.split("-", 1)[1]
    return _from_mapping({"models": {"actor": model}}, key, None, overrides)


def _is_run_recipe(path: Path) -> bool:
    """Whether ``path`` is a training recipe of ``lightning-real run`` (it names an algorithm)."""
    import yaml

    try:
        top = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {str(path)!r}: not valid YAML: {str(e).splitlines()[0]}") from None
    return isinstance(top, dict) and "algorithm" in top


_RUN_KEYS = {
    "batch_size": "data.batch_size",
    "prompt_len": "data.max_prompt_len",
    "gen_len": "generation.max_new_tokens",
    "ppo_minibatches": "ppo.minibatches",
}
"""The scalar overrides of ``lightning-real plan`` as keys of a training recipe."""


def _from_run_recipe(path: Path, dotlist: Sequence[str], overrides: dict[str, Any]) -> Workload:
    """The workload ``lightning-real run`` would execute for this recipe (its module's graph)."""
    from lightning_real.data.tokenizer import byte_tokenizer
    from lightning_real.recipes.features import recipe_features
    from lightning_real.recipes.load import load_recipe
    from lightning_real.recipes.modules import make_module

    extra = [f"{_RUN_KEYS[k]}={v}" for k, v in overrides.items() if v is not None and k in _RUN_KEYS]
    # Read as `lightning-real run` reads it (its checks and messages); model paths are relative
    # to the working folder there, not to the recipe's.
    recipe = load_recipe(path, [*dotlist, *extra])
    # Pricing needs the graph and the models, not the tokenizer (which `run` checks).
    module = make_module(recipe, byte_tokenizer())
    w = Workload(module.real_graph(), module.real_specs(), recipe_features(recipe))
    w.meta["recipe"] = str(path)
    w.meta["algorithm"] = recipe.algorithm
    return w


def _from_mapping(raw: dict[str, Any], name: str, base: Path | None, overrides: dict[str, Any]) -> Workload:
    section = dict(raw)
    for sub in ("data", "ppo"):
        if isinstance(raw.get(sub), dict):
            section.update({k: v for k, v in raw[sub].items() if k in _SCALARS})
    if isinstance(raw.get("planner"), dict):
        section.update(raw["planner"])
    models = section.get("models")
    if not isinstance(models, dict) or "actor" not in models:
        raise ValueError(f"recipe {name}: needs models.actor (a preset name, hf_config or ModelSpec fields)")
    unknown = set(models) - {"actor", "critic", "ref", "reward"}
    if unknown:
        raise ValueError(
            f"recipe {name}: unknown model roles {sorted(unknown)}; allowed: actor, critic, ref, reward"
        )
    actor = model_from(models["actor"], "lm", f"{name}: models.actor", base)
    ref = model_from(models["ref"], "lm", f"{name}: models.ref", base) if "ref" in models else actor
    critic = (
        model_from(models["critic"], "value", f"{name}: models.critic", base)
        if "critic" in models
        else actor.with_head("value")
    )
    reward = (
        model_from(models["reward"], "value", f"{name}: models.reward", base)
        if "reward" in models
        else critic
    )
    vals = {k: section.get(k, _DEFAULTS[k]) for k in _SCALARS}
    vals.update({k: v for k, v in overrides.items() if v is not None})
    for k, v in vals.items():
        if not isinstance(v, int) or v < (0 if k == "gen_len" else 1):
            raise ValueError(f"recipe {name}: {k} must be a positive integer, got {v!r}")
    features = GPU_FEATURES
    if isinstance(section.get("features"), dict):
        try:
            features = RuntimeFeatures(**{**GPU_FEATURES.to_dict(), **section["features"]})
        except (TypeError, FeatureError) as e:
            raise ValueError(f"recipe {name}: features: {e}") from None
    w = ppo_workload(actor, critic, ref, reward, **vals, features=features)
    w.meta["recipe"] = name
    return w
