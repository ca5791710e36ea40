"""Bad suite files give a SuiteError naming the file and the key, before anything runs."""

from __future__ import annotations

import textwrap

import pytest

from npu_ft.bench.cli import bench_main
from npu_ft.bench.suite import SuiteError, load_suite, parse_suite

GOOD = {"models": ["tiny"], "methods": ["lora"], "implementations": ["npu-ft", "reference"], "devices": ["cpu"]}


def _write(tmp_path, text: str):
    p = tmp_path / "suite.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_good_suite_expands_the_matrix():
    s = parse_suite({**GOOD, "methods": ["lora", "qlora", "full"], "variants": [{"seq_len": 16}, {"seq_len": 32}]})
    assert len(s.cases) == 3 * 2 * 2
    assert {c.seq_len for c in s.cases} == {16, 32}
    assert s.tolerance("qlora", "float32") == 1e-3 and s.tolerance("lora", "float32") == 1e-4


def test_shipped_suites_are_valid():
    from pathlib import Path

    suites = sorted((Path(__file__).resolve().parents[2] / "bench" / "suites").glob("*.yaml"))
    assert len(suites) >= 3
    for p in suites:
        load_suite(p, check_devices=False)


@pytest.mark.parametrize("patch, words", [
    ({"metods": ["lora"]}, ["'metods'", "unknown key"]),
    ({"methods": ["lora", "dora"]}, ["'methods'", "'dora'", "lora, qlora, full"]),
    ({"implementations": ["npu-ft", "unsloth"]}, ["'implementations'", "'unsloth'"]),
    ({"devices": ["tpu"]}, ["'devices'", "'tpu'"]),
    ({"models": ["qwen9-1t"]}, ["'models'", "'qwen9-1t'"]),
    ({"dtype": "float8"}, ["'dtype'", "'float8'"]),
    ({"seq_len": "long"}, ["'seq_len'", "must be int"]),
    ({"steps": 0}, ["'steps'", ">= 1"]),
    ({"gradient_checkpointing": "yes"}, ["'gradient_checkpointing'", "bool"]),
    ({"lora": {"r": 8, "rank": 4}}, ["'lora.rank'", "unknown key"]),
    ({"lora": {"r": 0}}, ["'lora.r'", "> 0"]),
    ({"variants": [{"seq_len": 8, "sequence": 9}]}, ["'variants[0].sequence'"]),
    ({"tolerances": {"dora": 1e-3}}, ["'tolerances.dora'"]),
    ({"methods": ["lora", "lora"]}, ["listed twice"]),
    ({"methods": []}, ["at least one"]),
    # the LoRA-family and optimizer settings (tests/bench/test_methods_settings.py has the rest)
    ({"adapter": "dora", "methods": ["full"]}, ["'adapter'", "method lora or qlora"]),
    ({"adapter": "pissa", "methods": ["qlora"]}, ["'adapter'", "full-precision"]),
    ({"adapter": "loha"}, ["'adapter'", "'loha'"]),
    ({"optim": "sgd"}, ["'optim'", "'sgd'"]),
    ({"adapter": "dora", "implementations": ["llamafactory"]}, ["'adapter'", "not 'llamafactory'"]),
    ({"optim": "adamw_8bit", "implementations": ["llamafactory+npu-ft"]}, ["'optim'", "npu-ft and reference"]),
    ({"sweep": [{"method": "dora"}]}, ["'sweep[0].method'", "lora, qlora, full"]),
    ({"sweep": {"method": ["full", "lorra"]}}, ["'sweep.method[1]'", "'lorra'"]),
    ({"lora": {"vera_r": 0}}, ["'lora.vera_r'", "> 0"]),
])
def test_bad_key_is_named(patch, words):
    with pytest.raises(SuiteError) as err:
        parse_suite({**GOOD, **patch}, "my-suite.yaml", check_devices=False)
    msg = str(err.value)
    assert "my-suite.yaml" in msg
    for w in words:
        assert w in msg, msg


def test_missing_required_key():
    with pytest.raises(SuiteError, match="missing required key 'methods'"):
        parse_suite({"models": ["tiny"], "implementations": ["npu-ft"]}, "s.yaml")


def test_unavailable_device_is_a_clear_error():
    from npu_ft.device import all_backends

    if all_backends()["npu"].is_available():  # pragma: no cover - on an Ascend box
        pytest.skip("npu is available here")
    with pytest.raises(SuiteError, match=r"device 'npu' is unavailable here: "):
        parse_suite({**GOOD, "devices": ["cpu", "npu"]}, "s.yaml")


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(SuiteError, match="must be a mapping"):
        load_suite(_write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(SuiteError, match="not valid YAML"):
        load_suite(_write(tmp_path, "models: [tiny\n"))
    with pytest.raises(SuiteError, match="cannot read suite file"):
        load_suite(tmp_path / "nope.yaml")


def test_cli_reports_the_error_and_exits_1(tmp_path, capsys):
    p = _write(tmp_path, """
        models: [tiny]
        methods: [lora, prompt-tuning]
        implementations: [npu-ft]
    """)
    assert bench_main([str(p), "--out", str(tmp_path / "out")]) == 1  # bad input, not usage
    err = capsys.readouterr().err
    assert "prompt-tuning" in err and str(p) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert bench_main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 1
    assert "a.csv" in capsys.readouterr().err
