"""scripts/verify_hardware.py / .sh end to end on CPU: the hardware parts are skipped and
say so, the rest runs, a dated record is written and the matrix gets a row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("verify_hardware", ROOT / "scripts" / "verify_hardware.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_verify = _script()
MATRIX_BEGIN, MATRIX_END, add_matrix_row = _verify.MATRIX_BEGIN, _verify.MATRIX_END, _verify.add_matrix_row


def test_matrix_rows_are_appended_between_the_markers(tmp_path):
    doc = tmp_path / "devices.md"
    doc.write_text(f"# Devices\n\n{MATRIX_BEGIN}\n{MATRIX_END}\n\nafter\n")
    add_matrix_row(doc, "| a |")
    add_matrix_row(doc, "| b |")
    text = doc.read_text()
    body = text.split(MATRIX_BEGIN)[1].split(MATRIX_END)[0]
    assert body.count("| date |") == 1 and body.index("| a |") < body.index("| b |")
    assert text.endswith("after\n") and text.startswith("# Devices")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(ValueError, match="no verification matrix markers"):
        add_matrix_row(plain, "| c |")
    assert plain.read_text() == "no markers\n"


def test_the_shipped_devices_doc_has_the_matrix():
    text = (ROOT / "docs" / "devices.md").read_text()
    assert MATRIX_BEGIN in text and MATRIX_END in text


@pytest.mark.slow
def test_verify_hardware_script_runs_on_cpu(tmp_path):
    doc = tmp_path / "devices.md"
    doc.write_text(f"{MATRIX_BEGIN}\n{MATRIX_END}\n")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "verify_hardware.sh"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path / "rec"), "--matrix", str(doc)],
                          capture_output=True, text=True, timeout=3000, cwd=tmp_path,
                          env={**os.environ, "PYTHON": sys.executable})  # this environment's python
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record_json,) = (tmp_path / "rec").glob("verify-*.json")
    record = json.loads(record_json.read_text())
    parts = {p["part"]: p for p in record["parts"]}
    assert parts["device tests"]["status"] == "skipped" and "no cuda/ascend device" in parts["device tests"]["summary"]
    assert parts["doctor"]["status"] == "passed" and all(op["passed"] for op in parts["doctor"]["ops"])
    assert parts["micro-benchmarks"]["status"] == "passed" and parts["micro-benchmarks"]["speedups"]
    assert parts["smoke suite"]["status"] == "passed" and parts["smoke suite"]["parity"]
    assert record["device"] == "cpu" and record["versions"]["torch"]
    assert record_json.with_suffix(".md").read_text().startswith("# npu-ft verification: cpu")
    row = doc.read_text().split(MATRIX_BEGIN)[1].split(MATRIX_END)[0].strip().splitlines()[-1]
    assert row.startswith("| 20") and "| cpu |" in row and "skipped (no device)" in row
