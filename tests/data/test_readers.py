from __future__ import annotations

import json
import os

import pytest

from npu_ft.data.readers import DataFileError, list_data_files, read_json_records, read_records, select_samples


def test_json_and_jsonl(fixtures_dir):
    recs = read_json_records(os.path.join(fixtures_dir, "alpaca_demo.json"))
    assert len(recs) == 8 and recs[2]["instruction"] == "把下面的句子翻译成英文。"
    recs = read_json_records(os.path.join(fixtures_dir, "alpaca_history.jsonl"))
    assert len(recs) == 4 and recs[0]["history"][0][1] == "The capital of France is Paris."


def test_json_file_with_json_lines(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_json_records(str(p)) == [{"a": 1}, {"a": 2}]


def test_malformed_jsonl_names_file_and_line(fixtures_dir):
    with pytest.raises(DataFileError, match=r"malformed\.jsonl:3:\d+: malformed JSON line"):
        read_json_records(os.path.join(fixtures_dir, "malformed.jsonl"))


def test_malformed_json_names_file_and_line(fixtures_dir):
    with pytest.raises(DataFileError, match=r"malformed\.json:3:\d+: malformed JSON"):
        read_json_records(os.path.join(fixtures_dir, "malformed.json"))


def test_non_object_rows(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataFileError, match=r"x\.jsonl:2: each example must be a JSON object"):
        read_json_records(str(p))


def test_empty_file(fixtures_dir):
    with pytest.raises(DataFileError, match="empty"):
        read_json_records(os.path.join(fixtures_dir, "empty.json"))
    with pytest.raises(DataFileError, match="no examples"):
        read_records([])


def test_missing_file_names_path(fixtures_dir):
    with pytest.raises(DataFileError, match="does_not_exist.json not found"):
        list_data_files(fixtures_dir, "does_not_exist.json")


def test_folder_is_read_in_sorted_order(fixtures_dir):
    files = list_data_files(fixtures_dir, "alpaca_folder")
    assert [os.path.basename(f) for f in files] == ["part1.json", "part2.json"]
    recs = read_records(files)
    assert [r["instruction"] for r in recs][:2] == [
        "Give three tips for staying healthy.",
        "Translate the sentence into French.",
    ]
    assert len(recs) == 4


def test_unsupported_types(tmp_path):
    (tmp_path / "a.csv").write_text("instruction,output\nx,y\n")
    (tmp_path / "b.xml").write_text("<x/>")
    with pytest.raises(DataFileError, match="csv files are not supported"):
        list_data_files(tmp_path, "a.csv")
    with pytest.raises(DataFileError, match="unsupported file type"):
        list_data_files(tmp_path, "b.xml")
    os.mkdir(tmp_path / "mixed")
    (tmp_path / "mixed" / "a.json").write_text("[]")
    (tmp_path / "mixed" / "b.csv").write_text("")
    with pytest.raises(DataFileError, match="identical"):
        list_data_files(tmp_path, "mixed")


def test_max_samples_and_num_samples():
    recs = [{"i": i} for i in range(5)]
    assert select_samples(recs, max_samples=2) == [{"i": 0}, {"i": 1}]
    assert select_samples(recs, max_samples=50) == recs
    sampled = select_samples(recs, num_samples=3, seed=1)
    assert len(sampled) == 3 and len({r["i"] for r in sampled}) == 3
    over = select_samples(recs, num_samples=8, seed=1)
    assert len(over) == 8 and {r["i"] for r in over} == set(range(5))  # every record used before repeats
    assert select_samples(recs, num_samples=3, seed=1) == sampled  # deterministic


def test_utf8_bom(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes("\ufeff".encode() + json.dumps([{"a": "é"}]).encode())
    assert read_json_records(str(p)) == [{"a": "é"}]
