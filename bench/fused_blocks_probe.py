"""npu-ft with and without the fused decoder-block ops (rms_norm, rope, swiglu), side by side: the
measurement behind docs/benchmarks.md "Fused decoder-block ops".

    python bench/fused_blocks_probe.py                                  # 0.5B shape, 1024 tokens, 3 repeats
    python bench/fused_blocks_probe.py --layers 2 --seq 256 --repeats 1 --steps 1   # a quick look
    python bench/fused_blocks_probe.py --json out.json                  # also the raw results

Each (case, variant) runs in a fresh process through the bench harness's worker
(``npu_ft.bench.worker``: build -> trim the heap -> reset the peak -> warm-up + timed steps ->
peak), so both variants see the same machine load: repeats are interleaved, and the order of the
two variants alternates from one repeat to the next. Per (case, variant) the probe reports the
median over repeats of tokens/s (each the median of its timed steps) and of the training-phase
peak increment (resident-set high-water mark above the post-build baseline), then the ratios
fused / unfused.

Cases (npu-ft's LoRA r=16 on every linear, fused linear cross-entropy, fp32, CPU):
``lora-selective`` (selective checkpointing), ``lora-full`` (full checkpointing), ``full``
(full fine-tuning, full checkpointing). Variant ``fused`` is the harness's ``npu-ft`` implementation
with ``fused_kernels: true`` (its default: ``apply_fused_kernels`` before checkpointing, as run_sft),
``unfused`` the same with ``fused_kernels: false``. The Ascend suites run the same pair
(bench/suites/ascend-*.yaml); this probe stays for its CPU side-by-side table with the targets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

CASES = {
    "lora-selective": dict(method="lora", checkpoint_policy="selective"),
    "lora-full": dict(method="lora", checkpoint_policy="full"),
    "full": dict(method="full", checkpoint_policy="full"),
}
#: target ratios fused / unfused (issue 14): (tokens/s at least, peak increment at most)
TARGETS = {"lora-selective": (1.08, 0.85), "lora-full": (1.05, 1.0), "full": (1.05, 1.0)}


def make_case(name: str, variant: str, args):
    from npu_ft.bench.suite import BenchCase

    return BenchCase(
        suite="fused-blocks-probe", model=args.model, method=CASES[name]["method"],
        implementation="npu-ft", fused_kernels=variant == "fused", device="cpu", dtype="float32",
        seq_len=args.seq, batch_size=1, steps=args.steps, warmup=args.warmup, gradient_checkpointing=True,
        checkpoint_policy=CASES[name]["checkpoint_policy"],
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all"},
        model_overrides={"num_hidden_layers": args.layers} if args.layers else {}, timeout_s=args.timeout,
    )


def summarize(results: list[dict]) -> list[dict]:
    """Per case: medians per variant and the ratios fused / unfused."""
    rows = []
    for name in CASES:
        per = {}
        for variant in ("unfused", "fused"):
            ok = [r for r in results if r["probe_case"] == name and r["variant"] == variant and r["status"] == "ok"]
            if not ok:
                continue
            per[variant] = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
                "peak_increment_mib": statistics.median(
                    (r["peak_mem_bytes"] - r["baseline_mem_bytes"]) / 2**20 for r in ok),
                "losses": ok[0]["losses"],
                "repeats": len(ok),
            }
        if len(per) < 2:
            continue
        tok = per["fused"]["tokens_per_s"] / per["unfused"]["tokens_per_s"]
        mem = per["fused"]["peak_increment_mib"] / per["unfused"]["peak_increment_mib"]
        loss_rel = max(abs(a - b) / abs(a) for a, b in zip(per["unfused"]["losses"], per["fused"]["losses"],
                                                           strict=True))
        rows.append({"case": name, **{f"{v}_{k}": val for v in per for k, val in per[v].items() if k != "losses"},
                     "tokens_per_s_ratio": tok, "peak_increment_ratio": mem, "max_rel_loss_diff": loss_rel,
                     "target_tokens_per_s": TARGETS[name][0], "target_peak": TARGETS[name][1]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| case | tokens/s unfused | tokens/s fused | ratio (target) | peak increment MiB unfused | fused | "
             "ratio (target) | max rel loss diff |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['unfused_tokens_per_s']:.1f} | {r['fused_tokens_per_s']:.1f} | "
            f"{r['tokens_per_s_ratio']:.3f}× (≥ {r['target_tokens_per_s']}) | {r['unfused_peak_increment_mib']:.0f} | "
            f"{r['fused_peak_increment_mib']:.0f} | {r['peak_increment_ratio']:.3f}× (≤ {r['target_peak']}) | "
            f"{r['max_rel_loss_diff']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a preset of npu_ft.bench.shapes")
    parser.add_argument("--layers", type=int, default=0, help="fewer decoder layers (0: the model's own)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per step (batch 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of " + ", ".join(CASES))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process (catches hangs)")
    parser.add_argument("--json", help="write the raw results and the summary here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)} (expected {', '.join(CASES)})")

    from npu_ft.bench.runner import run_case_subprocess

    results = []
    for repeat in range(args.repeats):
        for name in names:
            order = ("unfused", "fused") if (repeat + names.index(name)) % 2 == 0 else ("fused", "unfused")
            for variant in order:
                result = run_case_subprocess(make_case(name, variant, args), repeat=repeat)
                result.update(probe_case=name, variant=variant)
                status = result["status"] if result["status"] == "ok" else f"FAILED {result.get('error', '')}"
                print(f"repeat {repeat} {name} {variant}: {status} "
                      f"{result.get('tokens_per_s', float('nan')):.2f} tokens/s", file=sys.stderr, flush=True)
                results.append(result)
    rows = summarize(results)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": rows, "results": results}, f, indent=1)
    return 0 if rows and all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
