"""Data for RLHF: an offline byte tokenizer, prompt/SFT/preference datasets and data modules,
and the shipped toy task with its rule-based reward.

The data modules import Lightning; they load on first use so that the tokenizer and the task
stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DataConfig": "lightning_real.data.modules",
    "PromptDataModule": "lightning_real.data.modules",
    "SFTDataModule": "lightning_real.data.modules",
    "PreferenceDataModule": "lightning_real.data.modules",
    "PromptDataset": "lightning_real.data.datasets",
    "SFTDataset": "lightning_real.data.datasets",
    "PreferenceDataset": "lightning_real.data.datasets",
    "TextLimits": "lightning_real.data.datasets",
    "DataError": "lightning_real.data.rows",
    "read_rows": "lightning_real.data.rows",
    "byte_tokenizer": "lightning_real.data.tokenizer",
    "load_tokenizer": "lightning_real.data.tokenizer",
    "save_tokenizer": "lightning_real.data.tokenizer",
    "BYTE_VOCAB_SIZE": "lightning_real.data.tokenizer",
    "collate_prompts": "lightning_real.data.collate",
    "collate_sft": "lightning_real.data.collate",
    "collate_pairs": "lightning_real.data.collate",
    "reward_fn": "lightning_real.data.task",
    "score_sequences": "lightning_real.data.task",
    "asset": "lightning_real.data.task",
    "RewardFn": "lightning_real.data.verifiable",
    "VerifiableReward": "lightning_real.data.verifiable",
    "load_reward_fn": "lightning_real.data.verifiable",
    "read_ground_truth": "lightning_real.data.verifiable",
    "extract_answer": "lightning_real.data.arithmetic",
    "exact_match": "lightning_real.data.arithmetic",
    "write_arithmetic": "lightning_real.data.arithmetic",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_real.data' has no attribute {name!r}")
