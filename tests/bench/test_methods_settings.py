"""The bench's LoRA-family and optimizer settings (``adapter``, ``optim``, a sweep point's ``method``):
how they expand, what they refuse, and one tiny end-to-end run of the methods suite's shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npu_ft.bench.suite import load_suite, method_name, parse_suite

ROOT = Path(__file__).resolve().parents[2]
BASE = {"models": ["tiny"], "methods": ["lora"], "implementations": ["npu-ft", "reference"], "devices": ["cpu"]}


def test_points_set_method_adapter_and_optim():
    s = parse_suite({**BASE, "methods": ["lora", "qlora"], "sweep_per_implementation": {
        "npu-ft": [{"method": "full", "optim": "adamw_8bit"}, {}, {"method": "qlora", "adapter": "dora"}],
        "reference": [{"adapter": "vera"}]}}, "s.yaml", check_devices=False)
    names = sorted((c.implementation, c.method_name) for c in s.cases)
    # a point with its own method runs once, whatever `methods` lists; {} runs every listed method
    assert names == [("npu-ft", "full+adamw_8bit"), ("npu-ft", "lora"), ("npu-ft", "qdora"), ("npu-ft", "qlora"),
                     ("reference", "qvera"), ("reference", "vera")]
    full = next(c for c in s.cases if c.method == "full")
    assert full.case_id.endswith("/adamw_8bit/v0.0") and full.optim == "adamw_8bit"
    dora = next(c for c in s.cases if c.adapter == "dora")
    # the adapter and optimizer change the numbers: they are part of the parity group
    plain = next(c for c in s.cases if c.method == "qlora" and c.adapter == "lora")
    assert dora.parity_group != plain.parity_group and "/dora/" in dora.case_id


def test_defaults_leave_ids_and_parity_groups_as_they_were():
    case = parse_suite(BASE, "s.yaml", check_devices=False).cases[0]
    assert case.case_id == "tiny/lora/npu-ft/cpu/float32/s128b1/nogc/v0"
    assert len(case.parity_group) == 12 and case.method_name == "lora"


@pytest.mark.parametrize("method, adapter, optim, name", [
    ("lora", "dora", "adamw_torch", "dora"), ("qlora", "dora", "adamw_torch", "qdora"),
    ("qlora", "lora", "adamw_torch", "qlora"), ("full", "lora", "adamw_8bit_all", "full+adamw_8bit_all"),
    ("qlora", "lora_fa", "adamw_8bit", "qlora_fa+adamw_8bit")])
def test_method_name(method, adapter, optim, name):
    assert method_name(method, adapter, optim) == name


def test_methods_suite_lists_every_method():
    suite = load_suite(ROOT / "bench" / "suites" / "cpu-qwen2.5-0.5b-methods.yaml", check_devices=False)
    npu_ft = {c.method_name for c in suite.cases if c.implementation == "npu-ft"}
    assert npu_ft == {"full", "full+adamw_8bit", "full+adamw_8bit_all", "lora", "qlora", "dora", "qdora", "pissa",
                      "lora_fa", "vera"}
    assert {(c.method_name, c.policy) for c in suite.cases if c.policy != "selective"
            and c.implementation == "npu-ft"} == {("lora", "off"), ("lora_fa", "off")}
    assert {c.policy for c in suite.cases if c.implementation == "reference"} == {"full"}


@pytest.mark.slow
def test_tiny_methods_run(tmp_path):
    """The methods suite's settings on a tiny model: DoRA and 8-bit AdamW agree with PEFT and
    bitsandbytes in loss, the 8-bit states take a third of fp32 AdamW's bytes or less once the
    embedding joins them, and the report has the Methods table and the method ratios."""
    import yaml

    from npu_ft.bench.cli import bench_main

    data = yaml.safe_load((ROOT / "bench" / "suites" / "cpu-qwen2.5-0.5b-methods.yaml").read_text())
    data.update(name="methods-tiny", models=["tiny"], seq_len=48, steps=2, warmup=1, repeats=1,
                data={"mode": "sft", "dataset": "alpaca-synth", "packing": True, "examples": 48},
                lora={"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all", "vera_r": 16},
                model_overrides={"num_hidden_layers": 1, "vocab_size": 2048},
                sweep_per_implementation={
                    "npu-ft": [{"method": "full"}, {"method": "full", "optim": "adamw_8bit_all"}, {},
                               {"adapter": "dora"}],
                    "reference": [{"adapter": "dora"}, {"method": "full", "optim": "adamw_8bit_all"}]})
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert bench_main([str(suite), "--out", str(out)]) == 0
    import pandas as pd

    rows = {(r.implementation, r.method_name): r for r in pd.read_csv(out / "results.csv").itertuples()}
    assert set(rows) == {("npu-ft", "full"), ("npu-ft", "full+adamw_8bit_all"), ("npu-ft", "lora"),
                         ("npu-ft", "dora"), ("reference", "dora"), ("reference", "full+adamw_8bit_all")}
    parity = pd.read_csv(out / "parity.csv")
    assert set(parity.method_name) == {"dora", "full+adamw_8bit_all"} and parity["pass"].all(), parity
    full, full8 = rows[("npu-ft", "full")], rows[("npu-ft", "full+adamw_8bit_all")]
    assert full8.optimizer_state_bytes <= 0.3 * full.optimizer_state_bytes
    assert full.optimizer_state_bytes >= 8 * full.trainable_params  # two fp32 moments per parameter
    assert rows[("npu-ft", "dora")].trainable_params > rows[("npu-ft", "lora")].trainable_params
    report = (out / "report.md").read_text()
    assert (out / "methods.png").stat().st_size > 10_000
    assert "## Methods" in report and "npu-ft: dora (selective) / lora (selective)" in report
    assert "npu-ft: full+adamw_8bit_all (selective) / full (selective)" in report
    raw = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in raw), [r.get("error") for r in raw]


def test_memory_probe_measures_live_tensors(tmp_path):
    """``memory_probe: true``: one more process per CPU case, kept out of the timings, whose live-tensor
    increment shows LoRA-FA's saving without checkpointing (it keeps x A^T, not x)."""
    from npu_ft.bench.report import load_raw
    from npu_ft.bench.runner import run_suite

    suite = parse_suite({**BASE, "implementations": ["npu-ft"], "seq_len": 384, "batch_size": 2, "steps": 1,
                         "warmup": 1, "gradient_checkpointing": False, "memory_probe": True,
                         "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all"},
                         "model_overrides": {"hidden_size": 320, "intermediate_size": 896, "num_hidden_layers": 4,
                                             "num_attention_heads": 5, "num_key_value_heads": 1,
                                             "vocab_size": 10000},
                         "sweep": {"adapter": ["lora", "lora_fa"]}}, "s.yaml")
    out = tmp_path / "out"
    run_suite(suite, out, progress=None)
    raw = load_raw(out / "raw.jsonl")
    assert [bool(r.get("memory_probe")) for r in raw] == [False, False, True, True]
    assert all(r["status"] == "ok" for r in raw), [r.get("error") for r in raw]
    import pandas as pd

    rows = {r.adapter: r for r in pd.read_csv(out / "results.csv").itertuples()}
    assert rows["lora"].repeats_ok == rows["lora_fa"].repeats_ok == 1  # the probe is not a timed repeat
    # (measured 103 and 84 MiB: the two norm outputs and SwiGLU's product are no longer kept)
    assert rows["lora_fa"].tensor_mem_bytes < 0.9 * rows["lora"].tensor_mem_bytes
    report = (out / "report.md").read_text()
    assert "live tensors (memory probe)" in report and "Live tensors:" in report
