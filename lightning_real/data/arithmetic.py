"""A generated arithmetic task with a verifiable reward: "What is 37+48?" -> "85".

Problems are ``a + b`` and ``a - b`` with ``0 <= a, b <= max_operand`` (``a >= b`` for ``-``,
so answers are never negative). Every problem is enumerated, shuffled by ``seed`` and cut into a
held-out split (the first ``eval_rows``) and a training split (the rest), so no problem is in
both; ``37+48`` and ``48+37`` are different problems. The same seed gives the same rows.

Prompts are short for the byte tokenizer (``"What is 37+48?"``: 14 bytes). The response a model
should learn is the bare number (the SFT rows' ``"85"``; the datasets append EOS), which a small
model picks up from an SFT warm start; the reward accepts any response whose *last* number is
the answer (:func:`extract_answer`), so ``"85."`` or ``"It is 85"`` also score 1.

``python -m lightning_real.data.arithmetic --out DIR [--seed N]`` writes to ``DIR``:

* ``train.jsonl`` and ``eval.jsonl``: ``{"prompt", "answer"}`` rows of the two splits (prompt
  files for RL: the datasets read ``prompt``, :func:`~lightning_real.data.verifiable.read_ground_truth`
  reads ``answer``);
* ``sft.jsonl``: ``{"prompt", "response"}`` rows drawn from the training split, the correct answer
  as the response (the warm start).

The reward function for :class:`~lightning_real.data.verifiable.VerifiableReward` is
``"lightning_real.data.arithmetic:exact_match"``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

OPS: tuple[str, ...] = ("+", "-")
"""Operators of the task."""
MAX_OPERAND = 50
"""Default largest operand."""
EVAL_ROWS = 256
"""Default size of the held-out split."""
SFT_ROWS = 1024
"""Default number of SFT rows."""
FILES: tuple[str, ...] = ("train", "eval", "sft")
"""Files :func:`write_arithmetic` writes (``<name>.jsonl``)."""

Problem = tuple[int, str, int]


def problems(max_operand: int = MAX_OPERAND, ops: tuple[str, ...] = OPS) -> list[Problem]:
    """Every problem ``(a, op, b)`` of the task, in a fixed order."""
    if not isinstance(max_operand, int) or max_operand < 1:
        raise ValueError(f"max_operand={max_operand!r}; allowed: an integer >= 1")
    bad = [op for op in ops if op not in OPS]
    if bad or not ops:
        raise ValueError(f"ops={ops!r}; allowed: a non-empty subset of {', '.join(OPS)}")
    out: list[Problem] = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and b > a:
                    continue
                out.append((a, op, b))
    return out


def prompt_of(p: Problem) -> str:
    """``"What is a+b?"``."""
    a, op, b = p
    return f"What is {a}{op}{b}?"


def answer_of(p: Problem) -> str:
    """The answer as the response should write it: the bare integer."""
    a, op, b = p
    return str(a + b if op == "+" else a - b)


def split_problems(
    seed: int = 0, max_operand: int = MAX_OPERAND, ops: tuple[str, ...] = OPS, eval_rows: int = EVAL_ROWS
) -> tuple[list[Problem], list[Problem]]:
    """``(train, eval)``: all problems shuffled by ``seed``, the first ``eval_rows`` held out."""
    every = problems(max_operand, ops)
    if not isinstance(eval_rows, int) or not 0 < eval_rows < len(every):
        raise ValueError(f"eval_rows={eval_rows!r}; allowed: an integer in [1, {len(every) - 1}]")
    random.Random(seed).shuffle(every)
    return every[eval_rows:], every[:eval_rows]


def generate_rows(
    seed: int = 0,
    max_operand: int = MAX_OPERAND,
    ops: tuple[str, ...] = OPS,
    eval_rows: int = EVAL_ROWS,
    sft_rows: int = SFT_ROWS,
) -> dict[str, list[dict[str, str]]]:
    """Rows of every file (:data:`FILES`), deterministic in the arguments."""
    train, held = split_problems(seed, max_operand, ops, eval_rows)
    if not isinstance(sft_rows, int) or not 0 < sft_rows <= len(train):
        raise ValueError(f"sft_rows={sft_rows!r}; allowed: an integer in [1, {len(train)}]")
    sft = random.Random(seed * 1000 + 1).sample(train, sft_rows)
    return {
        "train": [{"prompt": prompt_of(p), "answer": answer_of(p)} for p in train],
        "eval": [{"prompt": prompt_of(p), "answer": answer_of(p)} for p in held],
        "sft": [{"prompt": prompt_of(p), "response": answer_of(p)} for p in sft],
    }


def write_arithmetic(
    folder: str | Path,
    seed: int = 0,
    max_operand: int = MAX_OPERAND,
    ops: tuple[str, ...] = OPS,
    eval_rows: int = EVAL_ROWS,
    sft_rows: int = SFT_ROWS,
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``sft.jsonl`` into ``folder``; returns name -> path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, rows in generate_rows(seed, max_operand, ops, eval_rows, sft_rows).items():
        p = out / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows))
        paths[name] = p
    return paths


# ---- answers and reward -------------------------------------------------------------------------
_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")
# A comma between digits followed by exactly three digits is a thousands separator: 1,000 -> 1000.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _normalise(number: str) -> str:
    sign = "-" if number.startswith("-") else ""
    whole, _, frac = number.lstrip("-").partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    if whole == "0" and not frac:
        sign = ""  # -0 is 0
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


def extract_answer(text: str) -> str | None:
    """The last number in ``text`` as a normalised string, or None when there is none.

    Tolerant of surrounding spaces and punctuation (``" 85."``, ``"= 85!"``), a Unicode minus,
    thousands separators (``"1,000"``), leading zeros (``"007"`` -> ``"7"``) and integral decimals
    (``"85.0"`` -> ``"85"``). A ``-`` right after a digit is an operator, not a sign
    (``"5-3"`` -> ``"3"``).
    """
    t = _THOUSANDS.sub("", text.replace("\u2212", "-"))
    found = _NUMBER.findall(t)
    if not found:
        return None
    return _normalise(found[-1])


def exact_match(prompt: str, response: str, ground_truth: str, format_score: float = 0.0) -> float:
    """1.0 when the response's last number equals the ground truth's, ``format_score`` when the
    response holds a number but the wrong one, 0.0 when it holds none."""
    got = extract_answer(response)
    if got is None:
        return 0.0
    want = extract_answer(ground_truth)
    if want is None:
        raise ValueError(f"ground truth {ground_truth!r} holds no number")
    return 1.0 if got == want else float(format_score)


def main(argv: list[str] | None = None) -> None:
    """Write the arithmetic task files."""
    ap = argparse.ArgumentParser(description="write the arithmetic task files (train, eval, sft)")
    ap.add_argument("--out", required=True, help="folder to write")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and the SFT rows (default 0)")
    ap.add_argument(
        "--max-operand", type=int, default=MAX_OPERAND, help=f"largest operand (default {MAX_OPERAND})"
    )
    ap.add_argument(
        "--eval-rows", type=int, default=EVAL_ROWS, help=f"held-out problems (default {EVAL_ROWS})"
    )
    ap.add_argument("--sft-rows", type=int, default=SFT_ROWS, help=f"SFT rows (default {SFT_ROWS})")
    args = ap.parse_args(argv)
    paths = write_arithmetic(args.out, args.seed, args.max_operand, OPS, args.eval_rows, args.sft_rows)
    for name, p in paths.items():
        print(f"{name}: {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
