"""Reports from raw results: a CSV row per case, parity, ratios, a Markdown table and PNG plots.

Files written to the output folder::

    raw.jsonl                 one JSON result per case per repeat (written by the runner)
    suite.json                the suite's name, tolerances and cases (for `npu-ft bench report`)
    results.csv               one row per case (medians over repeats, see COLUMNS)
    parity.csv                loss parity per method: npu-ft vs reference, and across devices
    ratios.csv                npu-ft / reference (tokens/s, peak memory), QLoRA / LoRA peak memory
    report.md                 all of the above as Markdown, with the environment
    memory_vs_throughput.png  a point per method × implementation (× device)
    loss_curves.png           overlaid loss curves, a panel per model × method
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

#: results.csv columns, in order
COLUMNS = [
    "suite", "case_id", "model", "method", "implementation", "device", "device_name", "dtype", "seq_len",
    "batch_size", "steps", "warmup", "repeats_ok", "repeats_failed", "gradient_checkpointing", "checkpoint_policy",
    "lora_r",
    "status", "error",
    "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "s_per_step_median", "s_per_step_min",
    "s_per_step_max", "peak_mem_bytes", "peak_mem_mib", "peak_mem_max_bytes", "mem_kind", "baseline_mem_bytes",
    "trainable_params", "total_params", "weight_bytes", "weight_mib", "loss_first", "loss_last",
    "loss_repeat_spread", "losses", "features", "build_s",
    "torch", "torch_npu", "transformers", "peft", "bitsandbytes", "git_commit",
]
#: columns that may be empty on an ok row
MAY_BE_EMPTY = {"error"}
_CASE_KEYS = ("suite", "case_id", "model", "method", "implementation", "device", "dtype", "seq_len",
              "batch_size", "steps", "warmup", "gradient_checkpointing", "checkpoint_policy")
GROUP_KEYS = ("model", "method", "dtype", "seq_len", "batch_size", "gradient_checkpointing", "variant")


def load_raw(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def aggregate(results: list[dict]) -> list[dict]:
    """One row per case: step times pooled over the ok repeats (median, min, max); peak memory is
    the median over repeats; losses come from the first ok repeat."""
    by_case: dict[str, list[dict]] = {}
    for r in results:
        by_case.setdefault(r["case"]["case_id"], []).append(r)
    rows = []
    for _case_id, runs in by_case.items():
        case = runs[0]["case"]
        row = {k: case.get(k) for k in _CASE_KEYS}
        row["variant"] = case.get("variant", 0)
        row["lora_r"] = case.get("lora", {}).get("r") if case["method"] != "full" else 0
        ok = [r for r in runs if r.get("status") == "ok"]
        bad = [r for r in runs if r.get("status") != "ok"]
        row["repeats_ok"], row["repeats_failed"] = len(ok), len(bad)
        row["error"] = " || ".join(sorted({r.get("error", "") for r in bad}))
        first = (ok or runs)[0]
        vers = first.get("versions", {})
        for k in ("torch", "torch_npu", "transformers", "peft", "bitsandbytes"):
            row[k] = vers.get(k, "")
        row["git_commit"] = first.get("git_commit", "")
        row["device_name"] = first.get("device_name", "")
        if not ok:
            row["status"] = "failed"
            rows.append(row)
            continue
        row["status"] = "ok" if not bad else "partial"
        timed = [t for r in ok for t in r["step_s"][case["warmup"]:]]
        tokens = case["batch_size"] * case["seq_len"]
        med = statistics.median(timed)
        row.update(
            s_per_step_median=med, s_per_step_min=min(timed), s_per_step_max=max(timed),
            tokens_per_s=tokens / med, tokens_per_s_min=tokens / max(timed), tokens_per_s_max=tokens / min(timed),
        )
        peaks = [r["peak_mem_bytes"] for r in ok]
        row["peak_mem_bytes"] = int(statistics.median(peaks))
        row["peak_mem_mib"] = round(row["peak_mem_bytes"] / 2**20, 1)
        row["peak_mem_max_bytes"] = int(max(peaks))
        row["baseline_mem_bytes"] = int(statistics.median(r["baseline_mem_bytes"] for r in ok))
        row["mem_kind"] = first["mem_kind"]
        for k in ("trainable_params", "total_params", "weight_bytes"):
            row[k] = first[k]
        row["weight_mib"] = round(first["weight_bytes"] / 2**20, 1)
        losses = first["losses"]
        row["losses"] = json.dumps([round(x, 7) for x in losses])
        row["loss_first"], row["loss_last"] = losses[0], losses[-1]
        row["loss_repeat_spread"] = max(
            (abs(a - b) for r in ok for a, b in zip(r["losses"], losses, strict=False)), default=0.0)
        row["features"] = "+".join(first.get("features", []))
        row["build_s"] = round(statistics.median(r["build_s"] for r in ok), 2)
        rows.append(row)
    return rows


def _rel_diff(a: list[float], b: list[float]) -> float:
    n = min(len(a), len(b))
    if n == 0:
        return math.nan
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n], strict=False))


def parity(rows: list[dict], tolerances: dict, cross_device: dict) -> list[dict]:
    """Loss parity: every implementation against ``reference`` on the same device; and each
    implementation on each device against the same implementation on the first device listed."""
    out = []
    ok = [r for r in rows if r.get("status") in ("ok", "partial")]
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    for key, members in groups.items():
        g = dict(zip(GROUP_KEYS, key, strict=False))
        tol = float(tolerances[g["dtype"]][g["method"]])
        by_dev: dict[str, dict[str, dict]] = {}
        for r in members:
            by_dev.setdefault(r["device"], {})[r["implementation"]] = r
        for dev, impls in by_dev.items():
            ref = impls.get("reference")
            if ref is None:
                continue
            for name, r in impls.items():
                if name == "reference":
                    continue
                d = _rel_diff(json.loads(r["losses"]), json.loads(ref["losses"]))
                out.append({**g, "kind": "implementation", "compare": f"{name} vs reference", "device": dev,
                            "max_rel_loss_diff": d, "tolerance": tol, "pass": bool(d <= tol)})
        devices = list(by_dev)
        if len(devices) > 1:
            tol_x = float(cross_device[g["dtype"]])
            first = devices[0]
            for dev in devices[1:]:
                for name, r in by_dev[dev].items():
                    base = by_dev[first].get(name)
                    if base is None:
                        continue
                    d = _rel_diff(json.loads(r["losses"]), json.loads(base["losses"]))
                    out.append({**g, "kind": "device", "compare": f"{name}: {dev} vs {first}", "device": dev,
                                "max_rel_loss_diff": d, "tolerance": tol_x, "pass": bool(d <= tol_x)})
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """npu-ft / reference per method (tokens/s, peak memory), and npu-ft QLoRA / LoRA peak memory."""
    ok = {(r["model"], r["method"], r["implementation"], r["device"], r["dtype"], r["seq_len"],
           r["batch_size"], r["gradient_checkpointing"], r["variant"]): r
          for r in rows if r.get("status") in ("ok", "partial")}
    out = []
    for (model, method, impl, dev, dt, s, b, gc, v), r in ok.items():
        if impl != "npu-ft":
            continue
        base = dict(model=model, device=dev, dtype=dt, seq_len=s, batch_size=b, gradient_checkpointing=gc, variant=v)
        ref = ok.get((model, method, "reference", dev, dt, s, b, gc, v))
        if ref is not None:
            out.append({**base, "ratio": f"{method}: {_npu_ft_label(r)} / reference",
                        "tokens_per_s": r["tokens_per_s"] / ref["tokens_per_s"],
                        "peak_mem": r["peak_mem_bytes"] / ref["peak_mem_bytes"],
                        "weight_bytes": r["weight_bytes"] / ref["weight_bytes"]})
        if method == "qlora":
            lora = ok.get((model, "lora", "npu-ft", dev, dt, s, b, gc, v))
            if lora is not None:
                out.append({**base, "ratio": f"npu-ft: qlora{_policy_suffix(r)} / lora{_policy_suffix(lora)}",
                            "tokens_per_s": r["tokens_per_s"] / lora["tokens_per_s"],
                            "peak_mem": r["peak_mem_bytes"] / lora["peak_mem_bytes"],
                            "weight_bytes": r["weight_bytes"] / lora["weight_bytes"]})
    return out


def _policy_suffix(row: dict) -> str:
    """" (selective checkpointing)" for a row that ran a non-default npu-ft checkpointing policy."""
    policy = _gc_cell(row)
    return "" if policy in ("off", "full") else f" ({policy} checkpointing)"


def _npu_ft_label(row: dict) -> str:
    return "npu-ft" + _policy_suffix(row)


def _gc_cell(row: dict) -> str:
    """The markdown "gc" cell: off, or the checkpointing policy that ran."""
    if not row.get("gradient_checkpointing"):
        return "off"
    return row.get("checkpoint_policy") or "full"


def _fmt(v, digits=3):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def markdown(rows, par, rat, suite_meta: dict, env: dict | None = None) -> str:
    parts = [f"# Benchmark: {suite_meta.get('name', '')}", ""]
    if suite_meta.get("description"):
        parts += [suite_meta["description"].strip(), ""]
    first = next((r for r in rows if r.get("status") != "failed"), rows[0] if rows else {})
    if first:
        parts += [
            f"- device: {first.get('device_name', '')} ({', '.join(sorted({r['device'] for r in rows}))})",
            f"- torch {first.get('torch')}, torch_npu {first.get('torch_npu')}, "
            f"transformers {first.get('transformers')}, "
            f"peft {first.get('peft')}, bitsandbytes {first.get('bitsandbytes')}",
            f"- npu-ft commit: {first.get('git_commit')}",
        ]
    if env:
        parts += [f"- {k}: {v}" for k, v in env.items()]
    parts += [
        "- tokens/s: median over all timed steps of all repeats [min-max]; peak: median over repeats "
        "of the training-phase peak (CPU: resident-set high-water mark, reset after the model is built)",
        "",
    ]
    parts += ["## Cases", ""]
    header = [
        "model",
        "method",
        "impl",
        "device",
        "dtype",
        "seq×batch",
        "gc",
        "status",
        "tokens/s [min-max]",
        "s/step",
        "peak MiB",
        "weights MiB",
        "trainable",
        "loss first→last",
    ]
    body = []
    for r in rows:
        if r["status"] == "failed":
            body.append(
                [
                    r["model"],
                    r["method"],
                    r["implementation"],
                    r["device"],
                    r["dtype"],
                    f"{r['seq_len']}×{r['batch_size']}",
                    _gc_cell(r),
                    "FAILED",
                    r["error"][:160],
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        body.append(
            [
                r["model"],
                r["method"],
                r["implementation"],
                r["device"],
                r["dtype"],
                f"{r['seq_len']}×{r['batch_size']}",
                _gc_cell(r),
                r["status"],
                f"{r['tokens_per_s']:.1f} [{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}]",
                r["s_per_step_median"],
                r["peak_mem_mib"],
                r["weight_mib"],
                f"{r['trainable_params']:,}",
                f"{r['loss_first']:.4f}→{r['loss_last']:.4f}",
            ]
        )
    parts += [_md_table(header, body), ""]
    if par:
        parts += ["## Loss parity", ""]
        parts += [
            _md_table(
                ["model", "method", "dtype", "compare", "max rel loss diff", "tolerance", "pass"],
                [
                    [
                        p["model"],
                        p["method"],
                        p["dtype"],
                        p["compare"],
                        f"{p['max_rel_loss_diff']:.2e}",
                        f"{p['tolerance']:.0e}",
                        "PASS" if p["pass"] else "FAIL",
                    ]
                    for p in par
                ],
            ),
            "",
        ]
    if rat:
        parts += ["## Ratios", ""]
        parts += [
            _md_table(
                ["model", "device", "seq×batch", "gc", "ratio", "tokens/s", "peak memory", "weight bytes"],
                [
                    [
                        x["model"],
                        x["device"],
                        f"{x['seq_len']}×{x['batch_size']}",
                        x["gradient_checkpointing"],
                        x["ratio"],
                        f"{x['tokens_per_s']:.2f}×",
                        f"{x['peak_mem']:.2f}×",
                        f"{x['weight_bytes']:.2f}×",
                    ]
                    for x in rat
                ],
            ),
            "",
        ]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        parts += ["## Failures", ""]
        parts += [f"- `{r['case_id']}`: {r['error']}" for r in failed] + [""]
    return "\n".join(parts)


def plot_memory_vs_throughput(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") != "failed"]
    panels = sorted({(r["model"], r["device"], r["dtype"], r["seq_len"], r["batch_size"], r["variant"]) for r in ok})
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    colors = {"lora": "tab:blue", "qlora": "tab:orange", "full": "tab:green"}
    markers = {"npu-ft": "o", "reference": "s"}
    for ax, panel in zip(axes[0], panels, strict=False):
        for r in ok:
            if (r["model"], r["device"], r["dtype"], r["seq_len"], r["batch_size"], r["variant"]) != panel:
                continue
            x, y = r["tokens_per_s"], r["peak_mem_bytes"] / 2**20
            ax.errorbar(
                x,
                y,
                xerr=[[x - r["tokens_per_s_min"]], [r["tokens_per_s_max"] - x]],
                fmt=markers.get(r["implementation"], "^"),
                color=colors.get(r["method"], "gray"),
                markersize=8,
                capsize=3,
            )
            ax.annotate(
                f"{r['method']}/{r['implementation']}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8
            )
        model, dev, dt, s, b, v = panel
        ax.set_title(f"{model} on {dev}, {dt}, seq {s} × batch {b}", fontsize=9)
        ax.set_xlabel("tokens/s (median, bars: min-max)")
        ax.set_ylabel("peak memory of training (MiB)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curves(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") != "failed"]
    panels = sorted({(r["model"], r["method"], r["dtype"], r["seq_len"], r["batch_size"], r["variant"]) for r in ok})
    n = max(1, len(panels))
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    styles = {"npu-ft": dict(linestyle="-", marker="o"), "reference": dict(linestyle="--", marker="x")}
    for ax, panel in zip(axes.flat, panels, strict=False):
        for r in ok:
            if (r["model"], r["method"], r["dtype"], r["seq_len"], r["batch_size"], r["variant"]) != panel:
                continue
            losses = json.loads(r["losses"])
            ax.plot(
                range(len(losses)),
                losses,
                label=f"{r['implementation']} ({r['device']})",
                markersize=4,
                **styles.get(r["implementation"], dict(linestyle=":", marker=".")),
            )
        model, method, dt, s, b, v = panel
        ax.set_title(f"{model} {method} {dt} seq {s}×{b}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_csv(records: list[dict], columns: list[str] | None, path: Path) -> None:
    import pandas as pd

    df = pd.DataFrame.from_records(records)
    if columns is not None:
        for c in columns:
            if c not in df.columns:
                df[c] = ""
        df = df[columns]
    df.to_csv(path, index=False)


def suite_meta(suite) -> dict:
    """What the reports need to know about a Suite (saved as suite.json)."""
    return {
        "name": suite.name,
        "description": suite.description,
        "path": suite.path,
        "repeats": suite.repeats,
        "tolerances": suite.tolerances,
        "cross_device_tolerance": suite.cross_device_tolerance,
    }


def write_reports(results: list[dict], suite, out_dir: str | Path, env: dict | None = None) -> dict:
    """Write every report file from raw ``results``; ``suite`` is a Suite or its saved meta dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = suite if isinstance(suite, dict) else suite_meta(suite)
    (out / "suite.json").write_text(json.dumps(meta, indent=2))
    rows = aggregate(results)
    par = parity(rows, meta["tolerances"], meta["cross_device_tolerance"])
    rat = ratios(rows)
    _write_csv(rows, COLUMNS + ["variant"], out / "results.csv")
    _write_csv(par, None, out / "parity.csv")
    _write_csv(rat, None, out / "ratios.csv")
    (out / "report.md").write_text(markdown(rows, par, rat, meta, env))
    if any(r.get("status") != "failed" for r in rows):
        plot_memory_vs_throughput(rows, out / "memory_vs_throughput.png")
        plot_loss_curves(rows, out / "loss_curves.png")
    return {"rows": rows, "parity": par, "ratios": rat}


def regenerate(out_dir: str | Path) -> dict:
    """Rebuild the reports of a finished run from its ``raw.jsonl`` and ``suite.json``."""
    out = Path(out_dir)
    meta = json.loads((out / "suite.json").read_text())
    return write_reports(load_raw(out / "raw.jsonl"), meta, out)
