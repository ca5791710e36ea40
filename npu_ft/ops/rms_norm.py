"""``rms_norm``: the RMSNorm of Qwen2/Qwen3/Llama/Mistral, optionally fused with the residual add
that precedes it in a decoder layer.

Math (``...`` = any leading dims, ``H`` = hidden size; transformers' ``Qwen2RMSNorm`` semantics)::

    x, residual [..., H]   float32 / bfloat16 / float16, same dtype; residual optional
    weight      [H]        float32 / bfloat16 / float16

    h    = x + residual                      (rounded to x's dtype; h = x without a residual)
    rstd = 1 / sqrt(mean(float(h)^2) + eps)  [...] float32
    y    = weight * (float(h) * rstd).to(x.dtype)    dtype = promote(x.dtype, weight.dtype)

The op returns ``(y, h, rstd)``; ``h`` is an empty tensor when there is no residual (an op output
may not alias its input). Backward (:data:`RMS_NORM_BACKWARD`) recomputes the normalised values from
the saved ``h`` and ``rstd``: the op keeps **only its input and one float32 per row** for the
backward pass (transformers' module chain keeps its input, its fp32 copy for bf16 inputs, the
normalised tensor when the weight is trainable and 1/rms per row).

Kernels: the pure-torch reference here (any device), the cpu kernel (native C++, AVX2 where the
CPU has it), cuda (Triton) and npu (torch_npu's ``npu_rms_norm`` for the plain norm). The oracle the
tests and ``npu-ft doctor`` compare against is :func:`rms_norm_oracle`: transformers' formula
written plainly, differentiated by torch autograd.
"""

from __future__ import annotations

import torch

from . import _checks, _registry

__all__ = ["rms_norm", "rms_norm_oracle", "rms_norm_reference", "rms_norm_backward_reference"]

RMS_NORM = _registry.define(
    "rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor, Tensor, Tensor)"
)
# output_mask = [dx, dweight]; grad_h is the gradient reaching the h output (the next residual)
RMS_NORM_BACKWARD = _registry.define(
    "rms_norm_backward(Tensor grad_y, Tensor? grad_h, Tensor h, Tensor weight, Tensor rstd, bool[2] output_mask) "
    "-> (Tensor, Tensor)"
)


def output_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """y's dtype: ``weight * normed.to(x.dtype)`` promotes, as transformers' module does."""
    return torch.promote_types(x_dtype, weight_dtype)


# --------------------------------------------------------------------------------------------------
# fake kernels
# --------------------------------------------------------------------------------------------------


def _rms_norm_fake(x, weight, eps, residual):
    y = x.new_empty(x.shape, dtype=output_dtype(x.dtype, weight.dtype))
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return y, h, x.new_empty(x.shape[:-1], dtype=torch.float32)


def _rms_norm_backward_fake(grad_y, grad_h, h, weight, rstd, output_mask):
    dx = h.new_empty(h.shape) if output_mask[0] else h.new_empty(0)
    dweight = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0)
    return dx, dweight


_registry.register_fake(RMS_NORM, _rms_norm_fake)
_registry.register_fake(RMS_NORM_BACKWARD, _rms_norm_backward_fake)

# --------------------------------------------------------------------------------------------------
# reference kernels (any device)
# --------------------------------------------------------------------------------------------------


def rms_norm_reference(x, weight, eps, residual):
    """Reference kernel of ``npu_ft::rms_norm``: ``(y [..., H], h [..., H] or empty, rstd [...] fp32)``."""
    h = x + residual if residual is not None else x
    h32 = h.float()
    rstd = torch.rsqrt(h32.pow(2).mean(-1) + eps)
    y = weight * (h32 * rstd.unsqueeze(-1)).to(x.dtype)
    return y, (h if residual is not None else x.new_empty(0)), rstd


def rms_norm_backward_reference(grad_y, grad_h, h, weight, rstd, output_mask):
    """Reference kernel of ``npu_ft::rms_norm_backward``: ``(dx [..., H] in h's dtype, dweight [H])``.

    ``dx`` is the gradient of the norm's input h (plus ``grad_h``), which is also the gradient of x
    and of the residual."""
    need_dx, need_dweight = output_mask
    rstd = rstd.unsqueeze(-1)
    normed = h.float() * rstd
    dx, dweight = h.new_empty(0), weight.new_empty(0)
    if need_dweight:
        prod = grad_y.float() * normed.to(h.dtype).float()
        dweight = prod.reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
    if need_dx:
        dn = (grad_y.float() * weight.float()).to(h.dtype).float()
        mean = (dn * normed).mean(-1, keepdim=True)
        d = rstd * (dn - normed * mean)
        if grad_h is not None:
            d = d + grad_h.float()
        dx = d.to(h.dtype)
    return dx, dweight


_registry.register_reference(RMS_NORM, rms_norm_reference)
_registry.register_reference(RMS_NORM_BACKWARD, rms_norm_backward_reference)

# --------------------------------------------------------------------------------------------------
# the oracle: transformers' Qwen2RMSNorm written plainly (tests and npu-ft doctor compare against it)
# --------------------------------------------------------------------------------------------------


def rms_norm_oracle(x, weight, eps, residual=None):
    """transformers' ``residual + x`` then ``Qwen2RMSNorm``: returns ``(y, h)`` (h = x without residual)."""
    h = residual + x if residual is not None else x
    h32 = h.to(torch.float32)
    variance = h32.pow(2).mean(-1, keepdim=True)
    return weight * (h32 * torch.rsqrt(variance + eps)).to(h.dtype), h


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, weight, eps, residual = inputs
    y, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)


def _backward(ctx, grad_y, grad_h, grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    n = ctx.needs_input_grad
    need_dx = bool(n[0] or (ctx.has_residual and n[3]))
    mask = [need_dx, bool(n[1])]
    if grad_y is None:
        grad_y = torch.zeros((), dtype=output_dtype(h.dtype, weight.dtype), device=h.device).expand(h.shape)
    dx, dweight = torch.ops.npu_ft.rms_norm_backward(
        grad_y.contiguous(), grad_h.contiguous() if (ctx.has_residual and grad_h is not None) else None,
        h, weight, rstd, mask)
    return (
        dx if n[0] else None,
        dweight if mask[1] else None,
        None,
        dx if (ctx.has_residual and n[3]) else None,
    )


_registry.register_autograd(RMS_NORM, _backward, _setup_context)

# --------------------------------------------------------------------------------------------------
# Python entry point
# --------------------------------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` (of ``x + residual`` when a residual is given), as transformers' Qwen2RMSNorm.

    Returns ``(y, h)``: ``y [..., H]`` the normalised tensor (dtype promote(x, weight)) and ``h``,
    the norm's input (``x + residual``: the next residual; ``x`` itself without a residual).
    Bad input raises ``TypeError`` / ``ValueError`` naming the argument."""
    _checks.check_tensor("x", x, _checks.FLOAT_DTYPES)
    _checks.check_tensor("weight", weight, _checks.FLOAT_DTYPES, ndim=1)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected shape [..., hidden] with hidden >= 1, got {tuple(x.shape)}")
    _checks.check_dim("weight", weight.shape[0], x.shape[-1], "length (must equal x's last dim)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    if residual is not None:
        _checks.check_tensor("residual", residual, (x.dtype,))
        if residual.shape != x.shape:
            raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
    _checks.check_same_device("x", x, weight=weight, residual=residual)
    y, h, _ = torch.ops.npu_ft.rms_norm(x, weight, float(eps), residual)
    return y, (h if residual is not None else x)

