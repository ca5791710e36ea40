"""Training-phase RSS growth and step time of one bench case under glibc's default malloc, or with
its mmap threshold pinned (every allocation above it is mapped fresh and returned on free).

    python bench/malloc_probe.py SUITE.yaml CASE_ID_SUBSTRING [--checkpoint-policy full|selective]
                                 [--mmap-threshold BYTES]

Runs the case in this process through the bench worker (same build, loop and measurement as
``npu-ft bench``); run it once per setting, in fresh processes, on an idle box.
"""

from __future__ import annotations

import argparse
import sys

from npu_ft.modules.checkpointing import POLICIES


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("suite")
    p.add_argument("case")
    p.add_argument("--checkpoint-policy", choices=POLICIES, default=None)
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="pin glibc's mmap (and trim) threshold to BYTES; default: glibc's dynamic one")
    args = p.parse_args(argv)
    from npu_ft.bench import load_suite
    from npu_ft.bench.worker import run_case
    from npu_ft.device.cpu import tune_glibc_malloc

    (case,) = [c for c in load_suite(args.suite).cases if args.case in c.case_id][:1]
    if args.checkpoint_policy:
        case.checkpoint_policy = args.checkpoint_policy
    if args.mmap_threshold is not None and not tune_glibc_malloc(args.mmap_threshold, args.mmap_threshold, 0):
        print("not glibc: the threshold cannot be set", file=sys.stderr)
        return 1
    r = run_case(case)
    growth = (r["peak_mem_bytes"] - r["baseline_mem_bytes"]) / 2**20
    print(f"{case.case_id} mmap_threshold={args.mmap_threshold or 'glibc default'}: "
          f"RSS growth in training {growth:.0f} MiB, s/step median {r['s_per_step_median']:.2f} "
          f"[{r['s_per_step_min']:.2f}-{r['s_per_step_max']:.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
