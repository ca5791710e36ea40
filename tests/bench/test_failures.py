"""A case that raises, runs out of memory, crashes or hangs is recorded as failed; the suite goes on."""

from __future__ import annotations

import json

from npu_ft.bench import aggregate, parse_suite, run_suite
from npu_ft.bench.runner import run_case_subprocess

MOD = "custom:tests.bench.impls_for_tests"


def _suite(impls, **kw):
    data = {"name": "failures", "models": ["tiny"], "methods": ["full"], "implementations": impls,
            "devices": ["cpu"], "seq_len": 8, "batch_size": 1, "steps": 2, "warmup": 0,
            "model_overrides": {"num_hidden_layers": 1}, **kw}
    return parse_suite(data, "failures.yaml")


def test_raising_and_oom_cases_are_recorded_and_the_suite_goes_on(tmp_path):
    suite = _suite([f"{MOD}:raising", f"{MOD}:out_of_memory", f"{MOD}:plain"])
    results = run_suite(suite, tmp_path, progress=None)
    by_impl = {r["case"]["implementation"].rsplit(":", 1)[1]: r for r in results}
    assert by_impl["raising"]["status"] == "failed"
    assert "RuntimeError: boom" in by_impl["raising"]["error"]
    assert "Traceback" in by_impl["raising"]["traceback"]
    assert by_impl["out_of_memory"]["status"] == "failed"
    assert by_impl["out_of_memory"]["error"].startswith("out of memory: MemoryError")
    assert by_impl["plain"]["status"] == "ok"  # ran after the failures
    rows = {r["implementation"].rsplit(":", 1)[1]: r for r in aggregate(results)}
    assert rows["raising"]["status"] == "failed" and "boom" in rows["raising"]["error"]
    assert rows["plain"]["status"] == "ok" and rows["plain"]["tokens_per_s"] > 0
    # reports are written, failures listed
    report = (tmp_path / "report.md").read_text()
    assert "## Failures" in report and "boom" in report
    assert len((tmp_path / "raw.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "results.csv").exists()


def test_hard_crash_and_timeout_are_recorded(tmp_path):
    crash = _suite([f"{MOD}:aborting"]).cases[0]
    res = run_case_subprocess(crash)
    assert res["status"] == "failed"
    assert "crashed: process killed by SIGABRT" in res["error"]
    hang = _suite([f"{MOD}:sleeping"], timeout_s=3).cases[0]
    res = run_case_subprocess(hang)
    assert res["status"] == "failed" and res["error"].startswith("timeout: no result after 3 s")
    json.dumps(res)  # still a plain record
