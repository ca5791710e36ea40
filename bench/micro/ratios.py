"""Ratio table from pytest-benchmark results: per group, npu-ft against its baseline.

    python bench/micro/ratios.py RUN.json     # a file written with --benchmark-json

In every group the benchmark whose function name contains ``npu_ft`` is npu-ft's side and the one
whose name contains ``baseline`` (PEFT, bitsandbytes) the other.
"""

from __future__ import annotations

import json
import sys


def ratio_rows(records: list[dict]) -> list[dict]:
    groups: dict[str, dict[str, dict]] = {}
    for r in records:
        side = "npu_ft" if "npu_ft" in r["name"] else ("baseline" if "baseline" in r["name"] else None)
        if side and r["group"]:
            groups.setdefault(r["group"], {})[side] = r
    rows = []
    for group, sides in sorted(groups.items()):
        if set(sides) != {"npu_ft", "baseline"}:
            continue
        a, b = sides["npu_ft"], sides["baseline"]
        row = {"group": group, "npu_ft_ms": a["median"] * 1e3, "baseline_ms": b["median"] * 1e3,
               "speedup": b["median"] / a["median"], "target": a["extra_info"].get("target", "")}
        for key in ("saved_bytes", "out_bytes"):
            if key in a["extra_info"] and key in b["extra_info"]:
                row[f"npu_ft_{key}"] = a["extra_info"][key]
                row[f"baseline_{key}"] = b["extra_info"][key]
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| group | npu-ft median ms | baseline median ms | speedup (baseline/npu-ft) | target | "
             "saved for backward npu-ft / baseline (MiB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        mem = ""
        if "npu_ft_saved_bytes" in r:
            mem = f"{r['npu_ft_saved_bytes'] / 2**20:.1f} / {r['baseline_saved_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['group']} | {r['npu_ft_ms']:.2f} | {r['baseline_ms']:.2f} | {r['speedup']:.2f}× | "
                     f"{r['target']} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        data = json.load(f)
    records = [
        {
            "group": b["group"],
            "name": b["name"].split("[")[0].replace("test_", ""),
            "median": b["stats"]["median"],
            "extra_info": b.get("extra_info", {}),
        }
        for b in data["benchmarks"]
    ]
    print(format_rows(ratio_rows(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
