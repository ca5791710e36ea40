"""Bench implementations llamafactory / llamafactory+npu-ft next to reference (LLaMA-Factory venv only)."""

from __future__ import annotations

import sys

from npu_ft.bench import run_suite
from npu_ft.bench.report import parity
from npu_ft.bench.suite import parse_suite

SUITE = {
    "name": "lf-bench-test", "models": ["tiny"], "methods": ["lora"],
    "implementations": ["reference", "llamafactory", "llamafactory+npu-ft"], "devices": ["cpu"],
    "dtype": "float32", "seq_len": 32, "batch_size": 2, "steps": 2, "warmup": 1, "repeats": 1,
    "gradient_checkpointing": False, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all"},
    "lr": 1.0e-3, "seed": 0, "timeout_s": 900,
}


def test_llamafactory_rows_in_the_same_report(tmp_path, monkeypatch):
    monkeypatch.setenv("NPU_FT_LF_PYTHON", sys.executable)
    suite = parse_suite(SUITE, "lf-bench-test.yaml")
    results = run_suite(suite, tmp_path, progress=None)
    by_impl = {r["case"]["implementation"]: r for r in results}
    for name, r in by_impl.items():
        assert r["status"] == "ok", (name, r.get("error"))
        assert len(r["losses"]) == 3 and r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
    assert "npu-ft-plugin" in by_impl["llamafactory+npu-ft"]["features"]
    assert sum(by_impl["llamafactory+npu-ft"]["kernel_calls"]["lora_linear"].values()) == 3 * 14
    assert not by_impl["llamafactory"]["kernel_calls"]["lora_linear"]
    # the same model, batches, optimizer and LoRA init: LLaMA-Factory's loss curve is the reference's
    import csv

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    checks = parity(rows, suite.tolerances, suite.cross_device_tolerance)
    # labels name the implementation and its checkpointing ("off": the suite turns it off)
    assert {c["compare"] for c in checks} == {"llamafactory (off) vs reference (off)",
                                              "llamafactory+npu-ft (off) vs reference (off)"}
    assert all(c["pass"] for c in checks), checks
    assert "llamafactory+npu-ft" in (tmp_path / "report.md").read_text()
