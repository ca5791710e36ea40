"""``swiglu``: the gated activation of Qwen/Llama MLPs, ``silu(gate) * up``, without keeping
``silu(gate)``.

Math (``...`` any leading dims, ``I`` intermediate size)::

    gate, up [..., I]   float32 / bfloat16 / float16, same dtype and shape
    out = silu(gate) * up = gate * sigmoid(gate) * up           [..., I], gate's dtype

    d up   = grad * silu(gate)
    d gate = grad * up * s * (1 + gate * (1 - s)),   s = sigmoid(gate)

The op keeps only ``gate`` and ``up`` (its inputs, which exist anyway) for the backward pass and
recomputes the sigmoid there; transformers' ``act_fn(gate) * up`` also keeps the ``[..., I]``
tensor ``silu(gate)``. Computation is in float32 with one rounding per output.

Kernels: the pure-torch reference here, cpu (native C++, AVX2 where present), cuda (Triton), npu
(torch_npu's ``npu_swiglu`` on ``cat(gate, up)``). Oracle: :func:`swiglu_oracle`
(``F.silu(gate) * up``, autograd).
"""

from __future__ import annotations

import torch

from . import _checks, _registry

__all__ = ["swiglu", "swiglu_oracle", "swiglu_reference", "swiglu_backward_reference"]

SWIGLU = _registry.define("swiglu(Tensor gate, Tensor up) -> Tensor")
# output_mask = [d gate, d up]
SWIGLU_BACKWARD = _registry.define(
    "swiglu_backward(Tensor grad, Tensor gate, Tensor up, bool[2] output_mask) -> (Tensor, Tensor)"
)


def _swiglu_fake(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _swiglu_backward_fake(grad, gate, up, output_mask):
    dgate = torch.empty_like(gate, memory_format=torch.contiguous_format) if output_mask[0] else gate.new_empty(0)
    dup = torch.empty_like(up, memory_format=torch.contiguous_format) if output_mask[1] else up.new_empty(0)
    return dgate, dup


_registry.register_fake(SWIGLU, _swiglu_fake)
_registry.register_fake(SWIGLU_BACKWARD, _swiglu_backward_fake)


def swiglu_reference(gate, up):
    """Reference kernel of ``npu_ft::swiglu``: ``silu(gate) * up`` in float32, rounded once."""
    g = gate.float()
    return (torch.nn.functional.silu(g) * up.float()).to(gate.dtype).contiguous()


def swiglu_backward_reference(grad, gate, up, output_mask):
    """Reference kernel of ``npu_ft::swiglu_backward``: ``(d gate, d up)`` (empty where not asked)."""
    g, u, dy = gate.float(), up.float(), grad.float()
    s = torch.sigmoid(g)
    dgate = (dy * u * s * (1 + g * (1 - s))).to(gate.dtype) if output_mask[0] else gate.new_empty(0)
    dup = (dy * g * s).to(up.dtype) if output_mask[1] else up.new_empty(0)
    return dgate, dup


_registry.register_reference(SWIGLU, swiglu_reference)
_registry.register_reference(SWIGLU_BACKWARD, swiglu_backward_reference)


def swiglu_oracle(gate, up):
    """transformers' MLP activation: ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU."""
    return torch.nn.functional.silu(gate) * up


def _setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    dgate, dup = torch.ops.npu_ft.swiglu_backward(grad.contiguous(), gate, up, mask)
    return (dgate if mask[0] else None), (dup if mask[1] else None)


_registry.register_autograd(SWIGLU, _backward, _setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shape and dtype). Bad input raises ``TypeError`` / ``ValueError``
    naming the argument."""
    _checks.check_tensor("gate", gate, _checks.FLOAT_DTYPES)
    _checks.check_tensor("up", up, (gate.dtype,))
    if up.shape != gate.shape:
        raise ValueError(f"up: shape {tuple(up.shape)} differs from gate's {tuple(gate.shape)}")
    _checks.check_same_device("gate", gate, up=up)
    return torch.ops.npu_ft.swiglu(gate.contiguous(), up.contiguous())
