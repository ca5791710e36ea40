"""Token-for-token parity with the real LLaMA-Factory 0.9.5.

The golden files were produced by ``tests/data/golden/make_golden.py``, which runs LLaMA-Factory's
own data pipeline (``llamafactory.data.loader.get_dataset``) on ``tests/data/fixtures`` with our
offline Qwen tokenizer. Here npu-ft's pipeline must give exactly the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npu_ft.data import DataArguments, build_sft_splits

from .golden.make_golden import SETTINGS

GOLDEN = Path(__file__).parent / "golden"
FIXTURES = Path(__file__).parent / "fixtures"


def _first_diff(ours: list[int], theirs: list[int]) -> str:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return f"first difference at {i}: ours {ours[max(0, i - 3) : i + 4]} vs LF {theirs[max(0, i - 3) : i + 4]}"
    return f"lengths differ: ours {len(ours)} vs LF {len(theirs)}"


def _compare(split: str, ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs), f"{split}: {len(ours)} rows vs LF {len(theirs)}"
    for i, (mine, ref) in enumerate(zip(ours, theirs, strict=False)):
        for key, value in ref.items():
            assert mine[key] == value, f"{split}[{i}].{key}: {_first_diff(mine[key], value)}"
        if "attention_mask" not in ref:
            assert mine["attention_mask"] == [1] * len(mine["input_ids"])


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_matches_llamafactory(name, qwen_tokenizers):
    path = GOLDEN / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path.name} not generated (run make_golden.py)")
    golden = json.loads(path.read_text(encoding="utf-8"))
    variant, kwargs = SETTINGS[name]
    assert golden["data_args"] == kwargs, "golden file is stale: re-run make_golden.py"
    args = DataArguments(dataset_dir=str(FIXTURES), **kwargs)
    splits = build_sft_splits(args, qwen_tokenizers[variant], seed=42)
    _compare("train", splits.train, golden["train"])
    if "eval" in golden:
        assert splits.eval is not None
        _compare("eval", splits.eval, golden["eval"])
    else:
        assert splits.eval is None
