"""``lora_linear`` forward + backward (npu-ft ``LoraLinear``) against PEFT's LoRA ``Linear``, CPU fp32,
same weights, same input, same run. Shapes of a Qwen2.5-0.5B MLP projection (896 -> 4864, r=16)
and attention projection (896 -> 896), 1024 tokens.

Memory: each side records the bytes autograd keeps for backward (``saved_bytes``, unique storages,
counted with ``torch.autograd.graph.saved_tensors_hooks``) — the activation memory a layer costs
in training. Target (issue 2): npu-ft ≥ 1.2× PEFT's speed at no more memory.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft_layer = pytest.importorskip("peft.tuners.lora.layer")

from peft import LoraConfig  # noqa: E402

from npu_ft.modules.lora import LoraLinear  # noqa: E402

SHAPES = {"mlp 896->4864": (896, 4864), "attn 896->896": (896, 896)}
TOKENS = (2, 512)
R, ALPHA = 16, 32


def _pair(in_f, out_f):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=True)
    ours = LoraLinear(nn.Linear(in_f, out_f, bias=True), r=R, lora_alpha=ALPHA)
    ours.base_layer.load_state_dict(base.state_dict())
    theirs = peft_layer.Linear(
        nn.Linear(in_f, out_f, bias=True),
        adapter_name="default",
        config=LoraConfig(r=R, lora_alpha=ALPHA),
        r=R,
        lora_alpha=ALPHA,
    )
    theirs.base_layer.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    a = torch.randn(R, in_f, generator=g) * 0.02
    b = torch.randn(out_f, R, generator=g) * 0.02  # nonzero B: every gradient is exercised
    with torch.no_grad():
        ours.lora_A.weight.copy_(a)
        ours.lora_B.weight.copy_(b)
        theirs.lora_A["default"].weight.copy_(a)
        theirs.lora_B["default"].weight.copy_(b)
    theirs.base_layer.requires_grad_(False)
    x = torch.randn(*TOKENS, in_f, generator=g)
    grad = torch.randn(*TOKENS, out_f, generator=g)
    return ours, theirs, x, grad


def saved_bytes(layer, x, grad) -> int:
    """Bytes autograd keeps for backward beyond what exists anyway: storages of the layer's own
    weights (saved as views, e.g. ``W.t()``) and of the input (owned by the previous layer in a
    network) are not counted."""
    owned = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    xi = x.detach().requires_grad_(True)
    owned.add(xi.untyped_storage().data_ptr())
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(xi)
    y.backward(grad)
    return total


def step(layer, x, grad):
    xi = x.detach().requires_grad_(True)
    y = layer(xi)
    y.backward(grad)
    return xi.grad


@pytest.mark.parametrize("shape", list(SHAPES))
def test_lora_linear_fwd_bwd_npu_ft(benchmark, shape):
    ours, theirs, x, grad = _pair(*SHAPES[shape])
    dx = step(ours, x, grad)
    torch.testing.assert_close(dx, step(theirs, x, grad), rtol=1e-4, atol=1e-5)
    benchmark.group = f"lora_linear fwd+bwd {shape} x{TOKENS[0] * TOKENS[1]} tokens"
    benchmark.extra_info.update(target=">= 1.2x, saved <= PEFT", saved_bytes=saved_bytes(ours, x, grad))
    benchmark(step, ours, x, grad)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_lora_linear_fwd_bwd_baseline_peft(benchmark, shape):
    ours, theirs, x, grad = _pair(*SHAPES[shape])
    benchmark.group = f"lora_linear fwd+bwd {shape} x{TOKENS[0] * TOKENS[1]} tokens"
    benchmark.extra_info.update(saved_bytes=saved_bytes(theirs, x, grad))
    benchmark(step, theirs, x, grad)
