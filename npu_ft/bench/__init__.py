"""Benchmark harness: peak memory, throughput and loss parity per method × implementation × device.

Python API::

    from npu_ft.bench import load_suite, run_suite, compare
    suite = load_suite("bench/suites/smoke.yaml")
    results = run_suite(suite, "out/smoke")      # each case in a fresh process; writes the reports
    rows = aggregate(results)                     # one dict per case (the results.csv rows)

Command line: ``npu-ft bench SUITE.yaml --out DIR``, ``npu-ft bench compare A.csv B.csv``.
"""

from .compare import compare
from .report import aggregate, parity, ratios, regenerate, write_reports
from .runner import run_case_subprocess, run_suite
from .suite import BenchCase, Suite, SuiteError, load_suite, parse_suite

__all__ = [
    "BenchCase", "Suite", "SuiteError", "aggregate", "compare", "load_suite", "parity", "parse_suite",
    "ratios", "regenerate", "run_case_subprocess", "run_suite", "write_reports",
]
