"""Tokenizer, datasets (limits, bad rows), collation, data modules and the shipped task."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lightning_real.data.collate import collate_pairs, collate_prompts, collate_sft
from lightning_real.data.datasets import PreferenceDataset, PromptDataset, SFTDataset, TextLimits
from lightning_real.data.modules import DataConfig, PreferenceDataModule, PromptDataModule, SFTDataModule
from lightning_real.data.rows import DataError, read_rows
from lightning_real.data.task import (
    ASSETS,
    SIZES,
    asset,
    generate_rows,
    reward_fn,
    score_sequences,
    target_letter,
    write_assets,
)
from lightning_real.data.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer, load_tokenizer, save_tokenizer
from lightning_real.models.spec import tiny_spec

TOK = byte_tokenizer()
PAD, BOS, EOS = TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- tokenizer --------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip(tmp_path):
    text = "héllo, wörld!\n\tsay a: ✓"
    ids = TOK.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))  # token b is byte b
    assert TOK.decode(ids) == text
    assert (PAD, BOS, EOS) == (256, 257, 258)
    assert BYTE_VOCAB_SIZE == len(TOK) == 259 <= tiny_spec().vocab_size
    assert TOK.decode([97, EOS, 98], skip_special_tokens=True) == "ab"
    save_tokenizer(TOK, tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert back.encode(text, add_special_tokens=False) == ids and back.decode(ids) == text
    assert (back.pad_token_id, back.bos_token_id, back.eos_token_id) == (PAD, BOS, EOS)
    batch = back(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0] == [PAD, PAD, 97, 98]  # left padding for generation
    with pytest.raises(FileNotFoundError, match=r"not a folder holding tokenizer\.json"):
        load_tokenizer(tmp_path / "nothing")


# ---- rows -------------------------------------------------------------------------------------------
def test_row_missing_a_field_names_file_line_and_field(tmp_path):
    p = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, "", {"prompt": "b"}, {"text": "c", "id": 3}])
    with pytest.raises(DataError, match=r"p\.jsonl line 4: missing field 'prompt' \(the row has: text, id\)"):
        read_rows(p, ("prompt",))
    bad = _jsonl(tmp_path / "b.jsonl", [{"prompt": "a"}, '{"prompt": "b"'])
    with pytest.raises(DataError, match=r"b\.jsonl line 2: not valid JSON"):
        read_rows(bad, ("prompt",))
    typed = _jsonl(tmp_path / "t.jsonl", [{"prompt": 5}])
    with pytest.raises(DataError, match=r"t\.jsonl line 1: field 'prompt' must be a string, got int"):
        PromptDataset(typed, TOK)
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "none.jsonl", ("prompt",))


def test_saved_hf_dataset_folder_needs_the_datasets_package(tmp_path):
    try:
        import datasets
    except ImportError:
        (tmp_path / "ds").mkdir()
        with pytest.raises(DataError, match=r"needs the 'datasets' package"):
            read_rows(tmp_path / "ds", ("prompt",))
        return
    datasets.Dataset.from_list([{"prompt": "x say a:"}, {"prompt": "y say e:"}]).save_to_disk(
        str(tmp_path / "ds")
    )
    rows = read_rows(tmp_path / "ds", ("prompt",))
    assert [r.fields["prompt"] for r in rows] == ["x say a:", "y say e:"]


# ---- limits -------------------------------------------------------------------------------------------
def test_prompt_truncation_counts(tmp_path, caplog):
    p = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * n} for n in (3, 10, 7, 12, 2)])
    with caplog.at_level(logging.INFO, logger="lightning_real.data.datasets"):
        ds = PromptDataset(p, TOK, TextLimits(max_prompt_len=8))
    # BOS + 7 tokens fit; rows of 10 and 12 are cut from the left
    assert (ds.num_truncated, ds.num_rejected, len(ds)) == (2, 0, 5)
    assert ds[1]["prompt_ids"] == [BOS] + [ord("x")] * 7
    assert "2 of 5 rows are longer than max_prompt_len=8 tokens: 2 cut (truncation='left')" in caplog.text
    left = _jsonl(tmp_path / "l.jsonl", [{"prompt": "abcdefghij"}])
    assert TOK.decode(PromptDataset(left, TOK, TextLimits(max_prompt_len=5))[0]["prompt_ids"][1:]) == "ghij"
    rej = PromptDataset(p, TOK, TextLimits(max_prompt_len=8, truncation="reject"))
    assert (rej.num_truncated, rej.num_rejected, len(rej)) == (0, 2, 3)
    assert [it["index"] for it in rej] == [0, 2, 4]
    with pytest.raises(ValueError, match=r"truncation='right'; allowed: left, reject"):
        TextLimits(truncation="right")  # type: ignore[arg-type]


def test_sft_and_preference_limits(tmp_path):
    p = _jsonl(
        tmp_path / "s.jsonl",
        [{"prompt": "abcdef", "response": "xyz"}, {"prompt": "ab", "response": "x" * 20}],
    )
    ds = SFTDataset(p, TOK, TextLimits(max_len=8))
    # row 0: BOS + 6 + 3 + EOS = 11 tokens, 3 over: the prompt loses its 3 oldest tokens
    assert TOK.decode(ds[0]["input_ids"]) == "<|bos|>defxyz<|eos|>" and ds[0]["prompt_len"] == 4
    # row 1: response alone too long -> one prompt token kept, response cut from the right (no EOS)
    assert ds[1]["input_ids"] == [BOS, ord("b")] + [ord("x")] * 6 and ds[1]["prompt_len"] == 2
    assert ds.num_truncated == 2
    pairs = _jsonl(
        tmp_path / "pr.jsonl",
        [
            {"prompt": "q", "chosen": "aa", "rejected": "bbb"},
            {"prompt": "q", "chosen": "a" * 30, "rejected": "b"},
        ],
    )
    pref = PreferenceDataset(pairs, TOK, TextLimits(max_len=10, truncation="reject"))
    assert (len(pref), pref.num_rejected) == (1, 1)
    with pytest.raises(DataError, match=r"line 1: missing field 'rejected'"):
        PreferenceDataset(_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "chosen": "a"}]), TOK)


# ---- collation ---------------------------------------------------------------------------------------
def test_collate_pads_and_masks():
    b = collate_prompts([{"prompt_ids": [BOS, 1, 2], "index": 4}, {"prompt_ids": [BOS], "index": 9}], PAD)
    assert b["prompts"].tolist() == [[BOS, 1, 2], [PAD, PAD, BOS]]
    assert b["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["prompt_lens"].tolist() == [3, 1] and b["index"].tolist() == [4, 9]
    s = collate_sft(
        [
            {"input_ids": [BOS, 5, 6, EOS], "prompt_len": 2, "index": 0},
            {"input_ids": [BOS, 5, EOS], "prompt_len": 2, "index": 1},
        ],
        PAD,
    )
    assert s["input_ids"].tolist() == [[BOS, 5, 6, EOS], [BOS, 5, EOS, PAD]]
    assert s["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert s["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    pr = collate_pairs(
        [
            {
                "chosen_ids": [BOS, 1, 2],
                "chosen_prompt_len": 2,
                "rejected_ids": [BOS, 1, 3, 3, 3],
                "rejected_prompt_len": 2,
                "index": 0,
            }
        ],
        PAD,
    )
    assert pr["chosen_ids"].shape == pr["rejected_ids"].shape == (1, 5)
    assert pr["chosen_loss_mask"].tolist() == [[0, 0, 1, 0, 0]] and pr["rejected_loss_mask"].tolist() == [
        [0, 0, 1, 1, 1]
    ]
    assert all(v.dtype == torch.long for v in (*b.values(), *s.values(), *pr.values()))


# ---- data modules --------------------------------------------------------------------------------------
def _epoch(dm) -> list[list[int]]:
    return [b["index"].tolist() for b in dm.train_dataloader()]


def test_prompt_data_module_batches_and_seeded_shuffle():
    dm = PromptDataModule(asset("prompts"), batch_size=16, max_prompt_len=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompts"].shape[0] == 16 and batch["prompts"].shape == batch["prompt_mask"].shape
    assert (batch["prompts"][:, -1] != PAD).all()  # left padded: every prompt ends at the right edge
    assert torch.equal(batch["prompt_lens"], batch["prompt_mask"].sum(-1))
    assert len(dm.train_dataloader()) == SIZES["prompts"] // 16
    same = PromptDataModule(asset("prompts"), batch_size=16, max_prompt_len=32)
    other = PromptDataModule(asset("prompts"), batch_size=16, max_prompt_len=32, seed=1)
    a, b, c = _epoch(dm)[:3], _epoch(same)[:3], _epoch(other)[:3]
    assert a == b and a != c
    assert sorted(i for batch in _epoch(dm) for i in batch) == list(range(SIZES["prompts"]))


def test_data_module_distributed_split_and_options():
    parts = [
        PromptDataModule(asset("prompts_eval"), config=DataConfig(batch_size=8), num_replicas=2, rank=r)
        for r in (0, 1)
    ]
    seen = [sorted(i for b in _epoch(p) for i in b) for p in parts]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == SIZES["prompts_eval"] // 2
    with pytest.raises(TypeError, match=r"unknown data options \['batchsize'\]"):
        PromptDataModule(asset("prompts"), batchsize=4)
    with pytest.raises(ValueError, match="both num_replicas and rank"):
        PromptDataModule(asset("prompts"), num_replicas=2)


def test_sft_and_preference_modules_read_the_shipped_files():
    sft = next(iter(SFTDataModule(asset("sft"), batch_size=4, shuffle=False).train_dataloader()))
    row = sft["input_ids"][0][sft["attention_mask"][0].bool()].tolist()
    resp = [t for t, m in zip(sft["input_ids"][0].tolist(), sft["loss_mask"][0].tolist()) if m]
    assert row[0] == BOS and resp[-1] == EOS
    first = json.loads(asset("sft").read_text().splitlines()[0])
    assert TOK.decode(resp[:-1]) == first["response"]
    pref = next(iter(PreferenceDataModule(asset("preference"), batch_size=4).train_dataloader()))
    assert pref["chosen_ids"].shape == pref["rejected_ids"].shape and pref["chosen_ids"].shape[0] == 4


# ---- the task ---------------------------------------------------------------------------------------
def test_reward_fn_values():
    p = "qwz say e:"
    assert target_letter(p) == "e"
    assert reward_fn(p, "eeee") == 1.0
    assert reward_fn(p, "") == 0.0
    assert reward_fn(p, "e1") == 0.5  # (1 + 0) / 2
    assert reward_fn(p, "ax") == (0.5 + 0.25) / 2  # other vowel 0.5, other letter 0.25
    assert reward_fn(p, "e" * 32 + "#" * 100) == 1.0  # only the first 32 characters count
    with pytest.raises(ValueError, match="not a task prompt"):
        reward_fn("hello", "e")


def test_shipped_assets_are_regenerated_identically(tmp_path):
    paths = write_assets(tmp_path, seed=0)
    for kind, p in paths.items():
        assert p.read_bytes() == (ASSETS / f"{kind}.jsonl").read_bytes(), kind
        assert len(p.read_text().splitlines()) == SIZES[kind]
    assert sum(p.stat().st_size for p in paths.values()) < 1_000_000
    assert generate_rows("sft", 5, seed=1) != generate_rows("sft", 5, seed=0)
    for row in generate_rows("preference", 50):
        assert (
            reward_fn(row["prompt"], row["chosen"]) == 1.0 > 0.25 >= reward_fn(row["prompt"], row["rejected"])
        )


def test_score_sequences_decodes_generated_rows():
    prompt = [BOS, *b"ab say o:"]
    seq = torch.tensor([[PAD, *prompt, *b"oo", EOS, PAD], [PAD, *prompt, *b"xo!", EOS]])
    am = torch.tensor([[0] + [1] * 13 + [0], [0] + [1] * 14])
    lm = torch.tensor([[0] * 11 + [1, 1, 1, 0], [0] * 11 + [1, 1, 1, 1]])
    assert score_sequences(TOK, seq, am, lm).tolist() == [1.0, pytest.approx((0.25 + 1 + 0) / 3)]


def test_only_a_module_with_validation_rows_has_a_val_loader():
    from lightning.pytorch.utilities.model_helpers import is_overridden

    without = PromptDataModule(asset("prompts"), batch_size=4)
    assert not is_overridden("val_dataloader", without)  # Lightning skips validation, no warning
    with_val = PromptDataModule(asset("prompts"), val=asset("prompts_eval"), batch_size=4)
    assert is_overridden("val_dataloader", with_val)
    batch = next(iter(with_val.val_dataloader()))
    assert batch["prompts"].shape[0] == 4
