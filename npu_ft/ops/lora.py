"""LoRA linear ops: ``lora_linear`` (dense base) and ``nf4_linear`` (QLoRA: NF4 base + LoRA).

Math (``...`` = any batch dims, ``in``/``out`` = features, ``r`` = LoRA rank)::

    x       [..., in]     activations                      (float32 / bfloat16 / float16)
    weight  [out, in]     frozen base weight, x's dtype     (dense op)
    packed  [(out*in+1)//2, 1] uint8 + absmax fp32 [blocks]  NF4 base weight (nf4 op)
    bias    [out]         optional, x's dtype
    lora_A  [r, in]       trainable
    lora_B  [out, r]      trainable, same dtype as lora_A
    x_lora  [..., in]     optional: dropout(x.to(lora_A.dtype)) computed by the caller with torch's
                          dropout (exactly what PEFT's ``nn.Dropout`` does); None = no dropout.

    y = x @ W.T + bias + scaling * (x_lora @ A.T) @ B.T          -> [..., out], x's dtype

Dtype semantics follow PEFT exactly. ``lora_linear`` = ``peft.tuners.lora.layer.Linear``: the LoRA
branch runs in lora_A's dtype and is added in the promoted dtype, then the sum is cast back to x's
dtype. ``nf4_linear`` = ``peft.tuners.lora.bnb.Linear4bit``: the branch's result is cast to x's dtype
first, then added. The NF4 weight is dequantized to x's dtype (as bitsandbytes' ``matmul_4bit``).

Each op returns ``(y, h)`` with ``h = x_lora @ A.T`` ([..., r], kept for backward); the Python entry
points return ``y`` only.

Kernels: one pure-torch implementation (:mod:`npu_ft.ops._lora_fused`, fused ``addmm`` calls) is
the reference kernel that serves any device, and the cpu and npu backends register it on their own
keys. The ``*_reference`` functions below are the readable statement of PEFT's math: the **oracle**
the tests and ``npu-ft doctor`` compare every kernel against (differentiable by torch autograd);
they are not registered. Backward is a separate op per family (``lora_linear_backward``,
``nf4_linear_backward``) so every device can bring its own backward kernel. Backward saves x (only
where lora_A's gradient reads it: not on an NF4 linear without an adapter, nor with dropout, where it
saves x_lora), h and references to the frozen weight (the NF4 op saves packed/absmax and dequantizes
again); it never saves a copy of W nor a full-size output, and the frozen weight gets no gradient.
A backward kernel reads x's data only for dA without dropout, otherwise only its shape and dtype.
"""

from __future__ import annotations

import torch

from . import _checks, _lora_fused, _registry
from ._weight_args import check_bias, check_dense_lora_args, check_lora, check_nf4_weight, check_scaling, check_x

__all__ = [
    "lora_linear",
    "nf4_linear",
    "lora_linear_reference",
    "lora_linear_backward_reference",
    "nf4_linear_reference",
    "nf4_linear_backward_reference",
]

# --------------------------------------------------------------------------------------------------
# schemas
# --------------------------------------------------------------------------------------------------

LORA_LINEAR = _registry.define(
    "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
    "Tensor? x_lora) -> (Tensor, Tensor)"
)
# output_mask = [dx, dx_lora, dA, dB, dbias]; outputs not asked for are empty tensors.
LORA_LINEAR_BACKWARD = _registry.define(
    "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor h, float scaling, Tensor? x_lora, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
NF4_LINEAR = _registry.define(
    "nf4_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, SymInt[] weight_shape, Tensor? bias, "
    "Tensor? lora_A, Tensor? lora_B, float scaling, Tensor? x_lora) -> (Tensor, Tensor)"
)
NF4_LINEAR_BACKWARD = _registry.define(
    "nf4_linear_backward(Tensor grad_out, Tensor x, Tensor packed, Tensor absmax, int blocksize, "
    "SymInt[] weight_shape, Tensor? lora_A, Tensor? lora_B, Tensor h, float scaling, Tensor? x_lora, "
    "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

# --------------------------------------------------------------------------------------------------
# fake kernels
# --------------------------------------------------------------------------------------------------


def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scaling, x_lora):
    lead = tuple(x.shape[:-1])
    y = x.new_empty(lead + (weight.shape[0],))
    h = lora_A.new_empty(lead + (lora_A.shape[0],))
    return y, h


def _backward_fake(grad_out, x, lora_A, lora_B, x_lora, output_mask):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else x.new_empty(0)
    if output_mask[1] and x_lora is not None:
        dx_lora = torch.empty_like(x_lora, memory_format=torch.contiguous_format)
    else:
        dx_lora = x.new_empty(0)
    dA = (
        torch.empty_like(lora_A, memory_format=torch.contiguous_format)
        if (output_mask[2] and lora_A is not None)
        else x.new_empty(0)
    )
    dB = (
        torch.empty_like(lora_B, memory_format=torch.contiguous_format)
        if (output_mask[3] and lora_B is not None)
        else x.new_empty(0)
    )
    dbias = grad_out.new_empty(grad_out.shape[-1]) if output_mask[4] else grad_out.new_empty(0)
    return dx, dx_lora, dA, dB, dbias


def _lora_linear_backward_fake(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask):
    return _backward_fake(grad_out, x, lora_A, lora_B, x_lora, output_mask)


def _nf4_linear_fake(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, scaling, x_lora):
    lead = tuple(x.shape[:-1])
    y = x.new_empty(lead + (weight_shape[0],))
    if lora_A is not None:
        h = lora_A.new_empty(lead + (lora_A.shape[0],))
    else:
        h = x.new_empty(0)
    return y, h


def _nf4_linear_backward_fake(
    grad_out, x, packed, absmax, blocksize, weight_shape, lora_A, lora_B, h, scaling, x_lora, output_mask
):
    return _backward_fake(grad_out, x, lora_A, lora_B, x_lora, output_mask)


_registry.register_fake(LORA_LINEAR, _lora_linear_fake)
_registry.register_fake(LORA_LINEAR_BACKWARD, _lora_linear_backward_fake)
_registry.register_fake(NF4_LINEAR, _nf4_linear_fake)
_registry.register_fake(NF4_LINEAR_BACKWARD, _nf4_linear_backward_fake)

# --------------------------------------------------------------------------------------------------
# reference kernels: the fused pure-torch implementation, on every device without a kernel of its own
# --------------------------------------------------------------------------------------------------

_registry.register_reference(LORA_LINEAR, _lora_fused.lora_linear_fused)
_registry.register_reference(LORA_LINEAR_BACKWARD, _lora_fused.lora_linear_backward_fused)
_registry.register_reference(NF4_LINEAR, _lora_fused.nf4_linear_fused)
_registry.register_reference(NF4_LINEAR_BACKWARD, _lora_fused.nf4_linear_backward_fused)

# --------------------------------------------------------------------------------------------------
# the oracle: PEFT's math written plainly (tests and npu-ft doctor compare kernels against it)
# --------------------------------------------------------------------------------------------------


def _forward_reference(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first):
    y = torch.nn.functional.linear(x, weight, bias)
    if lora_A is None:
        return y, x.new_empty(0)
    xl = x.to(lora_A.dtype) if x_lora is None else x_lora
    h = torch.nn.functional.linear(xl, lora_A)
    branch = torch.nn.functional.linear(h, lora_B) * scaling
    if cast_branch_first:  # PEFT Linear4bit
        y = y + branch.to(y.dtype)
    else:  # PEFT Linear
        y = (y + branch).to(x.dtype)
    return y, h


def _backward_reference(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask):
    need_dx, need_dx_lora, need_dA, need_dB, need_dbias = output_mask
    in_features = x.shape[-1]
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    dx, dx_lora, dA, dB, dbias = (x.new_empty(0) for _ in range(5))  # distinct: outputs may not alias
    dh2: torch.Tensor | None = None  # d loss / d h, [tokens, r]
    if lora_A is not None:
        gl = g2.to(lora_A.dtype) * scaling
        dh2 = gl @ lora_B
        if need_dB:
            dB = gl.t() @ h.reshape(-1, lora_A.shape[0])
        if need_dA:
            xl = x.to(lora_A.dtype) if x_lora is None else x_lora
            dA = dh2.t() @ xl.reshape(-1, in_features)
        if need_dx_lora and x_lora is not None:
            dx_lora = (dh2 @ lora_A).reshape(x_lora.shape)
    if need_dx:
        dx2 = g2 @ weight
        if dh2 is not None and x_lora is None:
            dx2 = dx2 + (dh2 @ lora_A).to(dx2.dtype)
        dx = dx2.reshape(x.shape)
    if need_dbias:
        dbias = g2.sum(0)
    return dx, dx_lora, dA, dB, dbias


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, x_lora):
    """Oracle of ``npu_ft::lora_linear``: returns ``(y [..., out], h [..., r])``."""
    return _forward_reference(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first=False)


def lora_linear_backward_reference(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask):
    """Oracle of ``npu_ft::lora_linear_backward``: ``(dx, dx_lora, dA, dB, dbias)``."""
    return _backward_reference(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask)


def nf4_linear_reference(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, scaling, x_lora):
    """Oracle of ``npu_ft::nf4_linear``: dequantize W to x's dtype, then as PEFT's Linear4bit."""
    weight = _lora_fused.dequantize_weight(packed, absmax, blocksize, weight_shape, x.dtype)
    return _forward_reference(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first=True)


def nf4_linear_backward_reference(
    grad_out, x, packed, absmax, blocksize, weight_shape, lora_A, lora_B, h, scaling, x_lora, output_mask
):
    """Oracle of ``npu_ft::nf4_linear_backward``; dequantizes W again (only when dx is needed)."""
    weight = _lora_fused.dequantize_weight(packed, absmax, blocksize, weight_shape, x.dtype) if output_mask[0] else None
    return _backward_reference(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask)


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------


def _input_for_backward(x: torch.Tensor, lora_A: torch.Tensor | None, x_lora: torch.Tensor | None,
                        needs_dA: bool) -> torch.Tensor:
    """What a LoRA/NF4 linear keeps of its input ``x`` ``[..., in]`` for backward.

    The backward reads x's data only for lora_A's gradient without dropout (``dA = dh^T x``); dx needs
    the weight only, and with dropout dA reads ``x_lora``. Otherwise it keeps a one-element stand-in
    with x's shape, dtype and device (all that the backward kernels read of it then), so that an NF4
    linear without an adapter or a LoRA linear with dropout keeps no ``[..., in]`` copy of its input.
    """
    if lora_A is not None and x_lora is None and needs_dA:
        return x
    return x.new_empty(()).expand(x.shape)


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, x_lora = inputs
    _, h = output
    ctx.scaling = scaling
    ctx.has_x_lora = x_lora is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    kept_x = _input_for_backward(x, lora_A, x_lora, ctx.needs_input_grad[3])
    ctx.save_for_backward(kept_x, weight, lora_A, lora_B, h, x_lora)


def _mask(ctx, i_x, i_bias, i_A, i_B, i_xl):
    n = ctx.needs_input_grad
    return [bool(n[i_x]), bool(n[i_xl]), bool(n[i_A]), bool(n[i_B]), bool(n[i_bias])]


def _lora_linear_backward(ctx, grad_y, grad_h):
    x, weight, lora_A, lora_B, h, x_lora = ctx.saved_tensors
    mask = _mask(ctx, 0, 2, 3, 4, 6)
    dx, dx_lora, dA, dB, dbias = torch.ops.npu_ft.lora_linear_backward(
        grad_y.contiguous(), x, weight, lora_A, lora_B, h, ctx.scaling, x_lora, mask
    )
    return (
        dx if mask[0] else None,
        None,  # the frozen base weight never gets a gradient
        dbias.to(ctx.bias_dtype) if mask[4] else None,
        dA if mask[2] else None,
        dB if mask[3] else None,
        None,
        dx_lora if mask[1] else None,
    )


def _nf4_linear_setup_context(ctx, inputs, output):
    x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, scaling, x_lora = inputs
    _, h = output
    ctx.blocksize = blocksize
    ctx.weight_shape = list(weight_shape)
    ctx.scaling = scaling
    ctx.bias_dtype = None if bias is None else bias.dtype
    kept_x = _input_for_backward(x, lora_A, x_lora, ctx.needs_input_grad[6])
    ctx.save_for_backward(kept_x, packed, absmax, lora_A, lora_B, h, x_lora)


def _nf4_linear_backward(ctx, grad_y, grad_h):
    x, packed, absmax, lora_A, lora_B, h, x_lora = ctx.saved_tensors
    mask = _mask(ctx, 0, 5, 6, 7, 9)
    dx, dx_lora, dA, dB, dbias = torch.ops.npu_ft.nf4_linear_backward(
        grad_y.contiguous(),
        x,
        packed,
        absmax,
        ctx.blocksize,
        ctx.weight_shape,
        lora_A,
        lora_B,
        h,
        ctx.scaling,
        x_lora,
        mask,
    )
    return (
        dx if mask[0] else None,
        None,
        None,
        None,
        None,
        dbias.to(ctx.bias_dtype) if mask[4] else None,
        dA if mask[2] else None,
        dB if mask[3] else None,
        None,
        dx_lora if mask[1] else None,
    )


_registry.register_autograd(LORA_LINEAR, _lora_linear_backward, _lora_linear_setup_context)
_registry.register_autograd(NF4_LINEAR, _nf4_linear_backward, _nf4_linear_setup_context)

# --------------------------------------------------------------------------------------------------
# Python entry points (argument checks, then the op)
# --------------------------------------------------------------------------------------------------


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ weight.T + bias + scaling * (x_lora @ lora_A.T) @ lora_B.T`` with PEFT's semantics.

    Args:
        x: ``[..., in]`` float activations.
        weight: ``[out, in]`` frozen base weight, x's dtype; must not require grad.
        bias: ``[out]`` in x's dtype, or None. Gets a gradient when it requires one.
        lora_A: ``[r, in]``, r >= 1. lora_B: ``[out, r]``, lora_A's dtype (may differ from x's).
        scaling: finite float (alpha / r, or alpha / sqrt(r) for rsLoRA).
        x_lora: ``[..., in]`` in lora_A's dtype: ``dropout(x.to(lora_A.dtype))`` made by the caller,
            or None for no dropout. Its gradient flows back through the caller's dropout.

    Returns:
        ``[..., out]`` in x's dtype.
    """
    check_dense_lora_args(x, weight, bias, lora_A, lora_B, x_lora, "LoRA")
    scaling = check_scaling(scaling)
    y, _ = torch.ops.npu_ft.lora_linear(x, weight, bias, lora_A, lora_B, scaling, x_lora)
    return y


def nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state,
    bias: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 1.0,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """QLoRA linear: ``y = x @ W.T + bias (+ scaling * (x_lora @ lora_A.T) @ lora_B.T)``.

    ``W = dequantize_nf4(packed, state)`` ([out, in]) is rebuilt in x's dtype inside the op, and again
    in backward for dx; it is never stored. Semantics of PEFT's ``lora.Linear4bit`` over bitsandbytes.

    Args:
        x: ``[..., in]`` float activations.
        packed: ``[(out*in+1)//2, 1]`` uint8, bitsandbytes NF4 layout.
        state: :class:`npu_ft.ops.nf4.Nf4QuantState` of a 2-D weight ``[out, in]``.
        bias: ``[out]`` in x's dtype, or None.
        lora_A: ``[r, in]`` / lora_B: ``[out, r]``: both or neither.
        scaling: finite float. x_lora: as in :func:`lora_linear`, only with lora_A/lora_B.

    Returns:
        ``[..., out]`` in x's dtype.
    """
    check_x(x)
    absmax, blocksize, shape = check_nf4_weight(x, packed, state)
    out_features, in_features = shape
    check_bias(bias, x, out_features)
    if (lora_A is None) != (lora_B is None):
        name = "lora_B" if lora_B is None else "lora_A"
        raise ValueError(f"{name}: lora_A and lora_B must be given together")
    if lora_A is not None:
        check_lora(
            x,
            lora_A,
            lora_B,
            x_lora,
            in_features,
            out_features,
            {"packed": packed, "state.absmax": absmax, "bias": bias},
        )
    else:
        if x_lora is not None:
            raise ValueError("x_lora: only meaningful with lora_A / lora_B")
        _checks.check_same_device("x", x, packed=packed, bias=bias, **{"state.absmax": absmax})
    scaling = check_scaling(scaling)
    y, _ = torch.ops.npu_ft.nf4_linear(x, packed, absmax, blocksize, shape, bias, lora_A, lora_B, scaling, x_lora)
    return y
