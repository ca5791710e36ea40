"""YAML reading: duplicated keys and syntax errors name the file and the line(s)."""

from __future__ import annotations

import doctest

import pytest

from npu_ft.config import ConfigError, load_config, yaml_io
from npu_ft.config.yaml_io import YamlError, load_yaml_mapping


def test_doctests():
    assert doctest.testmod(yaml_io).failed == 0


def test_duplicate_key_names_both_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\nlora_rank: 8\nstage: sft\nlora_rank: 16\n")
    with pytest.raises(YamlError) as info:
        load_yaml_mapping(path)
    assert str(info.value) == f"{path}:4: key 'lora_rank' is given twice (lines 2 and 4); keep one"
    with pytest.raises(ConfigError, match=r"r\.yaml:4: key 'lora_rank' is given twice \(lines 2 and 4\)"):
        load_config(path)


def test_duplicate_key_in_nested_mapping(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("cases:\n  a: 1\n  b: 2\n  a: 3\n")
    with pytest.raises(YamlError, match=r"s\.yaml:4: key 'a' is given twice \(lines 2 and 4\)"):
        load_yaml_mapping(path)


def test_same_key_in_sibling_mappings_is_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("x:\n  a: 1\ny:\n  a: 2\n")
    assert load_yaml_mapping(path) == {"x": {"a": 1}, "y": {"a": 2}}


@pytest.mark.parametrize("text, fragment", [
    ("a: [1, 2\nb: 3\n", ":2: invalid YAML"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("1: a\n", "keys must be strings"),
])
def test_bad_files(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(YamlError, match=fragment.replace("[", r"\[")):
        load_yaml_mapping(path)


def test_missing_binary_and_folder(tmp_path):
    with pytest.raises(YamlError, match="file not found"):
        load_yaml_mapping(tmp_path / "nope.yaml")
    with pytest.raises(YamlError, match="is a directory"):
        load_yaml_mapping(tmp_path)
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(YamlError, match="not a UTF-8 text file"):
        load_yaml_mapping(binary)


def test_empty_file_is_empty_mapping(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("")
    assert load_yaml_mapping(path) == {}


def test_only_true_and_false_are_booleans(tmp_path):
    """YAML 1.2 booleans, as LLaMA-Factory (OmegaConf) reads recipes: 'no' is a word, not False."""
    from npu_ft.config import build_config, parse_overrides

    path = tmp_path / "r.yaml"
    path.write_text("a: no\nb: on\nc: true\nd: False\ne: yes\n")
    assert load_yaml_mapping(path) == {"a": "no", "b": "on", "c": True, "d": False, "e": "yes"}
    assert [v for _, v, _ in parse_overrides(["save_strategy=no", "bf16=true", "x=off"])] == ["no", True, "off"]
    cfg = build_config({"model_name_or_path": "m", "save_strategy": "no", "bf16": "yes"})
    assert cfg.save_strategy == "no" and cfg.bf16 is True
