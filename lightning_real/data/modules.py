"""LightningDataModules for prompts (PPO, GRPO, ReMax), SFT and preference pairs (DPO, reward models).

Shuffling is seeded. Distributed sampling is left to the strategy (Lightning injects its
sampler; :class:`~lightning_real.strategy.RealStrategy` gives every rank the same global batch),
unless ``num_replicas`` and ``rank`` are given, in which case a seeded ``DistributedSampler``
splits the data here.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler
from typing_extensions import override

from lightning_real.data.collate import collate_pairs, collate_prompts, collate_sft
from lightning_real.data.datasets import PreferenceDataset, PromptDataset, SFTDataset, TextLimits, Truncation
from lightning_real.data.tokenizer import load_tokenizer


@dataclass(frozen=True)
class DataConfig:
    """Batching and length limits of a data module."""

    batch_size: int = 8
    """Rows per batch (prompts for generation, sequences or pairs for training): the global batch."""
    max_prompt_len: int = 128
    """Most prompt tokens (BOS included) of a prompt row."""
    max_len: int = 256
    """Most tokens of a prompt + response (SFT and preference rows)."""
    truncation: Truncation = "left"
    """Rows over the limit: 'left' cuts the prompt's oldest tokens, 'reject' drops the row."""
    seed: int = 0
    """Seed of the shuffling when the module samples by itself. Under RealStrategy, Lightning's
    distributed sampler shuffles instead, with the run's seed (``seed_everything``) and the
    epoch, which keeps the order exact on resume."""
    shuffle: bool = True
    """Shuffle the training rows every epoch."""
    drop_last: bool = True
    """Drop a final partial batch, so every batch splits evenly over data-parallel replicas."""
    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        for f in ("batch_size",):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DataConfig.{f}={v!r}; allowed: an integer >= 1")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers={self.num_workers!r}; allowed: an integer >= 0")
        self.limits()  # checks truncation and the lengths

    def limits(self) -> TextLimits:
        """The length limits as the datasets take them."""
        return TextLimits(self.max_prompt_len, self.max_len, self.truncation)


def _config(config: DataConfig | None, overrides: dict[str, Any]) -> DataConfig:
    allowed = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"unknown data options {unknown}; allowed: {', '.join(sorted(allowed))}")
    return replace(config or DataConfig(), **overrides)


class _TextDataModule(LightningDataModule):
    dataset_cls: type = PromptDataset
    collate: Any = staticmethod(collate_prompts)

    def __init__(
        self,
        train: str | Path,
        tokenizer: str | Path | Any | None = None,
        val: str | Path | None = None,
        config: DataConfig | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.train_path = Path(train)
        self.val_path = Path(val) if val is not None else None
        self.config = _config(config, overrides)
        if (num_replicas is None) != (rank is None):
            raise ValueError("give both num_replicas and rank, or neither")
        if num_replicas is not None and not 0 <= rank < num_replicas:  # type: ignore[operator]
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self.num_replicas = num_replicas
        self.rank = rank
        self.tokenizer = load_tokenizer(tokenizer)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        if self.val_path is not None:
            # Only a module given validation rows has a val loader: Lightning then neither builds
            # an empty loop nor warns about a loader without a validation_step.
            self.val_dataloader = self._val_dataloader  # type: ignore[method-assign]

    @override
    def setup(self, stage: str | None = None) -> None:
        lim = self.config.limits()
        if self.train_set is None:
            self.train_set = self._read(self.train_path, lim)
        if self.val_path is not None and self.val_set is None:
            self.val_set = self._read(self.val_path, lim)

    def _read(self, path: Path, lim: TextLimits) -> Dataset:
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        ds: Dataset = self.dataset_cls(path, self.tokenizer, lim)
        report = getattr(ds, "length_report", lambda: None)()
        if report is not None:
            rank_zero_info(report)  # once, on rank 0: every rank reads the same rows
        return ds

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        c = self.config
        shuffle = c.shuffle and train
        if self.num_replicas is not None:
            sampler: Any = DistributedSampler(
                ds,
                num_replicas=self.num_replicas,
                rank=self.rank,
                shuffle=shuffle,
                seed=c.seed,
                drop_last=c.drop_last,
            )
        elif shuffle:
            sampler = RandomSampler(cast(Sized, ds), generator=torch.Generator().manual_seed(c.seed))
        else:
            sampler = SequentialSampler(cast(Sized, ds))
        return DataLoader(
            ds,
            batch_size=c.batch_size,
            sampler=sampler,
            collate_fn=partial(type(self).collate, pad_id=self.tokenizer.pad_token_id),
            drop_last=c.drop_last and train,
            num_workers=c.num_workers,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.train_set is not None
        return self._loader(self.train_set, train=True)

    def _val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self.val_set is not None
        return self._loader(self.val_set, train=False)


class PromptDataModule(_TextDataModule):
    """Prompts for generation: batches of left-padded ``prompts``, ``prompt_mask``, ``prompt_lens``, ``index``.

    Args:
        train: JSONL file of ``{"prompt": ...}`` rows, or a saved HF dataset folder.
        tokenizer: a local tokenizer folder, a tokenizer, or None for the byte tokenizer.
        val: optional validation prompts.
        config: :class:`DataConfig`; keyword ``overrides`` replace its fields (``batch_size=16``).
        num_replicas, rank: split the data here with a ``DistributedSampler`` (else the strategy does).
    """

    dataset_cls = PromptDataset
    collate = staticmethod(collate_prompts)


class SFTDataModule(_TextDataModule):
    """Prompt/response pairs: batches of right-padded ``input_ids``, ``attention_mask``, ``loss_mask``,
    ``prompt_lens``, ``index`` (arguments as :class:`PromptDataModule`; rows ``{"prompt", "response"}``)."""

    dataset_cls = SFTDataset
    collate = staticmethod(collate_sft)


class PreferenceDataModule(_TextDataModule):
    """Preference pairs: batches of ``chosen_*`` and ``rejected_*`` ids, attention and loss masks,
    ``index`` (arguments as :class:`PromptDataModule`; rows ``{"prompt", "chosen", "rejected"}``)."""

    dataset_cls = PreferenceDataset
    collate = staticmethod(collate_pairs)
