"""Where does QLoRA's training-phase RSS growth on CPU come from? A small reproducible probe.

    python bench/qlora_memory_probe.py [--layers 24] [--method qlora|lora] [--checkpoint]
                                       [--steps 2] [--profile] [--json]
    # the variants of the investigation, each in a fresh process:
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/qlora_memory_probe.py
    NPU_FT_CPU_NATIVE=0            python bench/qlora_memory_probe.py
    python bench/qlora_memory_probe.py --all      # runs every variant in subprocesses, prints a table

Model: ``--layers`` LoraLinear(Nf4Linear) layers of the Qwen2.5-0.5B MLP shape, alternating
896->4864 and 4864->896 (so they chain), fp32, LoRA r=16, input [1, seq, 896]. Built like the bench
(all fp32 nn.Linear created, then each quantized and its fp32 weight freed), then ``--steps`` fwd+bwd steps.

Reports, per run:

* ``rss_build``: RSS after the build; ``rss_train_peak``: RSS high-water mark during training
  (``npu_ft.device.get_backend("cpu")``: VmHWM reset via /proc/self/clear_refs), and the increment.
* ``torch_live_peak``: the peak of bytes held by live torch CPU tensors during training, from
  torch.profiler's allocation events (only with ``--profile``: the profiler slows the run).
* ``saved_max``: the largest tensor autograd saved for backward (``saved_tensors_hooks``), and the
  total saved bytes — a full-size W would show as 896*4864*4 = 17 MiB.
* ``fp32_weights``: what all quantized weights would take in fp32 — the size of the suspected leak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MIB = 1 << 20


def _build(layers: int, hidden: int, inter: int, method: str, r: int):
    import torch
    from torch import nn

    from npu_ft.modules.lora import LoraLinear
    from npu_ft.modules.nf4 import Nf4Linear

    torch.manual_seed(0)
    # like the bench (build_model, then apply_qlora): every fp32 linear exists first, then each is
    # quantized and its fp32 weight freed
    linears = []
    for i in range(layers):
        fi, fo = (hidden, inter) if i % 2 == 0 else (inter, hidden)
        linears.append(nn.Linear(fi, fo, bias=False).requires_grad_(False))
    mods = []
    for i in range(layers):
        lin = linears[i]
        linears[i] = None
        base = Nf4Linear.from_linear(lin) if method == "qlora" else lin
        del lin  # a QLoRA layer's fp32 weight is freed here
        mods.append(LoraLinear(base, r=r, lora_alpha=2 * r))
    return nn.ModuleList(mods)


def run_once(args) -> dict:
    import torch
    from torch.utils.checkpoint import checkpoint

    from npu_ft.device import get_backend
    from npu_ft.ops.backends.cpu import _native
    from npu_ft.ops.backends.cpu import nf4 as cpu_nf4

    torch.set_num_threads(args.threads)
    dev = get_backend("cpu")
    if args.no_hugepages:
        cpu_nf4._HUGE_MIN_BYTES = 1 << 62
    # the first torch.utils.checkpoint call imports torch._dynamo & co. (~150 MiB of RSS): pay it
    # before measuring anything, so it is not mistaken for training memory
    tiny = torch.nn.Linear(4, 4)
    checkpoint(tiny, torch.randn(2, 4, requires_grad=True), use_reentrant=False).sum().backward()
    rss_start = dev.memory().current_bytes
    model = _build(args.layers, args.hidden, args.inter, args.method, args.r)
    rss_built = dev.memory().current_bytes
    x0 = torch.randn(1, args.seq, args.hidden)

    def pair(mod_a, mod_b, x):
        return mod_b(torch.nn.functional.silu(mod_a(x)))

    saved = {"n": 0, "bytes": 0, "max": 0}

    def pack(t):
        nb = t.untyped_storage().nbytes()
        saved["n"] += 1
        saved["bytes"] += nb
        saved["max"] = max(saved["max"], nb)
        return t

    def step():
        x = x0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for i in range(0, len(model), 2):
                a, b = model[i], model[i + 1]
                if args.checkpoint:
                    x = checkpoint(pair, a, b, x, use_reentrant=False)
                else:
                    x = pair(a, b, x)
            loss = x.float().pow(2).mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None

    step()  # warmup: first-call costs (native kernel build, thread pool, allocator warmup)
    rss_build = dev.memory().current_bytes
    dev.reset_peak_memory()
    saved.update(n=0, bytes=0, max=0)
    live_peak = None
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(args.steps):
                step()
        # every CPU allocation / free torch made, in time order (bytes > 0: alloc, < 0: free)
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        cur = peak = 0
        for _, nbytes in events:
            cur += nbytes
            peak = max(peak, cur)
        live_peak = peak  # relative to the tensors alive when profiling started
    else:
        for _ in range(args.steps):
            step()
    mem = dev.memory()
    n_quant = sum(m.in_features * m.out_features for m in model)
    return {
        "method": args.method,
        "layers": args.layers,
        "checkpoint": bool(args.checkpoint),
        "native": _native.native_ops() is not None,
        "mmap_threshold_env": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "workspace": os.environ.get("NPU_FT_NF4_WORKSPACE", "1"),
        "rss_start_mib": round(rss_start / MIB, 1),
        "rss_built_mib": round(rss_built / MIB, 1),
        "rss_build_mib": round(rss_build / MIB, 1),
        "rss_train_peak_mib": round(mem.peak_bytes / MIB, 1),
        "train_increase_mib": round((mem.peak_bytes - rss_build) / MIB, 1),
        "torch_live_peak_mib": None if live_peak is None else round(live_peak / MIB, 1),
        "saved_per_step": saved["n"] // max(args.steps, 1),
        "saved_max_mib": round(saved["max"] / MIB, 2),
        "fp32_weights_mib": round(n_quant * 4 / MIB, 1),
        "one_weight_mib": round(args.hidden * args.inter * 4 / MIB, 1),
    }


# The fix (npu_ft/ops/backends/cpu/lora.py) is on by default; NPU_FT_NF4_WORKSPACE=0 gives the old
# behaviour (a fresh dense W per nf4_linear call), so the variants below re-run the investigation.
OLD = {"NPU_FT_NF4_WORKSPACE": "0"}
VARIANTS = [
    ("default (workspace)", {}, []),
    ("default + profiler", {}, ["--profile"]),
    ("workspace, NATIVE=0", {"NPU_FT_CPU_NATIVE": "0"}, []),
    ("workspace, no checkpointing", {}, ["--no-checkpoint"]),
    ("old: fresh W per call", OLD, []),
    ("old + profiler", OLD, ["--profile"]),
    ("old, MMAP_THRESHOLD_=1MiB", {**OLD, "MALLOC_MMAP_THRESHOLD_": "1048576"}, []),
    ("old, TRIM_THRESHOLD_=0", {**OLD, "MALLOC_TRIM_THRESHOLD_": "0"}, []),
    ("old, NATIVE=0", {**OLD, "NPU_FT_CPU_NATIVE": "0"}, []),
    ("old, no huge-page madvise", OLD, ["--no-hugepages"]),
    ("old, no checkpointing", OLD, ["--no-checkpoint"]),
    ("LoRA (dense base)", {}, ["--method", "lora"]),
]


def run_all(args) -> int:
    base = [sys.executable, os.path.abspath(__file__), "--json", "--layers", str(args.layers), "--steps",
            str(args.steps), "--seq", str(args.seq), "--threads", str(args.threads)]
    rows = []
    for name, env, extra in VARIANTS:
        out = subprocess.run(base + extra, env={**os.environ, **env}, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, row))
        print(f"{name:28s} start {row['rss_start_mib']:6.1f}  built {row['rss_built_mib']:6.1f}  "
              f"+warmup {row['rss_build_mib']:6.1f}  train peak {row['rss_train_peak_mib']:7.1f} "
              f"(+{row['train_increase_mib']:6.1f})  torch live peak {row['torch_live_peak_mib']}  "
              f"saved max {row['saved_max_mib']}  [MiB; fp32 W: all {row['fp32_weights_mib']}, "
              f"one {row['one_weight_mib']}]", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--inter", type=int, default=4864)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    p.add_argument("--checkpoint", dest="checkpoint", action="store_true", default=True)
    p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--no-hugepages", action="store_true", help="native kernel without MADV_HUGEPAGE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="run every variant in a fresh process")
    args = p.parse_args(argv)
    if args.layers % 2:
        p.error("--layers must be even (up/down pairs)")
    if args.all:
        return run_all(args)
    row = run_once(args)
    print(json.dumps(row) if args.json else "\n".join(f"{k}: {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
