"""Micro-benchmarks (pytest-benchmark): npu-ft ops against the library they replace, same run.

    python -m pytest bench/micro --benchmark-only --benchmark-json=/tmp/micro.json
    python bench/micro/ratios.py /tmp/micro.json      # the same ratio table, from a saved run

Each pair shares a ``group`` (same shapes, same data); benchmark names are ``npu_ft`` and
``baseline``. At the end of the run this conftest prints, per group, the median time of each side,
the ratio baseline / npu-ft (>1 = npu-ft faster) and, where recorded, the bytes each side keeps for
backward (``extra_info['saved_bytes']``) and its output bytes.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
sys.path.insert(0, os.path.dirname(__file__))

from ratios import format_rows, ratio_rows  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    records = []
    for bench in session.benchmarks:
        if not bench.stats or bench.has_error:
            continue
        records.append({"group": bench.group, "name": bench.name.split("[")[0].replace("test_", ""),
                        "fullname": bench.name, "param": bench.param,
                        "median": bench.stats.median, "min": bench.stats.min, "max": bench.stats.max,
                        "rounds": bench.stats.rounds, "extra_info": dict(bench.extra_info)})
    rows = ratio_rows(records)
    if rows:
        terminalreporter.write_sep("=", "npu-ft vs baseline (same run)")
        terminalreporter.write_line(format_rows(rows))
