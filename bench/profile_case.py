"""Profile the training steps of one bench case with torch.profiler: top ops by self CPU time.

    python bench/profile_case.py SUITE.yaml CASE_ID_SUBSTRING [--layers N] [--seq-len T]
                                 [--checkpoint-policy full|selective] [--top 15]

Builds the case exactly as the worker does (same implementation builders, same loop), runs warmup
steps unprofiled, then profiles the timed steps. ``--layers`` cuts the model to N decoder layers so a
profile of a big shape stays cheap (the per-layer ops keep their shapes); ``--seq-len`` and
``--checkpoint-policy`` override the suite's settings for the case.
"""

from __future__ import annotations

import argparse
import sys

import torch

from npu_ft.modules.checkpointing import POLICIES


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("suite")
    p.add_argument("case")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--checkpoint-policy", choices=POLICIES, default=None)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    from npu_ft.bench import impls, load_suite, registry
    from npu_ft.bench.data import make_batches
    from npu_ft.bench.shapes import build_model, model_config

    suite = load_suite(args.suite)
    (case,) = [c for c in suite.cases if args.case in c.case_id][:1]
    if args.layers:
        case.model_overrides = {**case.model_overrides, "num_hidden_layers": args.layers}
    if args.seq_len:
        case.seq_len = args.seq_len
    if args.checkpoint_policy:
        case.checkpoint_policy = args.checkpoint_policy
    dtype = impls.torch_dtype(case.dtype)
    build = registry.builder(case.implementation)
    if build is None:
        p.error(f"{case.implementation} runs whole cases itself (no in-process model to profile)")
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
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for batch in batches[case.warmup:]:
            step(batch)
    print(f"# {case.case_id} layers={args.layers or 'all'}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
