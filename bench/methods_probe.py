"""Op-level probe of the LoRA-family targets (issue 13) on one Qwen2.5-0.5B decoder block's seven
projections (q 896->896, k/v 896->128, o 896->896, gate/up 896->4864, down 4864->896; r=16, fp32,
CPU, 1024 tokens), all variants in one run, interleaved, medians of ``--repeats``.

    python bench/methods_probe.py [--repeats 7] [--tokens 1024] [--threads N] [--out bench/results/methods_probe.md]

Sides: npu-ft LoRA (``LoraLinear``), npu-ft LoRA-FA, npu-ft DoRA (``DoraLinear``), PEFT LoRA, PEFT DoRA
(``peft.tuners.lora.layer.Linear``, ``use_dora=True``), with identical weights. The block wires them as
a transformer block does (q/k/v share their input, gate/up share theirs, a stand-in for attention
and SiLU-gating in between, same for every side), so what autograd keeps is shared as in a model.

Per side: fwd+bwd time; **saved** = bytes autograd keeps for backward (unique storages, parameters
and the block's input excluded) - the activation memory the method costs per block; **peak** = the
highest live bytes allocated during one fwd+bwd (torch profiler memory events: saved activations
plus transients such as PEFT's ``W + s*B@A``). Ratios are computed against the side each target
names. The full-model targets (tokens/s and peak of a whole training step) are the bench suite's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "micro"))
from test_lora_linear import saved_bytes  # noqa: E402  (bytes autograd keeps, parameters and input excluded)

HIDDEN, KV, INTER, R, ALPHA = 896, 128, 4864, 16, 32
PROJ = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
        "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}


class Block(nn.Module):
    """The seven adapted projections of a decoder block, wired like Qwen2's."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, x):
        L = self.layers
        q, k, v = L["q"](x), L["k"](x), L["v"](x)
        attn = q * torch.sigmoid(k.mean(-1, keepdim=True) + v.mean(-1, keepdim=True))  # attention stand-in
        h = x + L["o"](attn)
        return h + L["down"](F.silu(L["gate"](h)) * L["up"](h))


def _bases(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (i, o) in PROJ.items():
        lin = nn.Linear(i, o, bias=name in ("q", "k", "v"))
        with torch.no_grad():
            lin.weight.copy_(torch.randn(o, i, generator=g) / i**0.5)
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(o, generator=g) * 0.1)
        lin.requires_grad_(False)
        out[name] = lin
    return out


def _adapter_weights(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(R, i, generator=g) / i**0.5, torch.randn(o, R, generator=g) * 0.02)
            for n, (i, o) in PROJ.items()}


def build(kind: str) -> Block:
    import copy

    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    from npu_ft.modules.dora import DoraLinear
    from npu_ft.modules.lora import LoraLinear

    bases, ab = _bases(), _adapter_weights()
    layers = {}
    for name, base in bases.items():
        base = copy.deepcopy(base)
        if kind.startswith("npu-ft"):
            cls = DoraLinear if kind == "npu-ft DoRA" else LoraLinear
            layer = cls(base, R, ALPHA, lora_fa=kind == "npu-ft LoRA-FA")
            a, b = layer.lora_A.weight, layer.lora_B.weight
        else:
            dora = kind == "PEFT DoRA"
            layer = PeftLinear(base, adapter_name="default", config=LoraConfig(r=R, lora_alpha=ALPHA, use_dora=dora),
                               r=R, lora_alpha=ALPHA, use_dora=dora)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            a.copy_(ab[name][0])
            b.copy_(ab[name][1])
        layers[name] = layer
    return Block(layers)


def step(block: Block, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    xi = x.detach().requires_grad_(True)
    block(xi).backward(grad)
    return xi.grad


def peak_bytes(block: Block, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Highest sum of bytes allocated and not yet freed during one fwd+bwd (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(block, x, grad)
        for p in block.parameters():
            p.grad = None
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


SIDES = ["npu-ft LoRA", "npu-ft LoRA-FA", "npu-ft DoRA", "PEFT LoRA", "PEFT DoRA"]
#: (what, side, against, metric, bound): speed is tokens/s (higher is better), memory lower is better
TARGETS = [
    ("DoRA tokens/s >= 1.5x PEFT DoRA", "npu-ft DoRA", "PEFT DoRA", "speed", 1.5),
    ("DoRA peak <= 0.8x PEFT DoRA", "npu-ft DoRA", "PEFT DoRA", "peak", 0.8),
    ("DoRA tokens/s >= 0.9x npu-ft LoRA", "npu-ft DoRA", "npu-ft LoRA", "speed", 0.9),
    ("DoRA peak <= 1.1x npu-ft LoRA", "npu-ft DoRA", "npu-ft LoRA", "peak", 1.1),
    ("LoRA-FA peak <= 0.8x npu-ft LoRA", "npu-ft LoRA-FA", "npu-ft LoRA", "peak", 0.8),
    ("LoRA-FA saved <= 0.8x npu-ft LoRA", "npu-ft LoRA-FA", "npu-ft LoRA", "saved", 0.8),
    ("LoRA-FA tokens/s >= 0.95x npu-ft LoRA", "npu-ft LoRA-FA", "npu-ft LoRA", "speed", 0.95),
]


def measure(tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, HIDDEN, generator=g)
    grad = torch.randn(tokens, HIDDEN, generator=g)
    blocks = {k: build(k) for k in SIDES}
    ref = step(blocks["PEFT LoRA"], x, grad)
    for k in ("npu-ft LoRA", "npu-ft LoRA-FA"):
        torch.testing.assert_close(step(blocks[k], x, grad), ref, rtol=1e-4, atol=1e-5)  # same math, same dx
    torch.testing.assert_close(step(blocks["npu-ft DoRA"], x, grad), step(blocks["PEFT DoRA"], x, grad),
                               rtol=1e-4, atol=1e-5)
    times: dict[str, list[float]] = {k: [] for k in SIDES}
    for _ in range(repeats):  # interleaved: drift and neighbours hit every side alike
        for k in SIDES:
            t = time.perf_counter()
            step(blocks[k], x, grad)
            times[k].append(time.perf_counter() - t)
            for p in blocks[k].parameters():
                p.grad = None
    out = {}
    for k in SIDES:
        med = statistics.median(times[k])
        out[k] = {"ms": med * 1e3, "speed": tokens / med, "saved": saved_bytes(blocks[k], x, grad),
                  "peak": peak_bytes(blocks[k], x, grad)}
    return out


def report(res: dict, tokens: int, repeats: int, threads: int) -> str:
    lines = [f"# LoRA-family op-level probe: one Qwen2.5-0.5B block's projections, r={R}, fp32, CPU, "
             f"{tokens} tokens, {threads} threads, median of {repeats}", "",
             "| side | fwd+bwd ms | tokens/s | saved for backward MiB | peak MiB |", "|---|---|---|---|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {v['ms']:.1f} | {v['speed']:.0f} | {v['saved'] / 2**20:.1f} | {v['peak'] / 2**20:.1f} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for what, side, against, metric, bound in TARGETS:
        ratio = res[side][metric] / res[against][metric]
        met = ratio >= bound if metric == "speed" else ratio <= bound
        lines.append(f"| {what} | {ratio:.2f}x | {'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = report(measure(args.tokens, args.repeats), args.tokens, args.repeats, torch.get_num_threads())
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
