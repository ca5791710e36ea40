"""Reports from raw results: a CSV row per case, parity, ratios, frontiers, Markdown and PNG plots.

Files written to the output folder::

    raw.jsonl                 one JSON result per case per repeat (written by the runner)
    suite.json                the suite's name, tolerances and cases (for `npu-ft bench report`)
    results.csv               one row per case (medians over repeats, see COLUMNS)
    parity.csv                loss parity: every implementation vs reference, and across devices
    ratios.csv                each implementation / the baselines (tokens/s, training and absolute
                              peak memory), npu-ft QLoRA / LoRA; flagged when not significant
    frontier.csv              per baseline point: npu-ft's best tokens/s at <= memory, least memory at >= tokens/s
    report.md                 all of the above as Markdown, with the environment
    memory_vs_throughput.png  tokens/s against training memory, frontiers drawn (npu_ft.bench.plots)
    loss_curves.png           overlaid loss curves and their relative difference to reference
    methods.png               suites that compare methods (adapter / optim): tokens/s against absolute
                              and training memory, a labelled point per method and implementation
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .frontier import BASELINES, fused_kernels_off, method_label, statements
from .measure import tensor_increment

#: every file a run writes into its --out folder (the module docstring says what each holds)
RUN_FILES = ("raw.jsonl", "suite.json", "results.csv", "parity.csv", "ratios.csv", "frontier.csv", "report.md",
             "memory_vs_throughput.png", "loss_curves.png", "methods.png")

#: results.csv columns, in order
COLUMNS = [
    "suite", "case_id", "model", "method", "implementation", "device", "device_name", "dtype", "seq_len",
    "batch_size", "steps", "warmup", "repeats_ok", "repeats_failed", "gradient_checkpointing", "checkpoint_policy",
    "policy", "fused_kernels", "data", "lora_r", "adapter", "optim", "method_name",
    "status", "error",
    "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "labelled_tokens_per_s", "positions_per_s",
    "timed_steps", "s_per_step_median", "s_per_step_min", "s_per_step_max",
    "train_mem_bytes", "train_mem_mib", "train_mem_min_bytes", "train_mem_max_bytes",
    "peak_mem_bytes", "peak_mem_mib", "peak_mem_max_bytes", "mem_kind", "baseline_mem_bytes",
    "tensor_mem_bytes", "tensor_mem_mib",
    "model_flops_per_token", "achieved_flops", "gemm_peak_flops", "gemm_peak_process_flops", "mfu",
    "spec_peak_flops",
    "trainable_params", "total_params", "weight_bytes", "weight_mib", "optimizer_state_bytes", "loss_first",
    "loss_last",
    "loss_repeat_spread", "losses", "features", "build_s",
    "torch", "torch_npu", "transformers", "peft", "bitsandbytes", "git_commit",
]
#: columns that may be empty on an ok row
#: (optimizer_state_bytes: not from LLaMA-Factory's lanes; tensor_mem_*: only with the suite's memory_probe)
MAY_BE_EMPTY = {"error", "spec_peak_flops", "optimizer_state_bytes", "tensor_mem_bytes", "tensor_mem_mib"}
_CASE_KEYS = ("suite", "case_id", "model", "method", "implementation", "device", "dtype", "seq_len",
              "batch_size", "steps", "warmup", "gradient_checkpointing", "checkpoint_policy")
#: fewer timed steps than this (over all repeats) make a ratio "not significant"
MIN_TIMED_STEPS = 3


def load_raw(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _case_view(case: dict):
    from .suite import BenchCase

    return BenchCase.from_dict(case)


def _step_rates(run: dict, warmup: int, counts_key: str, fallback: int) -> list[float]:
    times = run["step_s"][warmup:]
    counts = run.get(counts_key, [fallback] * len(run["step_s"]))[warmup:]
    return [c / t for c, t in zip(counts, times, strict=True)]


def aggregate(results: list[dict]) -> list[dict]:
    """One row per case: per-step rates pooled over the ok repeats (median, min, max); memory the
    median over repeats (with min/max); losses from the first ok repeat; the live-tensor increment
    from the case's memory probe, if it ran (``memory_probe`` in :mod:`npu_ft.bench.runner`)."""
    by_case: dict[str, list[dict]] = {}
    probes: dict[str, dict] = {}
    for r in results:
        if r.get("memory_probe"):
            probes[r["case"]["case_id"]] = r
        else:
            by_case.setdefault(r["case"]["case_id"], []).append(r)
    rows = []
    for case_id, runs in by_case.items():
        case = runs[0]["case"]
        view = _case_view(case)
        row = {k: case.get(k) for k in _CASE_KEYS}
        row.update(variant=case.get("variant", 0), policy=view.policy, fused_kernels=view.fused_kernels,
                   data=view.data_tag, adapter=view.adapter, optim=view.optim, method_name=view.method_name,
                   parity_key=json.dumps(view.parity_group))
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
        w = case["warmup"]
        tokens = case["batch_size"] * case["seq_len"]
        timed = [t for r in ok for t in r["step_s"][w:]]
        tok = [x for r in ok for x in _step_rates(r, w, "step_tokens", tokens)]
        row.update(
            timed_steps=len(timed), s_per_step_median=statistics.median(timed), s_per_step_min=min(timed),
            s_per_step_max=max(timed), tokens_per_s=statistics.median(tok), tokens_per_s_min=min(tok),
            tokens_per_s_max=max(tok),
            labelled_tokens_per_s=statistics.median(x for r in ok for x in _step_rates(r, w, "step_labelled", tokens)),
            positions_per_s=statistics.median(x for r in ok for x in _step_rates(r, w, "step_positions", tokens)),
        )
        peaks = [r["peak_mem_bytes"] for r in ok]
        train = [r["peak_mem_bytes"] - r["baseline_mem_bytes"] for r in ok]
        row.update(
            peak_mem_bytes=int(statistics.median(peaks)), peak_mem_max_bytes=int(max(peaks)),
            train_mem_bytes=int(statistics.median(train)), train_mem_min_bytes=int(min(train)),
            train_mem_max_bytes=int(max(train)),
            baseline_mem_bytes=int(statistics.median(r["baseline_mem_bytes"] for r in ok)), mem_kind=first["mem_kind"],
        )
        row["peak_mem_mib"] = round(row["peak_mem_bytes"] / 2**20, 1)
        probe = probes.get(case_id)
        if probe is not None and probe.get("status") == "ok" and "file_rss_growth_bytes" in probe:
            row["tensor_mem_bytes"] = tensor_increment(probe)
            row["tensor_mem_mib"] = round(row["tensor_mem_bytes"] / 2**20, 1)
        row["train_mem_mib"] = round(row["train_mem_bytes"] / 2**20, 1)
        for k in ("model_flops_per_token", "gemm_peak_flops", "spec_peak_flops"):
            row[k] = first.get(k)
        if all(r.get("achieved_flops") for r in ok):
            row["achieved_flops"] = statistics.median(r["achieved_flops"] for r in ok)
            row["gemm_peak_flops"] = statistics.median(r["gemm_peak_flops"] for r in ok)
            row["mfu"] = row["achieved_flops"] / row["gemm_peak_flops"]
        for k in ("trainable_params", "total_params", "weight_bytes"):
            row[k] = first[k]
        row["optimizer_state_bytes"] = first.get("optimizer_state_bytes")
        row["weight_mib"] = round(first["weight_bytes"] / 2**20, 1)
        losses = first["losses"]
        row["losses"] = json.dumps([round(x, 7) for x in losses])
        row["loss_first"], row["loss_last"] = losses[0], losses[-1]
        row["loss_repeat_spread"] = max(
            (abs(a - b) for r in ok for a, b in zip(r["losses"], losses, strict=False)), default=0.0)
        row["features"] = "+".join(first.get("features", []))
        row["build_s"] = round(statistics.median(r["build_s"] for r in ok), 2)
        rows.append(row)
    _run_wide_gemm_peak(rows)
    return rows


def _run_wide_gemm_peak(rows: list[dict]) -> None:
    """MFU against the highest GEMM peak measured in the run at the same shape (model, device, dtype,
    positions per step). Each process times the GEMMs once, after its training; under load one such
    measurement can come out at half the others (the 0.5B frontier run saw 73 vs 176 GFLOP/s), and a
    low peak flatters MFU past 100 %. The row keeps its own process's figure as gemm_peak_process_flops."""

    def shape(r: dict) -> tuple:
        return r["model"], r["device"], r["dtype"], r["seq_len"] * r["batch_size"]

    measured = [r for r in rows if r.get("gemm_peak_flops")]
    best: dict[tuple, float] = {}
    for r in measured:
        best[shape(r)] = max(best.get(shape(r), 0.0), r["gemm_peak_flops"])
    for r in measured:
        r["gemm_peak_process_flops"] = r["gemm_peak_flops"]
        r["gemm_peak_flops"] = best[shape(r)]
        if r.get("achieved_flops"):
            r["mfu"] = r["achieved_flops"] / r["gemm_peak_flops"]


def rel_diffs(a: list[float], b: list[float]) -> list[float]:
    """Per step ``|a - b| / |b|`` over the common steps."""
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=False)]


def _rel_diff(a: list[float], b: list[float]) -> float:
    d = rel_diffs(a, b)
    return max(d) if d else math.nan


def _ok_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") in ("ok", "partial")]


def _partner(candidates: list[dict], row: dict) -> dict | None:
    """The baseline row to compare ``row`` with: its default checkpointing ("full"), else the same
    policy as ``row``, else any."""
    for want in ("full", row.get("policy")):
        for c in candidates:
            if c.get("policy") == want:
                return c
    return candidates[0] if candidates else None


def parity(rows: list[dict], tolerances: dict, cross_device: dict) -> list[dict]:
    """Loss parity: every implementation (each checkpointing policy) against ``reference`` with the
    same numerics on the same device; and each implementation on each device against the same
    implementation on the first device listed."""
    out = []
    groups: dict[str, list[dict]] = {}
    for r in _ok_rows(rows):
        groups.setdefault(r.get("parity_key") or r["case_id"], []).append(r)
    for members in groups.values():
        m0 = members[0]
        g = {k: m0[k] for k in ("model", "method", "dtype", "seq_len", "batch_size")} | {
            "data": m0.get("data"), "method_name": method_label(m0)}
        tol = float(tolerances[g["dtype"]][g["method"]])
        devices = list(dict.fromkeys(r["device"] for r in members))
        for dev in devices:
            on_dev = [r for r in members if r["device"] == dev]
            ref = _partner([r for r in on_dev if r["implementation"] == "reference"], {})
            if ref is None:
                continue
            for r in on_dev:
                if r is ref:
                    continue
                d = _rel_diff(json.loads(r["losses"]), json.loads(ref["losses"]))
                out.append({**g, "kind": "implementation", "compare": f"{_label(r)} vs {_label(ref)}", "device": dev,
                            "max_rel_loss_diff": d, "tolerance": tol, "pass": bool(d <= tol)})
        if len(devices) > 1:
            tol_x = float(cross_device[g["dtype"]])
            for r in members:
                if r["device"] == devices[0]:
                    continue
                base = next((b for b in members if b["device"] == devices[0] and b["implementation"]
                             == r["implementation"] and b.get("policy") == r.get("policy")
                             and b.get("fused_kernels") == r.get("fused_kernels")), None)
                if base is None:
                    continue
                d = _rel_diff(json.loads(r["losses"]), json.loads(base["losses"]))
                out.append({**g, "kind": "device", "compare": f"{_label(r)}: {r['device']} vs {devices[0]}",
                            "device": r["device"], "max_rel_loss_diff": d, "tolerance": tol_x,
                            "pass": bool(d <= tol_x)})
    return out


def _label(row: dict) -> str:
    """"npu-ft (selective)": the implementation and the checkpointing it ran (", no fused kernels"
    when it ran without npu-ft's fused decoder-block ops)."""
    fused = ", no fused kernels" if fused_kernels_off(row) else ""
    return f"{row['implementation']} ({row.get('policy') or _gc_cell(row)}{fused})"


def _gc_cell(row: dict) -> str:
    """The markdown "gc" cell: off, or the checkpointing policy that ran."""
    if row.get("policy"):
        return row["policy"]
    if not row.get("gradient_checkpointing"):
        return "off"
    return row.get("checkpoint_policy") or "full"


def significance(a: dict, b: dict) -> str:
    """"" when the ratio a / b stands; else why it is not significant (tokens/s min-max ranges that
    overlap, fewer than MIN_TIMED_STEPS timed steps, training-memory ranges over repeats that overlap)."""
    why = []
    if min(a.get("timed_steps") or 0, b.get("timed_steps") or 0) < MIN_TIMED_STEPS:
        why.append(f"< {MIN_TIMED_STEPS} timed steps")
    if a["tokens_per_s_min"] <= b["tokens_per_s_max"] and b["tokens_per_s_min"] <= a["tokens_per_s_max"]:
        why.append("tokens/s ranges overlap")
    return "; ".join(why)


def _memory_significance(a: dict, b: dict) -> str:
    if min(a.get("repeats_ok", 0), b.get("repeats_ok", 0)) < 2:
        return ""
    if a["train_mem_min_bytes"] <= b["train_mem_max_bytes"] and b["train_mem_min_bytes"] <= a["train_mem_max_bytes"]:
        return "memory ranges overlap"
    return ""


def _ratio(r: dict, base: dict, name: str) -> dict:
    def div(x, y):
        return x / y if x is not None and y else math.nan

    return {
        "model": r["model"], "device": r["device"], "dtype": r["dtype"], "data": r.get("data"),
        "seq_len": r["seq_len"], "batch_size": r["batch_size"], "ratio": name,
        "tokens_per_s": div(r["tokens_per_s"], base["tokens_per_s"]),
        "tokens_per_s_range": (div(r["tokens_per_s_min"], base["tokens_per_s_max"]),
                               div(r["tokens_per_s_max"], base["tokens_per_s_min"])),
        "train_mem": div(r.get("train_mem_bytes"), base.get("train_mem_bytes")),
        "tensor_mem": div(r.get("tensor_mem_bytes"), base.get("tensor_mem_bytes")),
        "peak_mem": div(r["peak_mem_bytes"], base["peak_mem_bytes"]),
        "weight_bytes": div(r["weight_bytes"], base["weight_bytes"]),
        "optimizer_state": div(r.get("optimizer_state_bytes") or None, base.get("optimizer_state_bytes") or None),
        "significance": significance(r, base), "memory_significance": _memory_significance(r, base),
    }


def ratios(rows: list[dict]) -> list[dict]:
    """Every implementation / each baseline (llamafactory, reference) with the same numerics and
    device (the baseline at its default checkpointing, full), npu-ft's methods / their baseline
    (QLoRA, DoRA, ... / LoRA), and a case with the fused decoder-block ops / its twin without them."""
    ok = _ok_rows(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r.get("parity_key") or r["case_id"], r["device"]), []).append(r)
    out = []
    for members in groups.values():
        for base_name in BASELINES:
            base = _partner([r for r in members if r["implementation"] == base_name], {})
            if base is None:
                continue
            for r in members:
                if r["implementation"] in BASELINES:
                    continue
                out.append(_ratio(r, base, f"{method_label(r)}: {_label(r)} / {_label(base)}"))
    for r in ok:
        if r["implementation"] != "npu-ft":
            continue
        name, base_name = method_label(r), _method_baseline(r)
        if name == base_name:
            continue
        bases = [x for x in ok if x["implementation"] == "npu-ft" and method_label(x) == base_name
                 and all(x.get(k) == r.get(k) for k in ("model", "device", "dtype", "seq_len", "batch_size", "data"))]
        base = _same_policy(bases, r)
        if base is not None:
            out.append(_ratio(r, base, f"npu-ft: {name} ({r.get('policy')}) / {base_name} ({base.get('policy')})"))
    return out + _fused_ratios(ok)


#: what must match for two rows to differ only in npu-ft's fused decoder-block ops
_SAME_BUT_FUSED = ("implementation", "model", "device", "dtype", "seq_len", "batch_size", "data", "policy",
                   "method_name", "lora_r")


def _fused_ratios(ok: list[dict]) -> list[dict]:
    """Each case with npu-ft's fused decoder-block ops over its twin without them (issue 14's pair)."""
    out = []
    for r in ok:
        if fused_kernels_off(r):
            continue
        twin = next((x for x in ok if fused_kernels_off(x) and all(x.get(k) == r.get(k) for k in _SAME_BUT_FUSED)),
                    None)
        if twin is not None:
            out.append(_ratio(r, twin, f"{method_label(r)}: {r['implementation']} ({r.get('policy')}): fused block "
                                       "ops / without"))
    return out


def _same_policy(candidates: list[dict], row: dict) -> dict | None:
    """The candidate that ran ``row``'s checkpointing policy, else the first one (None if none)."""
    return next((c for c in candidates if c.get("policy") == row.get("policy")), candidates[0] if candidates else None)


def _method_baseline(row: dict) -> str:
    """What a method is compared with inside npu-ft: full fine-tuning with torch's AdamW for full, plain
    LoRA for every adapter method (QLoRA included)."""
    return "full" if row["method"] == "full" else "lora"


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


def _mib(v) -> str:
    return "" if v is None else f"{v / 2**20:,.0f}"


def _state_mib(v) -> str:
    """Optimizer-state MiB, with a decimal below 100 MiB (VeRA's states are a few MiB)."""
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v / 2**20:.1f}" if v < 100 * 2**20 else _mib(v)


def _pct(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f} %"


def _si(v) -> str:
    """1.23e11 -> "123 G" (FLOPs, FLOP/s)."""
    if not v:
        return ""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g} {prefix}"
    return f"{v:.3g}"


def _cases_table(rows: list[dict]) -> str:
    probed = any(r.get("tensor_mem_bytes") for r in rows)  # the suite ran the memory probe
    header = ["model", "method", "impl", "device", "dtype", "data", "seq×batch", "gc", "status",
              "tokens/s [min-max]", "labelled tok/s", "s/step", "train MiB", *(["live tensors MiB"] if probed else []),
              "peak MiB (abs)", "weights MiB", "MFU", "loss first→last"]
    body = []
    for r in rows:
        impl = r["implementation"] + (", no fused kernels" if fused_kernels_off(r) else "")
        head = [r["model"], method_label(r), impl, r["device"], r["dtype"], r.get("data", ""),
                f"{r['seq_len']}×{r['batch_size']}", _gc_cell(r)]
        if r["status"] == "failed":
            body.append(head + ["FAILED", r["error"][:160]] + [""] * (len(header) - len(head) - 2))
            continue
        body.append(head + [
            r["status"], f"{r['tokens_per_s']:.1f} [{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}]",
            f"{r['labelled_tokens_per_s']:.1f}", r["s_per_step_median"], _mib(r["train_mem_bytes"]),
            *([_mib(r.get("tensor_mem_bytes") or None)] if probed else []),
            _mib(r["peak_mem_bytes"]), r["weight_mib"], _pct(r.get("mfu")),
            f"{r['loss_first']:.4f}→{r['loss_last']:.4f}"])
    return _md_table(header, body)


def _mfu_table(rows: list[dict]) -> str:
    body = []
    for r in _ok_rows(rows):
        spec = r.get("spec_peak_flops")
        body.append([r["model"], method_label(r), _label(r), f"{r['seq_len']}×{r['batch_size']}", r.get("data", ""),
                     _si(r.get("model_flops_per_token")), _si(r.get("achieved_flops")),
                     _si(r.get("gemm_peak_flops")), _pct(r.get("mfu")),
                     f"{spec / 1e12:g} T ({_pct(r['achieved_flops'] / spec)})" if spec else "unknown"])
    return _md_table(["model", "method", "impl (gc)", "seq×batch", "data", "model FLOP/token", "achieved FLOP/s",
                      "GEMM peak FLOP/s (run's best)", "MFU", "spec-sheet peak FLOP/s (MFU)"], body)


def _times(v: float) -> str:
    """1.234 -> "1.23×"; nothing for a ratio that could not be formed."""
    return "" if v is None or math.isnan(v) else f"{v:.2f}×"


def _ratios_table(rat: list[dict]) -> str:
    probed = any(not math.isnan(x.get("tensor_mem", math.nan)) for x in rat)
    body = []
    for x in rat:
        lo, hi = x["tokens_per_s_range"]
        flag = "; ".join(f for f in (x["significance"], x["memory_significance"]) if f)
        body.append([x["model"], x["device"], x.get("data", ""), f"{x['seq_len']}×{x['batch_size']}", x["ratio"],
                     f"{x['tokens_per_s']:.2f}× [{lo:.2f}-{hi:.2f}]", f"{x['train_mem']:.2f}×",
                     *([_times(x.get("tensor_mem", math.nan))] if probed else []),
                     f"{x['peak_mem']:.2f}×", f"{x['weight_bytes']:.2f}×",
                     _times(x.get("optimizer_state", math.nan)),
                     f"not significant ({flag})" if flag else "yes"])
    return _md_table(["model", "device", "data", "seq×batch", "ratio", "tokens/s [range]", "training memory",
                      *(["live tensors (memory probe)"] if probed else []),
                      "peak memory (abs)", "weight bytes", "optimizer state", "significant"], body)


def _has_methods(rows: list[dict]) -> bool:
    """Whether the suite compares LoRA-family methods or optimizers (adapter / optim settings)."""
    return any(r.get("adapter", "lora") != "lora" or r.get("optim", "adamw_torch") != "adamw_torch"
               for r in _ok_rows(rows))


def _methods_table(rows: list[dict]) -> str:
    """Every method as one row: what trains, what its optimizer keeps, tokens/s and memory, and the
    same against npu-ft's plain LoRA (same checkpointing policy where there is one)."""
    ok = _ok_rows(rows)
    loras = [r for r in ok if r["implementation"] == "npu-ft" and method_label(r) == "lora"]
    probed = any(r.get("tensor_mem_bytes") for r in ok)
    body = []
    for r in ok:
        lora = _same_policy(loras, r)

        def vs(key: str, row=r, lora=lora) -> str:
            return f"{row[key] / lora[key]:.2f}×" if lora is not None and lora.get(key) and row.get(key) else ""

        state = r.get("optimizer_state_bytes")
        body.append([method_label(r), _label(r), f"{r['trainable_params'] / 1e6:,.2f} M", vs("trainable_params"),
                     _state_mib(state),
                     f"{r['tokens_per_s']:.1f} [{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}]",
                     vs("tokens_per_s"), _mib(r["train_mem_bytes"]), vs("train_mem_bytes"),
                     *([_mib(r.get("tensor_mem_bytes")), vs("tensor_mem_bytes")] if probed else []),
                     _mib(r["peak_mem_bytes"]), vs("peak_mem_bytes"), f"{r['loss_first']:.4f}→{r['loss_last']:.4f}"])
    return _md_table(["method", "impl (gc)", "trainable params", "vs LoRA", "optimizer state MiB", "tokens/s [min-max]",
                      "vs LoRA", "train MiB", "vs LoRA", *(["live tensors MiB", "vs LoRA"] if probed else []),
                      "peak MiB (abs)", "vs LoRA", "loss first→last"], body)


def _frontier_table(front: list[dict]) -> str:
    body = []
    for f in front:
        best = (f"{f['best_at_mem_point']}: {f['best_at_mem_tokens_per_s']:.1f} ({f['best_at_mem_speedup']:.2f}×)"
                if f["best_at_mem_point"] else "none at this memory")
        lean = (f"{f['least_mem_point']}: {_mib(f['least_mem_train_mem_bytes'])} MiB ({f['least_mem_ratio']:.2f}×)"
                if f["least_mem_point"] else "none this fast")
        body.append([f["method"], f.get("data", ""), f["challenger"], f"{f['baseline']} {f['baseline_point']}"
                     + (" *" if f["on_baseline_frontier"] else ""), f"{f['baseline_tokens_per_s']:.1f}",
                     _mib(f["baseline_train_mem_bytes"]), best, lean, "yes" if f["at_or_above"] else "NO"])
    return _md_table(["method", "data", "impl", "baseline point (* on its frontier)", "baseline tok/s",
                      "baseline train MiB", "best tok/s at <= its memory", "least train MiB at >= its tok/s",
                      "at or above"], body)


def markdown(rows, par, rat, suite_meta: dict, env: dict | None = None, front: list[dict] | None = None) -> str:
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
        "- tokens/s: example tokens (no padding) per second, median of the per-step rates over all timed steps "
        "of all repeats [min-max]; labelled tok/s: loss targets per second",
        "- train MiB: training-phase peak minus the memory after the model was built (median over repeats); "
        "peak MiB (abs): the training-phase peak itself (CPU: resident-set high-water mark, reset after the "
        "model is built)",
        "- MFU: model FLOPs per second (forward and the gradients the method needs, no recomputation) over the "
        "GEMM peak at the model's linear shapes: the highest one measured in this run (each case's process times "
        "it after training; its own figure is in results.csv as gemm_peak_process_flops)",
        f"- a ratio is **not significant** when the two min-max ranges overlap or either side has fewer than "
        f"{MIN_TIMED_STEPS} timed steps",
        "",
    ]
    parts += ["## Cases", "", _cases_table(rows), ""]
    if _has_methods(rows):
        parts += ["## Methods", "", "Every method's point of methods.png (tokens/s against absolute peak and training "
                  "memory); \"vs LoRA\": against npu-ft's plain LoRA with the same checkpointing policy.", "",
                  _methods_table(rows), ""]
    if any(r.get("tensor_mem_bytes") for r in _ok_rows(rows)):
        parts += ["Live tensors: the training increment of the suite's memory probe (one more process per CPU case "
                  "with glibc's mmap threshold fixed, so freed tensors leave the resident set at once, and without "
                  "the library pages it mapped): the live tensors plus the runtime, what an accelerator's allocator "
                  "reports. Training memory: the resident set of the timed repeats, glibc's retained heap "
                  "included.", ""]
    if rat:
        parts += ["## Ratios", "", _ratios_table(rat), ""]
    if front:
        parts += ["## Frontiers", "",
                  "Tokens/s against training memory per implementation (memory_vs_throughput.png). At each "
                  "baseline point: the challenger's best tokens/s at equal or lower training memory, and its "
                  "lowest training memory at equal or higher tokens/s.", "", _frontier_table(front), ""]
    if any(r.get("mfu") for r in _ok_rows(rows)):
        parts += ["## Distance to the limit (MFU)", "", _mfu_table(rows), ""]
    if par:
        parts += ["## Loss parity", ""]
        parts += [
            _md_table(
                ["model", "method", "dtype", "data", "seq×batch", "compare", "max rel loss diff", "tolerance", "pass"],
                [[p["model"], p["method_name"], p["dtype"], p.get("data", ""),
                  f"{p['seq_len']}×{p['batch_size']}",
                  p["compare"], f"{p['max_rel_loss_diff']:.2e}", f"{p['tolerance']:.0e}",
                  "PASS" if p["pass"] else "FAIL"] for p in par],
            ),
            "",
        ]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        parts += ["## Failures", ""]
        parts += [f"- `{r['case_id']}`: {r['error']}" for r in failed] + [""]
    return "\n".join(parts)


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
    from .plots import plot_loss_curves, plot_memory_vs_throughput, plot_methods

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = suite if isinstance(suite, dict) else suite_meta(suite)
    (out / "suite.json").write_text(json.dumps(meta, indent=2))
    rows = aggregate(results)
    par = parity(rows, meta["tolerances"], meta["cross_device_tolerance"])
    rat = ratios(rows)
    front = statements(rows)
    _write_csv(rows, COLUMNS + ["variant", "parity_key"], out / "results.csv")
    _write_csv(par, None, out / "parity.csv")
    _write_csv(rat, None, out / "ratios.csv")
    _write_csv(front, None, out / "frontier.csv")
    (out / "report.md").write_text(markdown(rows, par, rat, meta, env, front))
    if any(r.get("status") != "failed" for r in rows):
        plot_memory_vs_throughput(rows, out / "memory_vs_throughput.png")
        plot_loss_curves(rows, out / "loss_curves.png")
        if _has_methods(rows):
            plot_methods(rows, out / "methods.png")
    return {"rows": rows, "parity": par, "ratios": rat, "frontier": front}


def regenerate(out_dir: str | Path) -> dict:
    """Rebuild the reports of a finished run from its ``raw.jsonl`` and ``suite.json``."""
    out = Path(out_dir)
    meta = json.loads((out / "suite.json").read_text())
    return write_reports(load_raw(out / "raw.jsonl"), meta, out)
