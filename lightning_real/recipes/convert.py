"""Plain mappings (parsed YAML) into frozen dataclasses, with one clear message per mistake.

Every key is checked against the dataclass fields (an unknown key names the closest valid one),
every value against the field's type hint (a wrong one names the key and what is allowed), and
the dataclass's own ``__post_init__`` checks are reported under the recipe key they concern.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from lightning_real.recipes.errors import RecipeError
from lightning_real.recipes.schema import MISSING

T = TypeVar("T")


@cache
def hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's init fields."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init}


def is_dataclass_type(tp: Any) -> bool:
    """Whether ``tp`` is a dataclass (the class, not an instance)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema rooted at ``cls`` (sections and their fields)."""
    keys: list[str] = []
    for name, tp in hints(cls).items():
        key = prefix + name
        keys.append(key)
        if is_dataclass_type(tp):
            keys.extend(valid_keys(tp, key + "."))
    return keys


def suggest(key: str, candidates: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) in (Union, types.UnionType):
        return get_args(tp)
    return None


def describe(tp: Any) -> str:
    """What a type hint allows, in words for messages and the reference."""
    args = _union_args(tp)
    if args is not None:
        return " or ".join(describe(a) for a in args)
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin = get_origin(tp)
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
    if origin in (dict, Mapping):
        return f"a mapping of names to {_plural(get_args(tp)[1])}"
    if is_dataclass_type(tp):
        return "a section (mapping)"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    words = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    return words.get(tp, describe(tp))


def _same_shape(tp: Any, value: Any) -> bool:
    """Whether ``value`` is a mapping, a list or a scalar as ``tp`` is."""
    origin = get_origin(tp)
    container = origin in (dict, Mapping) or is_dataclass_type(tp)
    if isinstance(value, Mapping):
        return container
    if isinstance(value, list | tuple):
        return origin is tuple
    return not container and origin is not tuple


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads '1e-5' (no dot) as a string; accept what float() reads.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # a name or path that YAML read as a number
    raise RecipeError(f"key {key!r}: expected {describe(tp)}, got {_show(value)}")


def required_error(key: str) -> RecipeError:
    """The error of a key the recipe leaves '???'."""
    return RecipeError(f"key {key!r} is required: the recipe leaves it '???'; set it, e.g. {key}=...")


def convert_value(tp: Any, value: Any, key: str, root: type) -> Any:
    """``value`` as type ``tp``; ``key`` is its dotted name for messages."""
    if isinstance(value, str) and value == MISSING:
        raise required_error(key)
    args = _union_args(tp)
    if args is not None:
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(f"key {key!r}: expected {describe(tp)}, got null")
        arms = [a for a in args if a is not type(None) and _same_shape(a, value)]
        if len(arms) == 1:
            # One arm of the value's shape explains a mistake best (e.g. a bad entry of a mapping).
            return convert_value(arms[0], value, key, root)
        for arm in arms:
            try:
                return convert_value(arm, value, key, root)
            except RecipeError:
                continue
        raise RecipeError(f"key {key!r}: expected {describe(tp)}, got {_show(value)}")
    if value is None:
        raise RecipeError(f"key {key!r}: expected {describe(tp)}, got null")
    if get_origin(tp) is Literal:
        allowed = get_args(tp)
        if value in allowed and not isinstance(value, bool):
            return value
        raise RecipeError(
            f"key {key!r}: {value!r} is not allowed; allowed: {', '.join(str(a) for a in allowed)}"
        )
    if tp in (bool, int, float, str):
        return _scalar(tp, value, key)
    origin = get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"key {key!r}: expected {describe(tp)}, got {_show(value)}")
        items = get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(convert_value(items[0], v, f"{key}[{i}]", root) for i, v in enumerate(value))
        if len(value) != len(items):
            raise RecipeError(f"key {key!r}: expected {describe(tp)}, got {len(value)} values")
        return tuple(convert_value(a, v, f"{key}[{i}]", root) for i, (a, v) in enumerate(zip(items, value)))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise RecipeError(f"key {key!r}: expected {describe(tp)}, got {_show(value)}")
        _, vt = get_args(tp)
        return {str(k): convert_value(vt, v, f"{key}.{k}", root) for k, v in value.items()}
    if is_dataclass_type(tp):
        return to_dataclass(tp, value, key + ".", root)
    raise RecipeError(f"key {key!r}: unsupported type {tp!r}")  # a schema bug, not a user error


def to_dataclass(cls: type[T], data: Any, prefix: str = "", root: type | None = None) -> T:
    """An instance of dataclass ``cls`` from mapping ``data``; missing keys keep their defaults.

    ``prefix`` is the dotted path of ``data`` in the recipe (``"ppo."``); ``root`` the schema's
    top class, whose keys an unknown key is compared with.
    """
    root = root or cls
    section = prefix.rstrip(".") or "the recipe"
    if not isinstance(data, Mapping):
        raise RecipeError(f"{section}: expected a mapping of keys, got {_show(data)}")
    fields = hints(cls)  # type: ignore[arg-type]  # a dataclass type is hashable
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            siblings = [prefix + f for f in fields]
            hint = suggest(key, siblings) or suggest(key, valid_keys(root))
            raise RecipeError(f"unknown key {key!r}{hint}")
        kwargs[name] = convert_value(fields[name], value, key, root)
    required = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in kwargs
    ]
    if required:
        key = prefix + required[0]
        raise RecipeError(f"key {key!r} is required ({describe(fields[required[0]])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise RecipeError(_rename(str(e), cls, prefix, section)) from None


def _rename(message: str, cls: type, prefix: str, section: str) -> str:
    # Dataclass checks say 'PPOConfig.clip_eps=-1; allowed: ...'; the recipe calls that key
    # 'ppo.clip_eps'.
    names = {c.__name__ for c in cls.__mro__ if dataclasses.is_dataclass(c)}
    m = re.match(r"^(?:(\w+)\.)?(\w+)=(.+?); (.*)$", message, re.S)
    if m and (m.group(1) is None or m.group(1) in names) and m.group(2) in hints(cls):
        return f"key '{prefix}{m.group(2)}': {m.group(3)} is not allowed; {m.group(4)}"
    for name in names:
        message = message.replace(f"{name}.", prefix)
    return f"{section}: {message}"


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain YAML-safe data (tuples become lists): the form recipes are read in."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj
