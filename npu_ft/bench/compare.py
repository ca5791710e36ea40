"""`npu-ft bench compare A.csv B.csv`: two result files side by side, with B / A ratios.

Rows are matched on what the case ran (model, method, implementation, dtype, sequence length,
batch, gradient checkpointing, variant), not on the device, so a CPU run compares with an NPU run
and a run before a change with one after it.
"""

from __future__ import annotations

from pathlib import Path

KEY = ["model", "method", "implementation", "dtype", "seq_len", "batch_size", "gradient_checkpointing", "variant"]
METRICS = ["tokens_per_s", "s_per_step_median", "peak_mem_mib", "weight_mib", "loss_last"]


def compare(a_path: str | Path, b_path: str | Path, key: list[str] | None = None):
    """DataFrame: one row per case found in both files, ``<metric>_a``, ``<metric>_b`` and
    ``<metric>_ratio`` (= b / a); cases found in only one file are listed with ``only_in``."""
    import pandas as pd

    key = list(key or KEY)
    frames = []
    for tag, p in (("a", a_path), ("b", b_path)):
        df = pd.read_csv(p)
        missing = [k for k in key if k not in df.columns]
        if missing:
            raise ValueError(f"{p}: not a results.csv of npu-ft bench (missing columns {missing})")
        keep = key + [c for c in METRICS + ["device", "device_name", "status"] if c in df.columns]
        frames.append(df[keep].rename(columns={c: f"{c}_{tag}" for c in keep if c not in key}))
    merged = frames[0].merge(frames[1], on=key, how="outer", indicator=True)
    merged["only_in"] = merged["_merge"].map({"left_only": "a", "right_only": "b", "both": ""}).astype(str)
    merged = merged.drop(columns=["_merge"])
    for m in METRICS:
        if f"{m}_a" in merged and f"{m}_b" in merged:
            merged[f"{m}_ratio"] = pd.to_numeric(merged[f"{m}_b"], errors="coerce") / pd.to_numeric(
                merged[f"{m}_a"], errors="coerce")
    return merged


def to_markdown(df, a_name: str, b_name: str) -> str:
    import math

    lines = [f"A = {a_name}", f"B = {b_name}", ""]
    header = ["model", "method", "impl", "dtype", "seq×batch", "gc", "device A→B",
              "tokens/s A", "tokens/s B", "B/A", "peak MiB A", "peak MiB B", "B/A", "loss last A", "loss last B"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def f(v, spec=".1f"):
        try:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return "-"
            return format(float(v), spec)
        except (TypeError, ValueError):
            return str(v)

    for _, r in df.iterrows():
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["model"]),
                    str(r["method"]),
                    str(r["implementation"]),
                    str(r["dtype"]),
                    f"{r['seq_len']}×{r['batch_size']}",
                    str(r["gradient_checkpointing"]),
                    f"{r.get('device_a', '-')}→{r.get('device_b', '-')}",
                    f(r.get("tokens_per_s_a")),
                    f(r.get("tokens_per_s_b")),
                    f(r.get("tokens_per_s_ratio"), ".2f") + "×",
                    f(r.get("peak_mem_mib_a"), ".0f"),
                    f(r.get("peak_mem_mib_b"), ".0f"),
                    f(r.get("peak_mem_mib_ratio"), ".2f") + "×",
                    f(r.get("loss_last_a"), ".4f"),
                    f(r.get("loss_last_b"), ".4f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)
