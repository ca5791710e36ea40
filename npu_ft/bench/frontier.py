"""Pareto frontiers of tokens/s against training memory, per implementation, and what they say.

A suite that sweeps settings (checkpointing policy, micro-batch, sequence length) gives every
implementation a cloud of (training memory, tokens/s) points per model, method, device, dtype and
data. A point is on its implementation's frontier when no other point of the same implementation
is at least as fast with no more memory. At each point of a baseline (``llamafactory``, else
``reference``), :func:`statements` says npu-ft's best tokens/s at equal or lower memory and its lowest
memory at equal or higher tokens/s.

Memory here is the training increment: the training-phase peak minus the memory after the model
was built (what the settings change); the absolute peak is in the tables beside it.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["BASELINES", "CHALLENGERS", "frontier", "frontier_groups", "fused_kernels_off", "point_label",
           "statements"]

#: implementations measured against, first found wins
BASELINES = ("llamafactory", "reference")
#: implementations whose frontier is compared with the baseline's
CHALLENGERS = ("npu-ft", "llamafactory+npu-ft")
#: what one frontier is drawn over
GROUP_KEYS = ("model", "method", "device", "dtype", "data")


def _ok(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") in ("ok", "partial") and r.get("train_mem_bytes") is not None]


def frontier(points: list[dict]) -> list[dict]:
    """The Pareto-optimal rows of ``points`` (least ``train_mem_bytes``, most ``tokens_per_s``),
    in increasing memory."""
    best: list[dict] = []
    for r in sorted(points, key=lambda r: (r["train_mem_bytes"], -r["tokens_per_s"])):
        if not best or r["tokens_per_s"] > best[-1]["tokens_per_s"]:
            best.append(r)
    return best


def frontier_groups(rows: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """{(model, method, device, dtype, data): {implementation: its ok rows}}, in the rows' order."""
    out: dict[tuple, dict[str, list[dict]]] = {}
    for r in _ok(rows):
        out.setdefault(tuple(r[k] for k in GROUP_KEYS), {}).setdefault(r["implementation"], []).append(r)
    return out


def fused_kernels_off(row: dict) -> bool:
    """Whether a results row ran with ``fused_kernels: false`` (rows from before the column: no)."""
    return str(row.get("fused_kernels")).lower() in ("false", "0")


def method_label(row: dict) -> str:
    """The row's ``method_name`` ("dora", "qdora", "full+adamw_8bit"; results from before the
    column: the method)."""
    return row.get("method_name") or row["method"]


def point_label(row: dict) -> str:
    """Short settings of a point: ``selective b2 s1024`` (+ `` nofused`` without the fused block ops)."""
    fused = " nofused" if fused_kernels_off(row) else ""
    return f"{row.get('policy', 'full')} b{row['batch_size']} s{row['seq_len']}{fused}"


def statements(rows: list[dict]) -> list[dict]:
    """At each baseline point, per challenger: its best tokens/s at equal or lower training memory and
    its lowest training memory at equal or higher tokens/s (None where it has no such point).

    ``at_or_above``: the challenger is at least as fast at this memory level (the frontier target).
    """
    out = []
    for key, by_impl in frontier_groups(rows).items():
        base_name = next((b for b in BASELINES if b in by_impl), None)
        if base_name is None:
            continue
        for name in CHALLENGERS:
            ours = by_impl.get(name)
            if not ours:
                continue
            for p in sorted(by_impl[base_name], key=lambda r: r["train_mem_bytes"]):
                within = [r for r in ours if r["train_mem_bytes"] <= p["train_mem_bytes"]]
                faster = [r for r in ours if r["tokens_per_s"] >= p["tokens_per_s"]]
                fast = max(within, key=lambda r: r["tokens_per_s"], default=None)
                lean = min(faster, key=lambda r: r["train_mem_bytes"], default=None)
                out.append({
                    **dict(zip(GROUP_KEYS, key, strict=True)), "baseline": base_name, "challenger": name,
                    "baseline_point": point_label(p), "baseline_tokens_per_s": p["tokens_per_s"],
                    "baseline_train_mem_bytes": p["train_mem_bytes"],
                    "on_baseline_frontier": p in frontier(by_impl[base_name]),
                    "best_at_mem_point": point_label(fast) if fast else None,
                    "best_at_mem_tokens_per_s": fast["tokens_per_s"] if fast else None,
                    "best_at_mem_speedup": fast["tokens_per_s"] / p["tokens_per_s"] if fast else None,
                    "least_mem_point": point_label(lean) if lean else None,
                    "least_mem_train_mem_bytes": lean["train_mem_bytes"] if lean else None,
                    "least_mem_ratio": lean["train_mem_bytes"] / p["train_mem_bytes"]
                    if lean and p["train_mem_bytes"] > 0 else None,
                    "at_or_above": bool(fast and fast["tokens_per_s"] >= p["tokens_per_s"]),
                })
    return out
