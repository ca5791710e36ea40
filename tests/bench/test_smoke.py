"""CI smoke run of bench/suites/smoke.yaml: tiny Qwen2, every method on both implementations.

Asserts that the harness fills every column, that npu-ft's loss curve matches the reference path's
(transformers + PEFT, + bitsandbytes 4-bit for QLoRA) within the stated tolerance, and that QLoRA
stores fewer weight bytes than LoRA. No wall-time assertions: timings on a shared CI box are noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from npu_ft.bench import load_suite, run_suite
from npu_ft.bench.report import COLUMNS, MAY_BE_EMPTY

SMOKE = Path(__file__).resolve().parents[2] / "bench" / "suites" / "smoke.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    suite = load_suite(SMOKE)
    # two case processes at once: peak memory stays per process; timings are not asserted
    run_suite(suite, out, progress=None, jobs=2)
    return suite, out


def _empty(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def test_every_case_ran_and_every_column_is_filled(smoke):
    suite, out = smoke
    df = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=["nan", "NaN"])
    assert len(df) == len(suite.cases) == 6
    failed = df[df["status"] != "ok"]
    assert failed.empty, failed[["case_id", "error"]].to_string()
    for _, row in df.iterrows():
        empty = [c for c in COLUMNS if c not in MAY_BE_EMPTY and _empty(row[c])]
        assert not empty, f"{row['case_id']}: empty columns {empty}"
        assert row["peak_mem_bytes"] > 0 and row["tokens_per_s"] > 0 and row["weight_bytes"] > 0
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        losses = json.loads(row["losses"])
        assert len(losses) == row["steps"] + row["warmup"] and all(math.isfinite(x) for x in losses)
        assert row["trainable_params"] > 0


def test_loss_parity_per_method(smoke):
    _, out = smoke
    par = pd.read_csv(out / "parity.csv")
    impl = par[par["kind"] == "implementation"]
    assert sorted(impl["method"]) == ["full", "lora", "qlora"]
    for _, p in impl.iterrows():
        assert p["pass"], f"{p['method']}: max rel loss diff {p['max_rel_loss_diff']:.2e} > {p['tolerance']:.0e}"
    assert dict(zip(impl["method"], impl["tolerance"], strict=False)) == {"lora": 1e-4, "full": 1e-4, "qlora": 1e-3}


def test_qlora_stores_fewer_weight_bytes_than_lora(smoke):
    _, out = smoke
    df = pd.read_csv(out / "results.csv")
    for impl in ("npu-ft", "reference"):
        w = dict(
            zip(
                df[df["implementation"] == impl]["method"],
                df[df["implementation"] == impl]["weight_bytes"],
                strict=False,
            )
        )
        assert w["qlora"] < w["lora"], (impl, w)
    lora = df[df["method"] == "lora"].set_index("implementation")
    assert lora.loc["npu-ft", "trainable_params"] == lora.loc["reference", "trainable_params"]


def test_reports_written(smoke):
    _, out = smoke
    for name in (
        "raw.jsonl",
        "suite.json",
        "parity.csv",
        "ratios.csv",
        "report.md",
        "memory_vs_throughput.png",
        "loss_curves.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "memory_vs_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Loss parity" in report and "## Ratios" in report and "FAIL" not in report
