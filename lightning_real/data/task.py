"""The shipped toy task, "say the letter": a rule-based reward a tiny model learns in minutes on CPU.

A prompt names a target vowel at its end, after a random lowercase word: ``"qwzk say e:"``. The
reward of a response is the mean over its characters (the first 32) of 1 for the target vowel,
0.5 for another vowel, 0.25 for any other lowercase ASCII letter and 0 for anything else; an
empty response scores 0. So the reward is in [0, 1] and climbs a ladder: a policy gains first by
writing letters at all, then vowels (easy shifts of its output distribution), then by copying
the vowel the prompt names. A random tiny llama (byte tokenizer, sampled responses of 8 tokens)
scores about 0.03; PPO lifts it above 0.25 within a few dozen iterations of 32 prompts.

``python -m lightning_real.data.task [--out DIR] [--seed N]`` regenerates the JSONL files of
``lightning_real/data/assets/`` (the same bytes for the same seed):

* ``prompts.jsonl`` (2048 rows) and ``prompts_eval.jsonl`` (128): ``{"prompt"}``;
* ``sft.jsonl`` (1024): ``{"prompt", "response"}`` with the target vowel repeated 2-8 times;
* ``preference.jsonl`` (512): ``{"prompt", "chosen", "rejected"}``, chosen all target vowels,
  rejected made of consonants, digits and punctuation (so its reward is at most 0.25).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).parent / "assets"
"""Folder of the shipped task files."""
LETTERS = string.ascii_lowercase
TARGETS = "aeiou"
"""Letters a prompt may ask for."""
MAX_SCORED_CHARS = 32
"""Characters of a response that count towards its reward."""
TARGET_SET_CREDIT = 0.5
"""Reward of a character that is another letter of TARGETS (a vowel, but not the one asked for)."""
OTHER_LETTER_CREDIT = 0.25
"""Reward of any other lowercase letter."""
_TARGET = re.compile(rf"say ([{TARGETS}]):\s*$")
SIZES: dict[str, int] = {"prompts": 2048, "prompts_eval": 128, "sft": 1024, "preference": 512}
"""Rows of each shipped file."""
_SEED_OFFSET = {"prompts": 0, "prompts_eval": 1, "sft": 2, "preference": 3}


def target_letter(prompt_text: str) -> str:
    """The vowel a task prompt asks for (error for a prompt that is not of this task)."""
    m = _TARGET.search(prompt_text)
    if m is None:
        raise ValueError(f"prompt {prompt_text[-40:]!r} does not end with 'say <vowel>:'; not a task prompt")
    return m.group(1)


def reward_fn(prompt_text: str, response_text: str) -> float:
    """Reward in [0, 1]: per response character, 1 for the target vowel, 0.5 for another vowel,
    0.25 for another lowercase letter, 0 otherwise; averaged over the first 32 characters (0 when empty)."""
    target = target_letter(prompt_text)
    chars = response_text[:MAX_SCORED_CHARS]
    if not chars:
        return 0.0
    return sum(_credit(ch, target) for ch in chars) / len(chars)


def _credit(ch: str, target: str) -> float:
    if ch == target:
        return 1.0
    if ch in TARGETS:
        return TARGET_SET_CREDIT
    return OTHER_LETTER_CREDIT if ch in LETTERS else 0.0


def make_prompt(rng: random.Random) -> tuple[str, str]:
    """A random prompt and its target letter."""
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 12)))
    c = rng.choice(TARGETS)
    return f"{word} say {c}:", c


def _other_chars(rng: random.Random, c: str, n: int) -> str:
    pool = [ch for ch in LETTERS + string.digits + "!?.,;-+*#" if ch not in TARGETS]
    return "".join(rng.choice(pool) for _ in range(n))


def generate_rows(kind: str, n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Rows of one file kind ('prompts', 'prompts_eval', 'sft', 'preference'), deterministic in ``seed``."""
    if kind not in SIZES:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(SIZES)}")
    rng = random.Random(seed * 1000 + _SEED_OFFSET[kind])
    rows: list[dict[str, str]] = []
    for _ in range(SIZES[kind] if n is None else n):
        prompt, c = make_prompt(rng)
        if kind.startswith("prompts"):
            rows.append({"prompt": prompt})
        elif kind == "sft":
            rows.append({"prompt": prompt, "response": c * rng.randint(2, 8)})
        else:
            k = rng.randint(2, 8)
            rows.append({"prompt": prompt, "chosen": c * k, "rejected": _other_chars(rng, c, k)})
    return rows


def write_assets(folder: str | Path = ASSETS, seed: int = 0) -> dict[str, Path]:
    """Write every task file into ``folder``; returns kind -> path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for kind in SIZES:
        p = out / f"{kind}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in generate_rows(kind, seed=seed)))
        paths[kind] = p
    return paths


def asset(kind: str) -> Path:
    """Path of a shipped task file ('prompts', 'prompts_eval', 'sft', 'preference')."""
    if kind not in SIZES:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(SIZES)}")
    return ASSETS / f"{kind}.jsonl"


def split_texts(
    tokenizer: Any, seq: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[list[str], list[str]]:
    """Prompt and response texts of generated sequences ``[B, S]`` (special tokens dropped)."""
    prompts, responses = [], []
    for ids, am, lm in zip(seq.tolist(), attention_mask.tolist(), loss_mask.tolist()):
        prompts.append(
            tokenizer.decode([t for t, a, m in zip(ids, am, lm) if a and not m], skip_special_tokens=True)
        )
        responses.append(tokenizer.decode([t for t, m in zip(ids, lm) if m], skip_special_tokens=True))
    return prompts, responses


def score_sequences(
    tokenizer: Any, seq: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """:func:`reward_fn` of each generated sequence, ``[B]`` float32 (what a rule-based ``rew_inf`` returns)."""
    prompts, responses = split_texts(tokenizer, seq, attention_mask, loss_mask)
    return torch.tensor([reward_fn(p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)


class TaskReward:
    """The task's rule as a ``rew_inf`` body: ``(seq, attention_mask, loss_mask) -> scores [B]``."""

    def __init__(self, tokenizer: Any = None) -> None:
        from lightning_real.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer)

    def __call__(
        self, seq: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        return score_sequences(self.tokenizer, seq, attention_mask, loss_mask)


def main(argv: list[str] | None = None) -> None:
    """Regenerate the task files."""
    ap = argparse.ArgumentParser(description="write the 'say the letter' task files")
    ap.add_argument("--out", default=str(ASSETS), help=f"folder to write (default {ASSETS})")
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0, the shipped files)")
    args = ap.parse_args(argv)
    for kind, p in write_assets(args.out, args.seed).items():
        print(f"{kind}: {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
