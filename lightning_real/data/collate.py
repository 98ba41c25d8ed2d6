"""Collate functions: lists of dataset items -> padded int64 tensors named as the graphs' source keys.

* prompts (left padded, for generation): ``prompts``, ``prompt_mask``, ``prompt_lens``, ``index``;
* SFT (right padded): ``input_ids``, ``attention_mask``, ``loss_mask``, ``prompt_lens``, ``index``;
* preference pairs (right padded, both answers to one length): ``chosen_ids``,
  ``chosen_attention_mask``, ``chosen_loss_mask`` and the same for ``rejected_*``, ``index``.

``loss_mask`` is 1 on response tokens (EOS included), over token positions ``[B, S]``; the loss
of token ``t`` is predicted at position ``t - 1``, so log-prob tensors use ``loss_mask[:, 1:]``.
"""

from __future__ import annotations

from typing import Any

import torch


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` ids padded on the left and their attention mask."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s) :] = 1
    return ids, mask


def pad_right(
    seqs: list[list[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` ids padded on the right (to ``length`` when given) and their attention mask."""
    n = length if length is not None else max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _loss_mask(attention_mask: torch.Tensor, prompt_lens: list[int]) -> torch.Tensor:
    lm = attention_mask.clone()
    for i, p in enumerate(prompt_lens):
        lm[i, :p] = 0
    return lm


def collate_prompts(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt items -> left-padded ``prompts`` and ``prompt_mask``, ``prompt_lens``, ``index``."""
    ids, mask = pad_left([it["prompt_ids"] for it in items], pad_id)
    return {
        "prompts": ids,
        "prompt_mask": mask,
        "prompt_lens": mask.sum(-1),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


def collate_sft(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """SFT items -> right-padded ``input_ids``, ``attention_mask``, ``loss_mask``, ``prompt_lens``, ``index``."""
    ids, mask = pad_right([it["input_ids"] for it in items], pad_id)
    plens = [it["prompt_len"] for it in items]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "loss_mask": _loss_mask(mask, plens),
        "prompt_lens": torch.tensor(plens, dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


def collate_pairs(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference items -> ``chosen_*`` and ``rejected_*`` ids, attention and loss masks, one length."""
    n = max(max(len(it["chosen_ids"]), len(it["rejected_ids"])) for it in items)
    out: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        ids, mask = pad_right([it[f"{side}_ids"] for it in items], pad_id, n)
        out[f"{side}_ids"] = ids
        out[f"{side}_attention_mask"] = mask
        out[f"{side}_loss_mask"] = _loss_mask(mask, [it[f"{side}_prompt_len"] for it in items])
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    return out
