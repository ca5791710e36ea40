"""Profile the training steps of bench cases with torch.profiler: top ops by self CPU time, or (``--kinds``)
the share of a step per kind of op and what fusing the elementwise ops could gain at most
(:mod:`npu_ft.bench.step_profile`).

    python bench/profile_case.py SUITE.yaml CASE_ID_SUBSTRING [CASE_ID_SUBSTRING ...] [--layers N]
                                 [--seq-len T] [--checkpoint-policy full|selective] [--top 15] [--kinds]

Builds each case exactly as the worker does (same implementation builders, same loop), runs warmup
steps unprofiled, then profiles the timed steps. ``--layers`` cuts the model to N decoder layers so a
profile of a big shape stays cheap (the per-layer ops keep their shapes); ``--seq-len`` and
``--checkpoint-policy`` override the suite's settings for the case. The cases run one after the other
in this process.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from npu_ft.modules.checkpointing import POLICIES


def profile_case(case, profile_memory: bool = True):
    """Profile ``case``'s timed steps; returns (profiler, wall seconds per timed step, timed steps)."""
    from npu_ft.bench import impls, registry
    from npu_ft.bench.data import make_batches
    from npu_ft.bench.shapes import build_model, model_config

    dtype = impls.torch_dtype(case.dtype)
    build = registry.builder(case.implementation)
    if build is None:
        raise SystemExit(f"{case.implementation} runs whole cases itself (no in-process model to profile)")
    prepared = build(
        case, lambda: build_model(case.model, case.seed, dtype, case.model_overrides), torch.device("cpu"))
    model = prepared.model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=case.lr)
    batches = make_batches(case, model_config(case.model, case.model_overrides).vocab_size)

    def step(batch):
        model(**batch.model_inputs("cpu")).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch in batches[: case.warmup]:
        step(batch)
    timed = batches[case.warmup:]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=profile_memory) as prof:
        start = time.perf_counter()
        for batch in timed:
            step(batch)
        wall = (time.perf_counter() - start) / len(timed)
    return prof, wall, len(timed)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("suite")
    p.add_argument("cases", nargs="+", metavar="case")
    p.add_argument("--layers", type=_positive, default=None)
    p.add_argument("--seq-len", type=_positive, default=None)
    p.add_argument("--checkpoint-policy", choices=POLICIES, default=None)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--kinds", action="store_true",
                   help="print the share of a step per kind of op and the fusion ceiling instead of the top ops")
    args = p.parse_args(argv)
    from npu_ft.bench import load_suite
    from npu_ft.bench.step_profile import kinds_table, time_by_kind
    from npu_ft.bench.suite import SuiteError

    try:
        suite = load_suite(args.suite)
    except SuiteError as err:
        p.error(str(err))
    rows = {}
    for wanted in args.cases:
        matching = [c for c in suite.cases if wanted in c.case_id]
        if not matching:
            p.error(f"no case of {args.suite} has {wanted!r} in its id")
        case = matching[0]
        if args.layers:
            case.model_overrides = {**case.model_overrides, "num_hidden_layers": args.layers}
        if args.seq_len:
            case.seq_len = args.seq_len
        if args.checkpoint_policy:
            case.checkpoint_policy = args.checkpoint_policy
        prof, wall, steps = profile_case(case, profile_memory=not args.kinds)
        if args.kinds:
            rows[case.case_id] = (wall, {k: s / steps for k, s in time_by_kind(prof.events()).items()})
            print(f"# {case.case_id} layers={args.layers or 'all'}: {wall:.2f} s/step", flush=True)
        else:
            print(f"# {case.case_id} layers={args.layers or 'all'}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                            max_name_column_width=40))
        del prof
        gc.collect()
    if args.kinds:
        print(kinds_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
