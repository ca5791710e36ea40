"""`npu-ft bench`: run a suite, compare two result files, or rebuild a report.

    npu-ft bench SUITE.yaml [--out DIR] [--repeats N] [--only SUBSTR] [--list]
    npu-ft bench compare A.csv B.csv [--out FILE.md] [--csv FILE.csv]
    npu-ft bench report DIR            # rebuild results.csv, report.md and the plots from raw.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from npu_ft.cli_common import positive_int, report


def _run_main(argv: list[str]) -> int:
    from .runner import run_suite
    from .suite import SuiteError, load_suite

    p = argparse.ArgumentParser(prog="npu-ft bench", description="run a benchmark suite (each case in a fresh process)")
    p.add_argument("suite", help="suite YAML file (see bench/suites/)")
    p.add_argument("--out", default=None, help="output folder (default: bench/runs/<suite>-<time>)")
    p.add_argument("--repeats", type=positive_int, default=None, help="override the suite's repeats (>= 1)")
    p.add_argument("--only", default=None, help="run only cases whose id contains this text")
    p.add_argument("--skip", action="append", default=[],
                   help="skip cases whose id contains this text (repeatable)")
    p.add_argument("--jobs", type=int, default=1,
                   help="case processes at once (default 1; >1 only for smoke runs: timings then compete)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    try:
        suite = load_suite(args.suite, check_devices=not args.list)
    except SuiteError as exc:  # bad input: exit 1, one line naming the file and key
        return report("npu-ft bench", exc)
    if args.list:
        for c in suite.cases:
            if (not args.only or args.only in c.case_id) and not any(s in c.case_id for s in args.skip):
                print(c.case_id)
        return 0
    out = Path(args.out or f"bench/runs/{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        results = run_suite(suite, out, repeats=args.repeats, only=args.only, skip=args.skip, jobs=args.jobs)
    except ValueError as exc:
        return report("npu-ft bench", exc)
    from .report import aggregate, parity

    rows = aggregate(results)
    print((out / "report.md").read_text())
    print(f"results in {out}/ (results.csv, ratios.csv, frontier.csv, report.md, memory_vs_throughput.png, "
          "loss_curves.png)")
    failed = [r for r in rows if r["status"] == "failed"]
    par_fail = [x for x in parity(rows, suite.tolerances, suite.cross_device_tolerance) if not x["pass"]]
    return 1 if failed or par_fail else 0


def _compare_main(argv: list[str]) -> int:
    from .compare import compare, to_markdown

    p = argparse.ArgumentParser(prog="npu-ft bench compare", description="two results.csv side by side, B/A ratios")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--csv", default=None, help="also write the merged table as CSV here")
    args = p.parse_args(argv)
    try:
        df = compare(args.a, args.b)
    except (OSError, ValueError) as exc:  # a missing or malformed results.csv: bad input, exit 1
        return report("npu-ft bench compare", exc)
    md = to_markdown(df, args.a, args.b)
    print(md)
    if args.out:
        Path(args.out).write_text(md + "\n")
    if args.csv:
        df.to_csv(args.csv, index=False)
    return 0


def _report_main(argv: list[str]) -> int:
    from .report import regenerate

    p = argparse.ArgumentParser(prog="npu-ft bench report", description="rebuild the reports of a run from raw.jsonl")
    p.add_argument("dir")
    args = p.parse_args(argv)
    missing = [name for name in ("suite.json", "raw.jsonl") if not (Path(args.dir) / name).is_file()]
    if missing:  # not a bench run's folder: write nothing into it
        return report("npu-ft bench report", f"{args.dir}: no {' or '.join(missing)} here (not the --out folder "
                                             "of an `npu-ft bench` run)")
    regenerate(args.dir)
    print((Path(args.dir) / "report.md").read_text())
    return 0


def bench_main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "compare":
        return _compare_main(argv[1:])
    if argv and argv[0] == "report":
        return _report_main(argv[1:])
    return _run_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(bench_main(sys.argv[1:]))
