"""The pure-torch kernels of ``lora_linear`` / ``nf4_linear`` and their backward ops: the one
implementation, registered as their reference kernel (any device) and, on their own dispatch keys,
by the cpu and npu backends (so the call counters still say which device ran them).

Same results as the readable oracle in :mod:`npu_ft.ops.lora` (``*_reference``, PEFT's math, which
the tests and ``npu-ft doctor`` compare against), with fewer passes over full-size tensors: the
base GEMM writes the output once (``addmm`` with the bias), the LoRA product is added in place
(``addmm_`` with ``alpha=scaling``), and in backward dx is one ``mm`` plus an in-place ``addmm_``
of the LoRA part. The scaling is applied to the small ``[tokens, r]`` / ``[out, r]`` tensors, never
to a full-size one. Mixed dtypes (x bf16, LoRA fp32) keep PEFT's rounding points. ``nf4_linear``
rebuilds W with ``torch.ops.npu_ft.nf4_dequantize``, which dispatches to the device's own
dequantize kernel, and its backward rebuilds W only when dx is needed.
"""

from __future__ import annotations

import torch

from . import _registry

__all__ = [
    "forward",
    "backward",
    "lora_linear_fused",
    "lora_linear_backward_fused",
    "nf4_linear_fused",
    "nf4_linear_backward_fused",
    "dequantize_weight",
    "KERNELS",
]


def _lora_input(x: torch.Tensor, x_lora: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The LoRA branch's input ``[tokens, in]``: ``x_lora`` (the caller's dropout), else x in ``dtype``."""
    if x_lora is not None:
        return x_lora.reshape(-1, x_lora.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.dtype == dtype else x2.to(dtype)


def forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first: bool):
    """``(y [..., out], h [..., r])``; ``cast_branch_first``: PEFT Linear4bit's rounding (else Linear's)."""
    out_features, in_features = weight.shape
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, in_features)
    if bias is not None:
        y = torch.addmm(bias, x2, weight.t())
    else:
        y = torch.mm(x2, weight.t())
    if lora_A is None:
        return y.view(lead + (out_features,)), x.new_empty(0)
    r = lora_A.shape[0]
    h = torch.mm(_lora_input(x, x_lora, lora_A.dtype), lora_A.t())
    if lora_A.dtype == y.dtype:
        y.addmm_(h, lora_B.t(), alpha=scaling)
    else:
        branch = torch.mm(h, lora_B.t()).mul_(scaling)
        if cast_branch_first:  # PEFT Linear4bit: round the branch to y's dtype, then add
            y.add_(branch.to(y.dtype))
        else:  # PEFT Linear: add in the promoted dtype, then round to y's dtype
            y.add_(branch)
    return y.view(lead + (out_features,)), h.view(lead + (r,))


def backward(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask):
    """``(dx, dx_lora, dA, dB, dbias)``, empty where ``output_mask`` does not ask; ``weight`` may be
    None when dx is not asked for."""
    need_dx, need_dx_lora, need_dA, need_dB, need_dbias = output_mask
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    dx = dx_lora = dA = dB = dbias = None
    dh: torch.Tensor | None = None  # d loss / d h, [tokens, r]: only with LoRA and when a gradient needs it
    if lora_A is not None:
        gl = g2 if g2.dtype == lora_A.dtype else g2.to(lora_A.dtype)
        if need_dB:
            dB = torch.mm(gl.t(), h.reshape(-1, lora_A.shape[0])).mul_(scaling)
        if need_dA or need_dx_lora or (need_dx and x_lora is None):
            dh = torch.mm(gl, lora_B).mul_(scaling)
    if dh is not None:
        if need_dA:
            dA = torch.mm(dh.t(), _lora_input(x, x_lora, lora_A.dtype))
        if need_dx_lora and x_lora is not None:
            dx_lora = torch.mm(dh, lora_A).view(x_lora.shape)
    if need_dx:
        dx2 = torch.mm(g2, weight)
        if dh is not None and x_lora is None:
            if dx2.dtype == lora_A.dtype:
                dx2.addmm_(dh, lora_A)
            else:  # PEFT: the LoRA part is rounded to x's dtype before the two parts are summed
                dx2.add_(torch.mm(dh, lora_A).to(dx2.dtype))
        dx = dx2.view(x.shape)
    if need_dbias:
        dbias = g2.sum(0)
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dx_lora, dA, dB, dbias))


def lora_linear_fused(x, weight, bias, lora_A, lora_B, scaling, x_lora):
    return forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first=False)


def lora_linear_backward_fused(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask):
    return backward(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask)


def dequantize_weight(packed, absmax, blocksize, weight_shape, dtype):
    """W ``[out, in]`` in ``dtype``, through ``npu_ft::nf4_dequantize`` (the device's own kernel)."""
    return torch.ops.npu_ft.nf4_dequantize(packed, absmax, blocksize, list(weight_shape), dtype)


def nf4_linear_fused(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, scaling, x_lora):
    weight = dequantize_weight(packed, absmax, blocksize, weight_shape, x.dtype)
    return forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first=True)


def nf4_linear_backward_fused(
    grad_out, x, packed, absmax, blocksize, weight_shape, lora_A, lora_B, h, scaling, x_lora, output_mask
):
    weight = dequantize_weight(packed, absmax, blocksize, weight_shape, x.dtype) if output_mask[0] else None
    return backward(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask)


KERNELS: _registry.KernelTable = {
    "lora_linear": lora_linear_fused,
    "lora_linear_backward": lora_linear_backward_fused,
    "nf4_linear": nf4_linear_fused,
    "nf4_linear_backward": nf4_linear_backward_fused,
}
