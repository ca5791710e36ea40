"""LoRA-FA linear ops: LoRA with a frozen ``lora_A`` (``lora_fa_linear`` dense base,
``lora_fa_nf4_linear`` NF4 base). Forward math is exactly ``npu_ft::lora_linear`` /
``npu_ft::nf4_linear`` (PEFT's)::

    h = x_lora @ A.T                      [..., r]   (x_lora = x without dropout)
    y = x @ W.T + bias + s * h @ B.T      [..., out] in x's dtype

What differs is what backward keeps: with A frozen no ``dA = dh.T @ x`` is needed, so these ops
save ``h`` (r values per token) and references to the frozen W, A, B - never x - and backward
computes::

    dB = s * dy.T @ h          dh = s * dy @ B
    dx = dy @ W + dh @ A       (with dropout: dx = dy @ W and dx_lora = dh @ A)

That is the activation memory LoRA-FA saves: ``r`` instead of ``in`` values per token and layer.
Each op returns ``(y, h)``; the Python entry points return ``y`` and refuse an A that requires grad.
"""

from __future__ import annotations

import torch

from . import _registry
from ._lora_fused import dequantize_weight
from ._weight_args import check_dense_lora_args, check_nf4_lora_args, check_scaling
from .lora import lora_linear_reference, nf4_linear_reference

__all__ = [
    "lora_fa_linear",
    "lora_fa_nf4_linear",
    "lora_fa_linear_backward_reference",
    "lora_fa_nf4_linear_backward_reference",
]

LORA_FA_LINEAR = _registry.define(
    "lora_fa_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
    "Tensor? x_lora) -> (Tensor, Tensor)"
)
# output_mask = [dx, dx_lora, dB, dbias]; with has_x_lora the LoRA part of dx goes to dx_lora
LORA_FA_LINEAR_BACKWARD = _registry.define(
    "lora_fa_linear_backward(Tensor grad_out, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor h, float scaling, "
    "bool has_x_lora, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"
)
LORA_FA_NF4_LINEAR = _registry.define(
    "lora_fa_nf4_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, SymInt[] weight_shape, Tensor? bias, "
    "Tensor lora_A, Tensor lora_B, float scaling, Tensor? x_lora) -> (Tensor, Tensor)"
)
LORA_FA_NF4_LINEAR_BACKWARD = _registry.define(
    "lora_fa_nf4_linear_backward(Tensor grad_out, Tensor packed, Tensor absmax, int blocksize, SymInt[] weight_shape, "
    "Tensor lora_A, Tensor lora_B, Tensor h, float scaling, bool has_x_lora, bool[4] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)

# --------------------------------------------------------------------------------------------------
# fake kernels
# --------------------------------------------------------------------------------------------------


def _forward_fake(x, out_features, lora_A):
    lead = tuple(x.shape[:-1])
    return x.new_empty(lead + (out_features,)), lora_A.new_empty(lead + (lora_A.shape[0],))


def _backward_fake(grad_out, in_features, lora_A, lora_B, has_x_lora, output_mask):
    lead = tuple(grad_out.shape[:-1])
    dx = grad_out.new_empty(lead + (in_features,)) if output_mask[0] else grad_out.new_empty(0)
    dx_lora = lora_A.new_empty(lead + (in_features,)) if (output_mask[1] and has_x_lora) else grad_out.new_empty(0)
    dB = torch.empty_like(lora_B, memory_format=torch.contiguous_format) if output_mask[2] else grad_out.new_empty(0)
    dbias = grad_out.new_empty(grad_out.shape[-1]) if output_mask[3] else grad_out.new_empty(0)
    return dx, dx_lora, dB, dbias


_registry.register_fake(LORA_FA_LINEAR, lambda x, weight, bias, lora_A, lora_B, scaling, x_lora: _forward_fake(
    x, weight.shape[0], lora_A))
_registry.register_fake(LORA_FA_LINEAR_BACKWARD, lambda grad_out, weight, lora_A, lora_B, h, scaling, has_x_lora,
                        output_mask: _backward_fake(grad_out, weight.shape[1], lora_A, lora_B, has_x_lora, output_mask))
_registry.register_fake(LORA_FA_NF4_LINEAR, lambda x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B,
                        scaling, x_lora: _forward_fake(x, weight_shape[0], lora_A))
_registry.register_fake(LORA_FA_NF4_LINEAR_BACKWARD, lambda grad_out, packed, absmax, blocksize, weight_shape, lora_A,
                        lora_B, h, scaling, has_x_lora, output_mask: _backward_fake(
                            grad_out, weight_shape[1], lora_A, lora_B, has_x_lora, output_mask))

# --------------------------------------------------------------------------------------------------
# reference kernels
# --------------------------------------------------------------------------------------------------


def _backward_reference(grad_out, weight, lora_A, lora_B, h, scaling, has_x_lora, output_mask):
    need_dx, need_dx_lora, need_dB, need_dbias = output_mask
    out_features, in_features = weight.shape
    lead = tuple(grad_out.shape[:-1])
    g2 = grad_out.reshape(-1, out_features)
    gl = g2.to(lora_A.dtype)
    dh = scaling * (gl @ lora_B)
    outs = [grad_out.new_empty(0) for _ in range(4)]
    if need_dx:
        dx = g2 @ weight
        if not has_x_lora:
            dx = dx + (dh @ lora_A).to(dx.dtype)
        outs[0] = dx.reshape(lead + (in_features,))
    if need_dx_lora and has_x_lora:
        outs[1] = (dh @ lora_A).reshape(lead + (in_features,))
    if need_dB:
        outs[2] = scaling * (gl.t() @ h.reshape(-1, lora_A.shape[0]))
    if need_dbias:
        outs[3] = g2.sum(0)
    return tuple(outs)


def lora_fa_linear_backward_reference(grad_out, weight, lora_A, lora_B, h, scaling, has_x_lora, output_mask):
    """Pure-torch ``npu_ft::lora_fa_linear_backward``: ``(dx, dx_lora, dB, dbias)``."""
    return _backward_reference(grad_out, weight, lora_A, lora_B, h, scaling, has_x_lora, output_mask)


def lora_fa_nf4_linear_backward_reference(grad_out, packed, absmax, blocksize, weight_shape, lora_A, lora_B, h,
                                          scaling, has_x_lora, output_mask):
    """Pure-torch ``npu_ft::lora_fa_nf4_linear_backward``; dequantizes W to dy's dtype."""
    weight = dequantize_weight(packed, absmax, blocksize, weight_shape, grad_out.dtype)
    return _backward_reference(grad_out, weight, lora_A, lora_B, h, scaling, has_x_lora, output_mask)


_registry.register_reference(LORA_FA_LINEAR, lora_linear_reference)
_registry.register_reference(LORA_FA_LINEAR_BACKWARD, lora_fa_linear_backward_reference)
_registry.register_reference(LORA_FA_NF4_LINEAR, nf4_linear_reference)
_registry.register_reference(LORA_FA_NF4_LINEAR_BACKWARD, lora_fa_nf4_linear_backward_reference)

# --------------------------------------------------------------------------------------------------
# autograd: h and the frozen tensors are saved, x never
# --------------------------------------------------------------------------------------------------


def _mask(ctx, i_x, i_xl, i_B, i_bias):
    n = ctx.needs_input_grad
    return [bool(n[i_x]), bool(n[i_xl]), bool(n[i_B]), bool(n[i_bias])]


def _setup_context(ctx, inputs, output):
    if len(inputs) == 7:  # dense
        _, weight, bias, lora_A, lora_B, scaling, x_lora = inputs
        frozen: tuple = (weight,)
    else:  # nf4
        _, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, scaling, x_lora = inputs
        frozen = (packed, absmax)
        ctx.blocksize, ctx.weight_shape = blocksize, list(weight_shape)
    ctx.scaling = scaling
    ctx.has_x_lora = x_lora is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(lora_A, lora_B, output[1], *frozen)


def _lora_fa_linear_backward(ctx, grad_y, grad_h):
    lora_A, lora_B, h, weight = ctx.saved_tensors
    mask = _mask(ctx, 0, 6, 4, 2)
    dx, dx_lora, dB, dbias = torch.ops.npu_ft.lora_fa_linear_backward(
        grad_y.contiguous(), weight, lora_A, lora_B, h, ctx.scaling, ctx.has_x_lora, mask)
    return (dx if mask[0] else None, None, dbias.to(ctx.bias_dtype) if mask[3] else None, None,
            dB if mask[2] else None, None, dx_lora if mask[1] else None)


def _lora_fa_nf4_linear_backward(ctx, grad_y, grad_h):
    lora_A, lora_B, h, packed, absmax = ctx.saved_tensors
    mask = _mask(ctx, 0, 9, 7, 5)
    dx, dx_lora, dB, dbias = torch.ops.npu_ft.lora_fa_nf4_linear_backward(
        grad_y.contiguous(), packed, absmax, ctx.blocksize, ctx.weight_shape, lora_A, lora_B, h, ctx.scaling,
        ctx.has_x_lora, mask)
    return (dx if mask[0] else None, None, None, None, None, dbias.to(ctx.bias_dtype) if mask[3] else None, None,
            dB if mask[2] else None, None, dx_lora if mask[1] else None)


_registry.register_autograd(LORA_FA_LINEAR, _lora_fa_linear_backward, _setup_context)
_registry.register_autograd(LORA_FA_NF4_LINEAR, _lora_fa_nf4_linear_backward, _setup_context)

# --------------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------------


def _check_frozen_a(lora_A: torch.Tensor) -> None:
    if lora_A.requires_grad and torch.is_grad_enabled():
        raise ValueError("lora_A: LoRA-FA keeps lora_A frozen (backward keeps no x to compute its gradient); "
                         "call lora_A.requires_grad_(False), or use lora_linear to train it")


def lora_fa_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ weight.T + bias + scaling * (x_lora @ lora_A.T) @ lora_B.T`` with lora_A frozen.

    Arguments and result as :func:`npu_ft.ops.lora.lora_linear`; ``lora_A`` must not require grad.
    Backward keeps ``h = x_lora @ lora_A.T`` ``[..., r]`` instead of x ``[..., in]``.
    """
    check_dense_lora_args(x, weight, bias, lora_A, lora_B, x_lora, "LoRA-FA")
    _check_frozen_a(lora_A)
    scaling = check_scaling(scaling)
    y, _ = torch.ops.npu_ft.lora_fa_linear(x, weight, bias, lora_A, lora_B, scaling, x_lora)
    return y


def lora_fa_nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`lora_fa_linear` over an NF4 base (``packed`` + ``state`` as in
    :func:`npu_ft.ops.lora.nf4_linear`, PEFT ``Linear4bit`` semantics); W is rebuilt in x's dtype
    inside the op and again in backward for dx."""
    absmax, blocksize, shape = check_nf4_lora_args(x, packed, state, bias, lora_A, lora_B, x_lora)
    _check_frozen_a(lora_A)
    scaling = check_scaling(scaling)
    y, _ = torch.ops.npu_ft.lora_fa_nf4_linear(x, packed, absmax, blocksize, shape, bias, lora_A, lora_B, scaling,
                                                x_lora)
    return y


# --------------------------------------------------------------------------------------------------
# npu-ft doctor rows
# --------------------------------------------------------------------------------------------------


def _doctor_dense(device, dtype):
    from ._doctor_rows import compare, linear_inputs

    t = linear_inputs(8)
    lora_A = t["lora_A"]

    def ref_fn(x, lora_B, weight, bias, scaling):
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, None)[0]

    def op_fn(x, lora_B, weight, bias, scaling):
        return lora_fa_linear(x, weight, bias, lora_A.to(device=x.device, dtype=x.dtype), lora_B, scaling)

    return compare(device, dtype, op_fn, ref_fn, t, ("x", "lora_B"),
                   {"weight": t["weight"], "bias": t["bias"], "scaling": 2.0})


def _doctor_nf4(device, dtype):
    from ._doctor_rows import compare, linear_inputs, nf4_base

    t = linear_inputs(9)
    lora_A = t["lora_A"]
    _, _, dense, packed, state = nf4_base(t["weight"], device)

    def ref_fn(x, lora_B, bias, scaling):
        return lora_linear_reference(x, dense, bias, lora_A, lora_B, scaling, None)[0]

    def op_fn(x, lora_B, bias, scaling):
        return lora_fa_nf4_linear(x, packed, state, bias, lora_A.to(device=x.device, dtype=x.dtype), lora_B, scaling)

    return compare(device, dtype, op_fn, ref_fn, t, ("x", "lora_B"), {"bias": t["bias"], "scaling": 2.0})


def doctor_checks(dtypes=(torch.float32, torch.bfloat16)) -> list:
    """``npu-ft doctor`` rows of the LoRA-FA ops (forward + backward on the device, lora_A frozen,
    against fp32 torch on the CPU): keyword arguments of ``npu_ft.doctor.Check``."""
    from ._doctor_rows import rows

    return rows(dtypes, ("lora_fa_linear", _doctor_dense, ("lora_fa_linear", "lora_fa_linear_backward")),
                ("lora_fa_nf4_linear", _doctor_nf4, ("lora_fa_nf4_linear", "lora_fa_nf4_linear_backward")))
