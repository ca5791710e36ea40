"""The ``llamafactory`` and ``llamafactory+npu-ft`` bench implementations on real SFT rows: LLaMA-Factory
0.9.5's own trainer (in its venv) trains the same packed alpaca-synth rows as npu-ft and the
reference, with the same loss curve.

Needs a Python with llamafactory==0.9.5 (``scripts/ci_llamafactory.sh --setup-only``; the CI step
that builds it sets ``NPU_FT_LF_VENV_TESTS=1``): without one the test is skipped, saying so.
"""

from __future__ import annotations

import os

import pytest

from npu_ft.bench import aggregate, parity, parse_suite, run_suite
from npu_ft.bench.impl_llamafactory import lf_python

pytestmark = pytest.mark.slow


def _lf_python() -> str | None:
    try:
        return lf_python()
    except RuntimeError:
        return None


@pytest.mark.skipif(_lf_python() is None and not os.environ.get("NPU_FT_LF_VENV_TESTS"),
                    reason="no LLaMA-Factory 0.9.5 venv (scripts/ci_llamafactory.sh --setup-only, or NPU_FT_LF_PYTHON)")
def test_llamafactory_lanes_train_the_same_rows_with_the_same_loss(tmp_path):
    suite = parse_suite({
        "name": "lf-lanes", "models": ["tiny"], "methods": ["lora"],
        "implementations": ["npu-ft", "reference", "llamafactory", "llamafactory+npu-ft"],
        "seq_len": 64, "batch_size": 2, "steps": 2, "warmup": 1, "lr": 1e-3,
        "data": {"mode": "sft", "dataset": "alpaca-synth", "packing": True, "examples": 48},
        "sweep_per_implementation": {"llamafactory+npu-ft": {"checkpoint_policy": ["full", "selective"]}},
    }, "lf-lanes.yaml")
    results = run_suite(suite, tmp_path, progress=None, jobs=2)
    rows = aggregate(results)
    failed = [(r["case_id"], r["error"]) for r in rows if r["status"] != "ok"]
    assert not failed, failed
    by = {(r["implementation"], r["policy"]): r for r in rows}
    assert set(by) == {("npu-ft", "off"), ("reference", "off"), ("llamafactory", "off"),
                       ("llamafactory+npu-ft", "full"), ("llamafactory+npu-ft", "selective")}
    # the plugin's lanes ran npu-ft's kernels, plain LLaMA-Factory did not
    raw = {r["case"]["implementation"] + "/" + str(r["case"]["gradient_checkpointing"]): r for r in results}
    assert sum(raw["llamafactory+npu-ft/True"]["kernel_calls"]["lora_linear"].values()) > 0
    assert not any(raw["llamafactory/False"]["kernel_calls"]["lora_linear"].values())
    # same rows: same example and labelled token counts per step on every lane
    counts = {(r["case"]["implementation"], str(r["case"]["gradient_checkpointing"])): (r["step_tokens"],
                                                                                      r["step_labelled"])
              for r in results}
    assert len(set(map(str, counts.values()))) == 1
    checks = parity(rows, suite.tolerances, suite.cross_device_tolerance)
    assert len(checks) == 4 and all(c["pass"] for c in checks), checks
