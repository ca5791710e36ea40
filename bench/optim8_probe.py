"""8-bit AdamW in full fine-tuning on CPU: optimizer-state bytes, peak memory and loss vs fp32 AdamW.

    python bench/optim8_probe.py --all --model tiny            # every optimizer, a fresh process each
    python bench/optim8_probe.py --all --model 0.5b --layers 6 # the Qwen2.5-0.5B shape, 6 of 24 layers
    python bench/optim8_probe.py --model tiny --optim npu-ft-8bit --json   # one case

Optimizers (``--optim``):

* ``fp32``: ``torch.optim.AdamW`` (float32 moments; the baseline).
* ``npu-ft-8bit``: ``npu_ft.optim.AdamW8bit`` (every parameter >= 4096 elements in 8-bit states, as
  ``bitsandbytes.optim.AdamW8bit`` does by default).
* ``npu-ft-8bit-hf``: ``npu_ft.optim.create_optimizer("adamw_8bit", model=...)``: transformers'
  Trainer rule, the embedding keeps float32 moments (with tied embeddings that is the head too).
* ``bnb-8bit``: ``bitsandbytes.optim.AdamW8bit`` (its CPU kernels).

Model: a random ``Qwen2ForCausalLM`` built from a config (``tiny``: npu-ft's tiny test model,
hidden 64, 2 layers, the real 151,936-row vocabulary; ``0.5b``: Qwen2.5-0.5B's shape, optionally
with fewer layers), float32, every parameter trained, tied embeddings. Data: ``--steps`` random
batches of ``--batch`` x ``--seq`` tokens (seeded, the same for every optimizer).

Reported per case: ``state_bytes`` (bytes of all optimizer-state tensors, shared code maps
once), ``train_peak`` = peak RSS during training (VmHWM, reset after the model is built) minus the
process's RSS before the model was built (so: parameters + gradients + optimizer + activations +
temporaries), the losses of every step, and the median step time. ``--all`` prints the ratios to
``fp32`` and the largest loss difference to ``bnb-8bit`` and to ``fp32``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MIB = 1 << 20
OPTIMS = ("fp32", "npu-ft-8bit", "npu-ft-8bit-hf", "bnb-8bit")


def _model(name: str, layers: int | None):
    from npu_ft.model.tiny import model_from_config, preset_config, tiny_config

    cfg = tiny_config("qwen2") if name == "tiny" else preset_config("qwen2.5-0.5b")
    if layers is not None:
        cfg.update(num_hidden_layers=layers, max_window_layers=layers)
    return model_from_config(cfg, seed=0)


def _optimizer(name: str, model, lr: float):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]  # model: a module holding the parameters
    hyper = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    if name == "fp32":
        return torch.optim.AdamW(params, **hyper)
    if name == "npu-ft-8bit":
        from npu_ft.optim import AdamW8bit

        return AdamW8bit(params, **hyper)
    if name == "npu-ft-8bit-hf":
        from npu_ft.optim import create_optimizer

        return create_optimizer("adamw_8bit", params, model=model, **hyper)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, **hyper)


def _state_bytes(optimizer) -> int:
    import torch

    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = value.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total


def run_once(args) -> dict:
    import torch

    from npu_ft.device import get_backend

    torch.set_num_threads(args.threads)
    dev = get_backend("cpu")
    # one step of the same optimizer on a throwaway parameter first: library loads and kernel caches
    # (bitsandbytes' native library, npu-ft's JIT-built CPU kernels, code-map lookup tables) are paid
    # before the baseline, not counted as training memory
    warm = torch.nn.Parameter(torch.zeros(8192))
    warm.grad = torch.ones(8192)
    _optimizer(args.optim, torch.nn.ParameterList([warm]), args.lr).step()
    del warm
    rss_start = dev.memory().current_bytes
    model = _model(args.model, args.layers)
    model.train()
    optimizer = _optimizer(args.optim, model, args.lr)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(args.steps)]
    dev.reset_peak_memory()
    losses, times = [], []
    for ids in batches:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = dev.memory().peak_bytes
    return {
        "model": args.model,
        "layers": model.config.num_hidden_layers,
        "params": n_params,
        "optim": args.optim,
        "state_bytes": _state_bytes(optimizer),
        "train_peak_bytes": peak - rss_start,
        "rss_start_mib": round(rss_start / MIB, 1),
        "losses": losses,
        "step_s_median": round(statistics.median(times), 3),
    }


def run_all(args) -> int:
    base = [sys.executable, os.path.abspath(__file__), "--json", "--model", args.model, "--steps", str(args.steps),
            "--seq", str(args.seq), "--batch", str(args.batch), "--lr", str(args.lr), "--threads", str(args.threads)]
    if args.layers is not None:
        base += ["--layers", str(args.layers)]
    rows = {}
    for name in OPTIMS:
        out = subprocess.run(base + ["--optim", name], capture_output=True, text=True, timeout=args.timeout)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = rows["fp32"]
    print(f"model {args.model} ({ref['layers']} layers, {ref['params'] / 1e6:.1f}M params), fp32, "
          f"{args.steps} steps of {args.batch}x{args.seq} tokens, lr {args.lr}")
    print(f"{'optimizer':16s} {'state MiB':>10s} {'x fp32':>7s} {'peak MiB':>9s} {'x fp32':>7s} "
          f"{'max|dloss| vs bnb':>18s} {'vs fp32':>9s} {'s/step':>7s}")
    for name, row in rows.items():
        d_bnb = max(abs(a - b) for a, b in zip(row["losses"], rows["bnb-8bit"]["losses"], strict=True))
        d_fp32 = max(abs(a - b) for a, b in zip(row["losses"], ref["losses"], strict=True))
        print(f"{name:16s} {row['state_bytes'] / MIB:10.1f} {row['state_bytes'] / ref['state_bytes']:7.3f} "
              f"{row['train_peak_bytes'] / MIB:9.1f} {row['train_peak_bytes'] / ref['train_peak_bytes']:7.3f} "
              f"{d_bnb:18.2e} {d_fp32:9.2e} {row['step_s_median']:7.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "0.5b"], default="tiny")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's own)")
    p.add_argument("--optim", choices=OPTIMS, default="npu-ft-8bit")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=7200.0, help="per case, seconds (catches hangs)")
    p.add_argument("--all", action="store_true", help="every optimizer in a fresh process, then a table")
    p.add_argument("--out", help="with --all: write the rows as JSON here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.all:
        return run_all(args)
    row = run_once(args)
    print(json.dumps(row) if args.json else row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
