from __future__ import annotations

import pytest

from npu_ft.data.constants import IGNORE_INDEX
from npu_ft.data.packing import greedy_knapsack, pack_examples


def test_greedy_knapsack():
    lengths = [5, 1, 9, 3, 7, 2]
    assert greedy_knapsack(lengths, 10) == [[9, 1], [7, 3], [5, 2]]
    assert lengths == [5, 1, 9, 3, 7, 2]  # input untouched
    assert greedy_knapsack([], 10) == []
    with pytest.raises(ValueError):
        greedy_knapsack([11], 10)


def _ex(n, start):
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}


@pytest.mark.parametrize("neat", [False, True])
def test_pack_examples(neat, caplog):
    examples = [_ex(4, 100), _ex(3, 200), _ex(12, 300), _ex(5, 400)]  # 12 > cutoff: dropped
    packs = pack_examples(examples, cutoff_len=9, pad_token_id=0, neat_packing=neat)
    assert "Dropped lengthy example with length 12 > 9" in caplog.text
    assert len(packs) == 2 and all(len(p["input_ids"]) == 10 for p in packs)
    first = packs[0]  # knapsack [5, 4]
    assert first["input_ids"] == list(range(400, 405)) + list(range(100, 104)) + [0]
    assert first["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert first["labels"][-1] == IGNORE_INDEX and first["labels"][5] == IGNORE_INDEX
    if neat:
        assert first["attention_mask"] == [1] * 5 + [2] * 4 + [0]
    else:
        assert first["attention_mask"] == [1] * 10
    assert packs[1]["input_ids"][:3] == [200, 201, 202]


def test_same_length_last_first():
    packs = pack_examples([_ex(2, 10), _ex(2, 20)], cutoff_len=4, pad_token_id=0)
    assert packs[0]["input_ids"][:4] == [20, 21, 10, 11]  # LF pops the last index of a length first
