"""Verifiable rewards: a rule ``fn(prompt, response, ground_truth) -> float`` scores each response.

A reward function is any Python callable taking the prompt text, the response text (special
tokens dropped) and the row's ground truth (a string, e.g. the expected answer) and returning a
float. Recipes name one as ``"package.module:function"``; :func:`load_reward_fn` imports it.

:class:`VerifiableReward` turns such a function into a batch scorer over generated sequences
(``seq, attention_mask, loss_mask`` as :class:`~lightning_real.data.task.TaskReward` takes them).
The ground truth travels with the rows as their dataset row number: a prompt batch's ``index``
column (:class:`~lightning_real.data.datasets.PromptDataset` items carry it, and the ``G``
responses of a prompt repeat it) is looked up in the list of answers read from the same file
(:func:`read_ground_truth`). A caller that has the answers as strings can pass them directly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_real.data.rows import read_rows
from lightning_real.data.task import split_texts

RewardFn = Callable[[str, str, str], float]
"""``fn(prompt, response, ground_truth) -> reward``."""
GROUND_TRUTH_KEY = "answer"
"""Field of a prompt row holding its ground truth."""


def load_reward_fn(spec: str) -> RewardFn:
    """The callable named ``"module:attribute"`` (the attribute may be dotted: ``"mod:Class.method"``).

    ValueError naming ``spec`` when it is not of that form, the module cannot be imported, the
    attribute is missing or it is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' (e.g. 'my_rewards:score')")
    mod_name, attr = (part.strip() for part in spec.split(":"))
    if not mod_name or not attr:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' (e.g. 'my_rewards:score')")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"reward function {spec!r}: cannot import module {mod_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"reward function {spec!r}: {attr!r} is a {type(obj).__name__}, not callable; "
            "it must be fn(prompt, response, ground_truth) -> float"
        )
    fn: RewardFn = obj
    return fn


def resolve_reward_fn(fn: str | RewardFn) -> RewardFn:
    """A callable as is, or :func:`load_reward_fn` of a ``"module:function"`` string."""
    if isinstance(fn, str):
        return load_reward_fn(fn)
    if not callable(fn):
        raise ValueError(f"reward function {fn!r}: allowed: a callable or a 'module:function' string")
    return fn


def read_ground_truth(path: str | Path, key: str = GROUND_TRUTH_KEY) -> list[str]:
    """The ``key`` field of every row of a prompt file, by row number (the datasets' ``index``)."""
    return [r.fields[key] for r in read_rows(path, (key,))]


def score_texts(
    fn: RewardFn, prompts: Sequence[str], responses: Sequence[str], truths: Sequence[str]
) -> torch.Tensor:
    """``fn`` of each (prompt, response, ground truth), ``[B]`` float32."""
    if not len(prompts) == len(responses) == len(truths):
        raise ValueError(
            f"score_texts: {len(prompts)} prompts, {len(responses)} responses, {len(truths)} ground truths"
        )
    return torch.tensor(
        [float(fn(p, r, t)) for p, r, t in zip(prompts, responses, truths)], dtype=torch.float32
    )


class VerifiableReward:
    """A reward function as a batch scorer: ``(seq, attention_mask, loss_mask, index) -> scores [B]``.

    ``fn`` is a callable or a ``"module:function"`` string; ``ground_truth`` the answers by dataset
    row number (:func:`read_ground_truth`), looked up with the batch's ``index`` column. Call
    :meth:`score` to pass the ground truths of the rows directly instead.
    """

    needs_index: ClassVar[bool] = True
    """The rollout modules hand this rule each row's prompt row number (``prompt_index``)."""

    def __init__(
        self, fn: str | RewardFn, ground_truth: Sequence[str] | None = None, tokenizer: Any = None
    ) -> None:
        from lightning_real.data.tokenizer import load_tokenizer

        self.fn = resolve_reward_fn(fn)
        self.ground_truth = None if ground_truth is None else list(ground_truth)
        self.tokenizer = load_tokenizer(tokenizer)

    def truths(self, index: torch.Tensor | Sequence[int]) -> list[str]:
        """Ground truths of dataset rows ``index``."""
        if self.ground_truth is None:
            raise ValueError("VerifiableReward has no ground_truth list; give ground_truth= or call score()")
        idx = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        n = len(self.ground_truth)
        bad = [i for i in idx if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"VerifiableReward: row index {bad[0]} outside the {n} ground-truth rows")
        return [self.ground_truth[int(i)] for i in idx]

    def score(
        self,
        seq: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        truths: Sequence[str],
    ) -> torch.Tensor:
        """Scores ``[B]`` of generated sequences given each row's ground truth."""
        prompts, responses = split_texts(self.tokenizer, seq, attention_mask, loss_mask)
        return score_texts(self.fn, prompts, responses, truths)

    def __call__(
        self,
        seq: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        index: torch.Tensor | Sequence[int],
    ) -> torch.Tensor:
        return self.score(seq, attention_mask, loss_mask, self.truths(index))
