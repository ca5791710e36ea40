from __future__ import annotations

import logging
import os

import pytest

from npu_ft.data.converters import DataFormatError, convert_alpaca, convert_records, convert_sharegpt
from npu_ft.data.dataset_info import DatasetAttr, get_dataset_attrs
from npu_ft.data.readers import read_json_records

ALPACA = DatasetAttr(name="a", file_name="a.json", history="history", system="system")
SHAREGPT = DatasetAttr(name="s", file_name="s.json", formatting="sharegpt", system="system")


def test_alpaca_instruction_input_history_system():
    ex = convert_alpaca(
        {"instruction": "Do it", "input": "with this", "output": "done",
         "history": [["q1", "a1"], ["q2", "a2"]], "system": "sys"},
        ALPACA,
    )
    assert ex.prompt == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "Do it\nwith this"},
    ]
    assert ex.response == [{"role": "assistant", "content": "done"}] and ex.system == "sys" and ex.is_valid


def test_alpaca_empty_parts():
    assert convert_alpaca({"instruction": "x", "input": "", "output": "y"}, ALPACA).prompt[-1]["content"] == "x"
    assert convert_alpaca({"instruction": "", "input": "only", "output": "y"}, ALPACA).prompt[-1]["content"] == "only"
    assert convert_alpaca({"instruction": "x", "output": "y"}, ALPACA).system is None
    no_output = convert_alpaca({"instruction": "x", "input": None}, ALPACA)
    assert no_output.response == [] and not no_output.is_valid


def test_alpaca_bad_history():
    with pytest.raises(DataFormatError, match=r"history\[0\]"):
        convert_alpaca({"instruction": "x", "output": "y", "history": [["only one"]]}, ALPACA)


def test_sharegpt_leading_system_and_roles():
    msgs = [{"from": "system", "value": "S"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": "a"},
            {"from": "human", "value": "u2"}, {"from": "gpt", "value": "a2"}]
    ex = convert_sharegpt({"conversations": msgs, "system": "ignored"}, SHAREGPT)
    assert ex.system == "S" and len(ex.prompt) == 3 and ex.response == [{"role": "assistant", "content": "a2"}]
    ex = convert_sharegpt({"conversations": msgs[1:3], "system": "col"}, SHAREGPT)
    assert ex.system == "col" and ex.is_valid


def test_sharegpt_tools_roles():
    msgs = [{"from": "human", "value": "u"}, {"from": "function_call", "value": "{}"},
            {"from": "observation", "value": "o"}, {"from": "gpt", "value": "a"}]
    ex = convert_sharegpt({"conversations": msgs}, SHAREGPT)
    assert [m["role"] for m in ex.prompt + ex.response] == ["user", "function", "observation", "assistant"]


@pytest.mark.parametrize(
    "roles, why",
    [(["human", "human", "gpt"], "invalid role tag"), (["human", "gpt", "human"], "invalid message count"),
     (["gpt", "human"], "invalid role tag"), (["human", "system", "human", "gpt"], "invalid role tag")],
)
def test_sharegpt_broken_examples_are_emptied_with_warning(roles, why, caplog):
    msgs = [{"from": r, "value": "x"} for r in roles]
    with caplog.at_level(logging.WARNING, logger="npu_ft.data"):
        ex = convert_sharegpt({"conversations": msgs}, SHAREGPT, "f.json (example 3)")
    assert ex.prompt == [] and ex.response == [] and not ex.is_valid
    assert why in caplog.text and "f.json (example 3)" in caplog.text and "skipping" in caplog.text


def test_missing_column_names_column_and_file(fixtures_dir):
    (attr,) = get_dataset_attrs(["missing_column"], fixtures_dir)
    path = os.path.join(fixtures_dir, "alpaca_demo.json")
    with pytest.raises(DataFormatError) as err:
        convert_records(read_json_records(path), attr, path)
    msg = str(err.value)
    assert "'question'" in msg and "columns.prompt" in msg and "alpaca_demo.json" in msg


def test_custom_tags_fixture(fixtures_dir):
    (attr,) = get_dataset_attrs(["sharegpt_openai_tags"], fixtures_dir)
    path = os.path.join(fixtures_dir, "sharegpt_openai_tags.jsonl")
    first, second = convert_records(read_json_records(path), attr, path)
    assert first.system == "Answer in one word." and first.response[0]["content"] == "Blue."
    assert second.system == "" and len(second.prompt) == 3


def test_sharegpt_demo_drops(fixtures_dir, caplog):
    (attr,) = get_dataset_attrs(["sharegpt_demo"], fixtures_dir)
    path = os.path.join(fixtures_dir, "sharegpt_demo.json")
    with caplog.at_level(logging.WARNING, logger="npu_ft.data"):
        examples = convert_records(read_json_records(path), attr, path)
    assert [e.is_valid for e in examples] == [True, True, True, False, False, False, True]
    assert examples[2].system == "你是一个知识渊博的历史老师。"


def test_unsupported_columns():
    attr = DatasetAttr(name="m", file_name="m.json", images="images")
    with pytest.raises(DataFormatError, match="images"):
        convert_records([{"instruction": "x", "output": "y", "images": []}], attr)
