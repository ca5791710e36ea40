from __future__ import annotations

import pytest

from npu_ft.data.constants import IGNORE_INDEX
from npu_ft.data.converters import ConvertedExample
from npu_ft.data.supervised import encode_supervised_example, infer_seqlen, process_supervised
from npu_ft.data.templates import get_template


@pytest.mark.parametrize(
    "source, target, budget, expect",
    [
        (10, 3, 100, (10, 3)),  # everything fits
        (50, 10, 40, (30, 10)),  # short target kept, source cut
        (5, 50, 40, (5, 35)),  # short source kept, target cut
        (30, 60, 40, (14, 26)),  # both long: target gets int(40 * 60/90) = 26
        (30, 30, 40, (20, 20)),
        (7, 7, 0, (0, 0)),
    ],
)
def test_infer_seqlen(source, target, budget, expect):
    assert infer_seqlen(source, target, budget) == expect


def _ex(*contents, system=""):
    roles = ["user", "assistant"]
    msgs = [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]
    return ConvertedExample(prompt=msgs[:-1], response=msgs[-1:], system=system)


def test_labels_mask_prompt(qwen_tok):
    tpl = get_template("qwen")
    ids, labels = encode_supervised_example(_ex("Q1", "A1", "Q2", "A2"), tpl, qwen_tok, 1024)
    pairs = tpl.encode_multiturn(qwen_tok, _ex("Q1", "A1", "Q2", "A2").prompt + _ex("Q1", "A1", "Q2", "A2").response)
    (s1, t1), (s2, t2) = pairs
    assert ids == s1 + t1 + s2 + t2
    assert labels == [IGNORE_INDEX] * len(s1) + t1 + [IGNORE_INDEX] * len(s2) + t2
    ids2, labels2 = encode_supervised_example(_ex("Q1", "A1", "Q2", "A2"), tpl, qwen_tok, 1024, train_on_prompt=True)
    assert ids2 == ids and labels2 == ids


def test_mask_history_budget_goes_to_last_turn(qwen_tok):
    tpl = get_template("qwen")
    ex = _ex("first question " * 5, "first answer " * 5, "Q2", "A2")
    (s1, t1), (s2, t2) = tpl.encode_multiturn(qwen_tok, ex.prompt + ex.response)
    budget = len(s2) + len(t2) + 5
    ids, labels = encode_supervised_example(ex, tpl, qwen_tok, budget, mask_history=True)
    # last turn whole and learned; 5 tokens of budget left for turn 1, which comes first in order
    assert len(ids) == budget and ids[-len(s2) - len(t2):] == s2 + t2
    assert labels[-len(t2):] == t2 and all(x == IGNORE_INDEX for x in labels[: -len(t2)])
    ids_plain, _ = encode_supervised_example(ex, tpl, qwen_tok, budget)
    assert ids_plain[:10] == s1[:10] and ids_plain[-len(t2):] != t2  # without it the first turn gets it


def test_cutoff_truncates_and_drops_turns(qwen_tok):
    tpl = get_template("qwen")
    ex = _ex("Q1", "A1", "Q2", "A2")
    (s1, t1), _ = tpl.encode_multiturn(qwen_tok, ex.prompt + ex.response)
    ids, labels = encode_supervised_example(ex, tpl, qwen_tok, len(s1) + len(t1))
    assert ids == s1 + t1 and len(labels) == len(ids)
    ids, _ = encode_supervised_example(ex, tpl, qwen_tok, 10)
    assert len(ids) == 10


def test_invalid_examples_dropped_with_warning(qwen_tok, caplog):
    tpl = get_template("qwen")
    bad = ConvertedExample(prompt=[{"role": "user", "content": "x"}], response=[])
    out = process_supervised([_ex("Q", "A"), bad], tpl, qwen_tok, 64)
    assert len(out) == 1 and out[0]["attention_mask"] == [1] * len(out[0]["input_ids"])
    assert "Dropped invalid example" in caplog.text
