"""Tokenized prompt, SFT and preference datasets with a length limit.

Rows longer than the limit are either cut or dropped (``truncation``): ``"left"`` drops the
oldest prompt tokens (keeping BOS), and for SFT and preference rows also cuts the response
from the right when the response alone does not fit; ``"reject"`` drops the row. Each dataset
counts what it cut or dropped (``num_truncated``, ``num_rejected``); :meth:`length_report`
says it in a line naming the limit, which the data modules print once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from lightning_real.data.rows import DataError, Row, read_rows

log = logging.getLogger(__name__)

Truncation = Literal["left", "reject"]
TRUNCATIONS: tuple[str, ...] = ("left", "reject")


@dataclass(frozen=True)
class TextLimits:
    """How rows are turned into token ids."""

    max_prompt_len: int = 128
    """Most prompt tokens (BOS included) of a prompt dataset row."""
    max_len: int = 256
    """Most tokens of a prompt + response (SFT and preference rows, BOS and EOS included)."""
    truncation: Truncation = "left"
    """Rows over the limit: 'left' cuts the prompt's oldest tokens (then the response's end);
    'reject' drops them."""
    add_bos: bool = True
    """Start every sequence with the tokenizer's BOS token (when it has one)."""
    add_eos: bool = True
    """End every response with the tokenizer's EOS token."""

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={self.truncation!r}; allowed: {', '.join(TRUNCATIONS)}")
        for f in ("max_prompt_len", "max_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 2:
                raise ValueError(f"{f}={v!r}; allowed: an integer >= 2")


class LengthError(DataError):
    """No row is left within the length limit: ``limit`` names it ('max_prompt_len' or 'max_len')."""

    def __init__(self, message: str, limit: str = "max_len") -> None:
        super().__init__(message)
        self.limit = limit


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: transformers warns about text longer than the tokenizer's model_max_length,
    # which says nothing here; the rows are cut or dropped by this module's own limit.
    try:
        return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    except TypeError:  # a tokenizer whose encode takes no verbose flag
        return list(tokenizer.encode(text, add_special_tokens=False))


def _bos(tokenizer: Any, limits: TextLimits) -> list[int]:
    return [tokenizer.bos_token_id] if limits.add_bos and tokenizer.bos_token_id is not None else []


def _eos(tokenizer: Any, limits: TextLimits) -> list[int]:
    if not limits.add_eos:
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos token")
    return [tokenizer.eos_token_id]


def _fit_pair(
    head: list[int], prompt: list[int], response: list[int], max_len: int
) -> tuple[list[int], list[int], bool]:
    """Cut ``prompt`` from the left, then ``response`` from the right, so that all fits ``max_len``.

    At least one prompt token is kept when the prompt has any, so the response has a context.
    """
    over = len(head) + len(prompt) + len(response) - max_len
    if over <= 0:
        return prompt, response, False
    keep_p = max(min(1, len(prompt)), len(prompt) - over)
    prompt = prompt[len(prompt) - keep_p :]
    room = max_len - len(head) - len(prompt)
    return prompt, response[: max(room, 0)], True


class _LimitedDataset(Dataset):
    """Shared bookkeeping: kept items, and counts of cut and dropped rows."""

    kind = "rows"
    limit = "max_len"
    """The :class:`TextLimits` field that bounds this kind of row."""

    def __init__(self, path: str | Path, limits: TextLimits) -> None:
        self.path = Path(path)
        self.limits = limits
        self.items: list[dict[str, Any]] = []
        self.num_read = 0
        """Rows read from the file, before the limit."""
        self.num_truncated = 0
        """Rows shortened to fit the limit."""
        self.num_rejected = 0
        """Rows dropped for being over the limit (truncation='reject')."""

    def _limit_text(self) -> str:
        return f"{self.limit}={getattr(self.limits, self.limit)} tokens"

    def length_report(self) -> str | None:
        """One line on the rows over the limit (None when every row fits)."""
        if not (self.num_truncated or self.num_rejected):
            return None
        over = self.num_truncated + self.num_rejected
        done = f"{self.num_truncated} cut" if self.num_truncated else f"{self.num_rejected} dropped"
        return (
            f"{self.kind} {self.path}: {over} of {self.num_read} rows are longer than {self._limit_text()}: "
            f"{done} (truncation={self.limits.truncation!r})"
        )

    def _report(self, total: int) -> None:
        self.num_read = total
        if self.num_truncated or self.num_rejected:
            log.info("%s", self.length_report())
        if not self.items:
            if self.num_rejected:
                raise LengthError(
                    f"{self.path}: no rows left: all {total} rows are longer than {self._limit_text()} "
                    f"and truncation='reject' drops them; raise {self.limit} or use truncation='left'",
                    self.limit,
                )
            raise DataError(f"{self.path}: no rows (read {total})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class PromptDataset(_LimitedDataset):
    """Prompts (``{"prompt": ...}`` rows) as token ids for generation.

    Items: ``prompt_ids`` (list of ids, BOS first), ``prompt`` (the text), ``index`` (row number).
    """

    kind = "prompts"
    limit = "max_prompt_len"

    def __init__(self, path: str | Path, tokenizer: Any, limits: TextLimits | None = None) -> None:
        super().__init__(path, limits or TextLimits())
        lim = self.limits
        rows = read_rows(path, ("prompt",))
        bos = _bos(tokenizer, lim)
        for r in rows:
            ids = _encode(tokenizer, r.fields["prompt"])
            if len(bos) + len(ids) > lim.max_prompt_len:
                if lim.truncation == "reject":
                    self.num_rejected += 1
                    continue
                ids = ids[len(ids) - (lim.max_prompt_len - len(bos)) :]
                self.num_truncated += 1
            self.items.append({"prompt_ids": bos + ids, "prompt": r.fields["prompt"], "index": r.index})
        self._report(len(rows))


def _sequence(
    tokenizer: Any, lim: TextLimits, prompt: str, response: str
) -> tuple[dict[str, Any] | None, bool]:
    bos, eos = _bos(tokenizer, lim), _eos(tokenizer, lim)
    p, resp = _encode(tokenizer, prompt), _encode(tokenizer, response) + eos
    over = len(bos) + len(p) + len(resp) > lim.max_len
    if over and lim.truncation == "reject":
        return None, True
    p, resp, _ = _fit_pair(bos, p, resp, lim.max_len)
    return {"input_ids": bos + p + resp, "prompt_len": len(bos) + len(p)}, over


class SFTDataset(_LimitedDataset):
    """Prompt/response pairs (``{"prompt", "response"}`` rows) for supervised fine-tuning.

    Items: ``input_ids`` (BOS, prompt, response, EOS), ``prompt_len`` (tokens before the
    response), ``index``.
    """

    kind = "sft"

    def __init__(self, path: str | Path, tokenizer: Any, limits: TextLimits | None = None) -> None:
        super().__init__(path, limits or TextLimits())
        rows = read_rows(path, ("prompt", "response"))
        for r in rows:
            item, over = _sequence(tokenizer, self.limits, r.fields["prompt"], r.fields["response"])
            if item is None:
                self.num_rejected += 1
                continue
            self.num_truncated += int(over)
            self.items.append({**item, "index": r.index})
        self._report(len(rows))


class PreferenceDataset(_LimitedDataset):
    """Preference pairs (``{"prompt", "chosen", "rejected"}`` rows) for DPO and reward modelling.

    Items: ``chosen_ids``/``rejected_ids`` and their ``*_prompt_len``, ``index``. A pair is
    dropped (reject) or counted once as truncated when either answer is over the limit.
    """

    kind = "preference"

    def __init__(self, path: str | Path, tokenizer: Any, limits: TextLimits | None = None) -> None:
        super().__init__(path, limits or TextLimits())
        rows: list[Row] = read_rows(path, ("prompt", "chosen", "rejected"))
        for r in rows:
            c, over_c = _sequence(tokenizer, self.limits, r.fields["prompt"], r.fields["chosen"])
            j, over_j = _sequence(tokenizer, self.limits, r.fields["prompt"], r.fields["rejected"])
            if c is None or j is None:
                self.num_rejected += 1
                continue
            self.num_truncated += int(over_c or over_j)
            self.items.append(
                {
                    "chosen_ids": c["input_ids"],
                    "chosen_prompt_len": c["prompt_len"],
                    "rejected_ids": j["input_ids"],
                    "rejected_prompt_len": j["prompt_len"],
                    "index": r.index,
                }
            )
        self._report(len(rows))
