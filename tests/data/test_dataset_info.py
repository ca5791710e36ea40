from __future__ import annotations

import json

import pytest

from npu_ft.data.dataset_info import DatasetAttr, DatasetInfoError, get_dataset_attrs


def test_defaults_and_columns(fixtures_dir):
    demo, hist, share, tags = get_dataset_attrs(
        "alpaca_demo, alpaca_history,sharegpt_demo,sharegpt_openai_tags", fixtures_dir
    )
    assert (demo.formatting, demo.prompt, demo.query, demo.response, demo.history, demo.system) == (
        "alpaca", "instruction", "input", "output", None, None,
    )
    assert hist.history == "history" and hist.system == "system"
    assert share.formatting == "sharegpt" and share.messages == "conversations"
    assert (share.role_tag, share.content_tag, share.user_tag, share.assistant_tag) == ("from", "value", "human", "gpt")
    assert (tags.role_tag, tags.content_tag, tags.user_tag, tags.assistant_tag, tags.system_tag) == (
        "role", "content", "user", "assistant", "system",
    )
    # LF quirk kept: a "tags" object replaces every tag, so unnamed ones become None
    assert tags.observation_tag is None and tags.function_tag is None


def test_columns_object_replaces_all_columns():
    attr = DatasetAttr.from_entry("x", {"file_name": "x.json", "columns": {"response": "answer"}})
    assert attr.response == "answer"
    assert attr.prompt is None and attr.query is None  # as LLaMA-Factory's DatasetAttr.join


def test_num_samples(fixtures_dir):
    (attr,) = get_dataset_attrs(["sampled"], fixtures_dir)
    assert attr.num_samples == 3


def test_unknown_dataset_names_file_and_known(fixtures_dir):
    with pytest.raises(DatasetInfoError) as err:
        get_dataset_attrs(["nope"], fixtures_dir)
    msg = str(err.value)
    assert "'nope'" in msg and "dataset_info.json" in msg and "alpaca_demo" in msg and "sharegpt_demo" in msg


@pytest.mark.parametrize("name, key", [("hub_dataset", "hf_hub_url"), ("script_dataset", "script_url")])
def test_hub_sources_not_supported_offline(fixtures_dir, name, key):
    with pytest.raises(DatasetInfoError, match=f"{key}.*not supported offline"):
        get_dataset_attrs([name], fixtures_dir)


def test_missing_dataset_info(tmp_path):
    with pytest.raises(DatasetInfoError, match="dataset_info.json"):
        get_dataset_attrs(["a"], tmp_path)


def test_bad_entries(tmp_path):
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"a": {"file_name": "a.json", "formatting": "chatml"}, "b": {"columns": {}},
                    "c": {"file_name": "c.json", "columns": {"prompt": "q", "oops": "x"}}})
    )
    with pytest.raises(DatasetInfoError, match="formatting 'chatml'"):
        get_dataset_attrs(["a"], tmp_path)
    with pytest.raises(DatasetInfoError, match="no 'file_name'"):
        get_dataset_attrs(["b"], tmp_path)
    with pytest.raises(DatasetInfoError, match="oops"):
        get_dataset_attrs(["c"], tmp_path)
    (tmp_path / "dataset_info.json").write_text('{"a": {"file_name": "a.json",}\n}')
    with pytest.raises(DatasetInfoError, match=r"dataset_info.json:1:\d+: invalid JSON"):
        get_dataset_attrs(["a"], tmp_path)
