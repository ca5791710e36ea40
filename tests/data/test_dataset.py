from __future__ import annotations

import pytest

from npu_ft.data import DataArguments, DataFileError, DatasetInfoError, SFTDataCollator, build_sft_dataset
from npu_ft.data.dataset import build_sft_splits


def test_args_defaults_and_checks():
    args = DataArguments(dataset="a, b")
    assert args.dataset == ["a", "b"] and args.cutoff_len == 2048 and args.effective_cutoff_len == 2048
    assert args.packing is None and not args.use_packing and args.val_size == 0.0 and args.max_samples is None
    neat = DataArguments(dataset="a", neat_packing=True)
    assert neat.packing is True and neat.effective_cutoff_len == 2047 and neat.cutoff_len == 2048
    with pytest.raises(ValueError, match="mask_history"):
        DataArguments(dataset="a", mask_history=True, train_on_prompt=True)
    with pytest.raises(ValueError, match="val_size"):
        DataArguments(val_size=0.1)
    with pytest.raises(NotImplementedError, match="interleave"):
        DataArguments(dataset="a", mix_strategy="interleave_under")


def test_end_to_end_with_collator(qwen_tok, fixtures_dir):
    args = DataArguments(dataset="alpaca_demo,sharegpt_demo", dataset_dir=fixtures_dir, template="qwen", cutoff_len=64)
    items = build_sft_dataset(args, qwen_tok)
    assert len(items) == 7 + 4  # one alpaca row without output and three broken sharegpt rows dropped
    assert all(len(it["input_ids"]) <= 64 and len(it["labels"]) == len(it["input_ids"]) for it in items)
    batch = SFTDataCollator(pad_token_id=qwen_tok.pad_token_id)(items[:4])
    assert batch["input_ids"].shape[1] % 8 == 0


def test_packing_length(qwen_tok, fixtures_dir):
    args = DataArguments(dataset="alpaca_demo", dataset_dir=fixtures_dir, template="qwen", cutoff_len=128, packing=True)
    items = build_sft_dataset(args, qwen_tok)
    assert all(len(it["input_ids"]) == 128 for it in items)
    assert {"input_ids", "attention_mask", "position_ids", "labels"} <= set(items[0])


def test_val_size_split(qwen_tok, fixtures_dir):
    args = DataArguments(dataset="alpaca_demo", dataset_dir=fixtures_dir, template="qwen", val_size=2)
    splits = build_sft_splits(args, qwen_tok, seed=42)
    assert len(splits.train) + len(splits.eval) == 7 and len(splits.eval) in (1, 2)


def test_errors(qwen_tok, fixtures_dir):
    base = dict(dataset_dir=fixtures_dir, template="qwen")
    with pytest.raises(DatasetInfoError, match="Undefined dataset 'nope'"):
        build_sft_dataset(DataArguments(dataset="nope", **base), qwen_tok)
    with pytest.raises(DataFileError, match="does_not_exist.json not found"):
        build_sft_dataset(DataArguments(dataset="missing_file", **base), qwen_tok)
    with pytest.raises(DataFileError, match=r"malformed\.jsonl:3"):
        build_sft_dataset(DataArguments(dataset="malformed_jsonl", **base), qwen_tok)
    with pytest.raises(ValueError, match="not supported"):
        build_sft_dataset(DataArguments(dataset="alpaca_demo", dataset_dir=fixtures_dir, template="llama3"), qwen_tok)
    with pytest.raises(RuntimeError, match="Cannot find valid samples"):
        build_sft_dataset(DataArguments(dataset="alpaca_demo", max_samples=0, **base), qwen_tok)
