"""DoRA linear ops: ``dora_linear`` (dense base) and ``dora_nf4_linear`` (QDoRA: NF4 base), plus
``dora_weight_norm`` (the detached row norm of ``W + s*B@A``).

Math (``...`` = batch dims, ``in``/``out`` = features, ``r`` = rank, ``T`` = tokens)::

    x          [..., in]   activations, dtype X         weight  [out, in]  frozen, X (dense op)
    lora_A     [r, in]     dtype L                      lora_B  [out, r]   dtype L
    magnitude  [out]       trainable (PEFT lora_magnitude_vector)
    weight_sq_norm [out]   ||W_i||^2 in fp32, computed once for a frozen base (see weight_sq_norm())
    x_lora     [..., in]   optional dropout(x) in dtype L (None = no dropout)

    norm = || W + s * B @ A ||_row                      (detached: no gradient flows through it)
    g    = magnitude / norm                              [out], fp32
    h    = x_lora @ A.T                                  [..., r]
    z    = x_lora @ W.T + s * h @ B.T                    [..., out]  (x_lora = x without dropout)
    y    = g * z + bias + (x - x_lora) @ W.T             [..., out]  in X

which is PEFT's ``DoraLinearLayer`` forward (with dropout, PEFT applies the magnitude to the dropped
input's base product and adds the undropped base output). The backend kernels never form the
``[out, in]`` matrix ``W + s*B@A``::

    norm_i^2 = ||W_i||^2 + 2 s * sum_k B_ik (W A^T)_ik + s^2 * sum_k (B (A A^T))_ik B_ik

which costs one ``[out, in] x [in, r]`` product and ``O(out * r)`` memory; the reference kernels do
form it (in fp32), so tests compare the two. All DoRA arithmetic on ``g`` is fp32; ``y`` and the
saved ``z`` are rounded to X once.

Each op returns ``(y, h, z, norm)``: ``z`` (X, ``[..., out]``) and ``norm`` are saved for backward
(``dmagnitude = sum_T(dy * z) / norm``). Without bias and dropout ``z = y / g`` exactly up to
rounding, so the op returns an empty ``z`` and backward keeps ``y`` instead
(``dmagnitude = sum_T(dy * y) / magnitude``): y is the tensor the next op (SiLU, the gating product)
keeps anyway in a Qwen MLP, so DoRA's gate/up projections cost no activation memory beyond LoRA's.
Backward saves x and x_lora only when lora_A needs a gradient (with A frozen - LoRA-FA - it keeps h,
not x). The NF4 op dequantizes W to X inside the op
(and again in backward when dx is needed); ``weight_sq_norm`` is then that of the dequantized W.
"""

from __future__ import annotations

import torch

from . import _checks, _registry
from ._lora_fused import dequantize_weight
from ._weight_args import check_dense_lora_args, check_nf4_lora_args, check_scaling

__all__ = [
    "dora_linear",
    "dora_nf4_linear",
    "weight_sq_norm",
    "dora_weight_norm_reference",
    "dora_linear_reference",
    "dora_linear_backward_reference",
    "dora_nf4_linear_reference",
    "dora_nf4_linear_backward_reference",
]

# --------------------------------------------------------------------------------------------------
# schemas
# --------------------------------------------------------------------------------------------------

DORA_WEIGHT_NORM = _registry.define(
    "dora_weight_norm(Tensor weight, Tensor weight_sq_norm, Tensor lora_A, Tensor lora_B, float scaling) -> Tensor"
)
DORA_LINEAR = _registry.define(
    "dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
    "Tensor weight_sq_norm, float scaling, Tensor? x_lora) -> (Tensor, Tensor, Tensor, Tensor)"
)
# output_mask = [dx, dx_lora, dA, dB, dmagnitude, dbias]; x / x_lora may be None when dA is not asked;
# z_is_y: ``z`` holds the forward's y (no bias, no dropout: the forward returned an empty z)
DORA_LINEAR_BACKWARD = _registry.define(
    "dora_linear_backward(Tensor grad_out, Tensor? x, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor magnitude, Tensor h, Tensor z, Tensor norm, float scaling, Tensor? x_lora, bool has_x_lora, "
    "bool z_is_y, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
DORA_NF4_LINEAR = _registry.define(
    "dora_nf4_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, SymInt[] weight_shape, Tensor? bias, "
    "Tensor lora_A, Tensor lora_B, Tensor magnitude, Tensor weight_sq_norm, float scaling, Tensor? x_lora) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
DORA_NF4_LINEAR_BACKWARD = _registry.define(
    "dora_nf4_linear_backward(Tensor grad_out, Tensor? x, Tensor packed, Tensor absmax, int blocksize, "
    "SymInt[] weight_shape, Tensor lora_A, Tensor lora_B, Tensor magnitude, Tensor h, Tensor z, Tensor norm, "
    "float scaling, Tensor? x_lora, bool has_x_lora, bool z_is_y, bool[6] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

# --------------------------------------------------------------------------------------------------
# fake kernels
# --------------------------------------------------------------------------------------------------


def _weight_norm_fake(weight, weight_sq_norm, lora_A, lora_B, scaling):
    return weight.new_empty(weight.shape[0], dtype=torch.float32)


def returns_z(bias, x_lora) -> bool:
    """Whether the forward returns z (else an empty tensor: backward keeps y, see the module docstring)."""
    return bias is not None or x_lora is not None


def _forward_fake(x, out_features, lora_A, bias, x_lora):
    lead = tuple(x.shape[:-1])
    y = x.new_empty(lead + (out_features,))
    z = x.new_empty(lead + (out_features,)) if returns_z(bias, x_lora) else x.new_empty(0)
    return y, lora_A.new_empty(lead + (lora_A.shape[0],)), z, x.new_empty(out_features, dtype=torch.float32)


def _backward_fake(grad_out, in_features, lora_A, lora_B, magnitude, has_x_lora, output_mask, bias_dtype=None):
    lead = tuple(grad_out.shape[:-1])
    empty = grad_out.new_empty(0)
    dx = grad_out.new_empty(lead + (in_features,)) if output_mask[0] else empty
    dx_lora = lora_A.new_empty(lead + (in_features,)) if (output_mask[1] and has_x_lora) else grad_out.new_empty(0)
    dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format) if output_mask[2] else grad_out.new_empty(0)
    dB = torch.empty_like(lora_B, memory_format=torch.contiguous_format) if output_mask[3] else grad_out.new_empty(0)
    dmag = torch.empty_like(magnitude, memory_format=torch.contiguous_format) if output_mask[4] else grad_out.new_empty(
        0)
    dbias = grad_out.new_empty(grad_out.shape[-1]) if output_mask[5] else grad_out.new_empty(0)
    return dx, dx_lora, dA, dB, dmag, dbias


def _dora_linear_fake(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora):
    return _forward_fake(x, weight.shape[0], lora_A, bias, x_lora)


def _dora_linear_backward_fake(grad_out, x, weight, lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora,
                               has_x_lora, z_is_y, output_mask):
    return _backward_fake(grad_out, weight.shape[1], lora_A, lora_B, magnitude, has_x_lora, output_mask)


def _dora_nf4_linear_fake(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, magnitude,
                          weight_sq_norm, scaling, x_lora):
    return _forward_fake(x, weight_shape[0], lora_A, bias, x_lora)


def _dora_nf4_linear_backward_fake(grad_out, x, packed, absmax, blocksize, weight_shape, lora_A, lora_B, magnitude,
                                   h, z, norm, scaling, x_lora, has_x_lora, z_is_y, output_mask):
    return _backward_fake(grad_out, weight_shape[1], lora_A, lora_B, magnitude, has_x_lora, output_mask)


_registry.register_fake(DORA_WEIGHT_NORM, _weight_norm_fake)
_registry.register_fake(DORA_LINEAR, _dora_linear_fake)
_registry.register_fake(DORA_LINEAR_BACKWARD, _dora_linear_backward_fake)
_registry.register_fake(DORA_NF4_LINEAR, _dora_nf4_linear_fake)
_registry.register_fake(DORA_NF4_LINEAR_BACKWARD, _dora_nf4_linear_backward_fake)

# --------------------------------------------------------------------------------------------------
# reference kernels (pure torch, any device; these DO form W + s*B@A, in fp32)
# --------------------------------------------------------------------------------------------------


def dora_weight_norm_reference(weight, weight_sq_norm, lora_A, lora_B, scaling):
    """``||W + s * B @ A||`` per row, fp32 ``[out]``, from the materialized fp32 matrix
    (``weight_sq_norm`` is not used: the reference is the definition)."""
    full = weight.float() + scaling * (lora_B.float() @ lora_A.float())
    return torch.linalg.vector_norm(full, dim=1)


def _forward_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora):
    norm = dora_weight_norm_reference(weight, None, lora_A, lora_B, scaling)
    g = magnitude.float() / norm
    xl = x.to(lora_A.dtype) if x_lora is None else x_lora
    h = torch.nn.functional.linear(xl, lora_A)
    xd = x if x_lora is None else x_lora.to(x.dtype)
    z = torch.nn.functional.linear(xd, weight).float() + scaling * torch.nn.functional.linear(h, lora_B).float()
    y = g * z
    if x_lora is not None:  # PEFT: the undropped base output minus the dropped one's
        y = y + torch.nn.functional.linear(x, weight).float() - torch.nn.functional.linear(xd, weight).float()
    if bias is not None:
        y = y + bias.float()
    z = z.to(x.dtype) if returns_z(bias, x_lora) else x.new_empty(0)
    return y.to(x.dtype), h, z, norm


def _backward_reference(grad_out, x, weight, lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora, has_x_lora,
                        z_is_y, output_mask):
    need_dx, need_dx_lora, need_dA, need_dB, need_dmag, need_dbias = output_mask
    in_features, out_features = weight.shape[1], weight.shape[0]
    gy = grad_out.reshape(-1, out_features).float()
    g = magnitude.float() / norm
    gz = gy * g
    W, A, B = weight.float(), lora_A.float(), lora_B.float()
    dh = scaling * (gz @ B)  # [T, r]
    lead = tuple(grad_out.shape[:-1])
    outs = [grad_out.new_empty(0) for _ in range(6)]
    if need_dx:
        dx = (gy if has_x_lora else gz) @ W
        if not has_x_lora:
            dx = dx + dh @ A
        outs[0] = dx.to(grad_out.dtype).reshape(lead + (in_features,))
    if need_dx_lora and has_x_lora:
        outs[1] = ((gz - gy) @ W + dh @ A).to(lora_A.dtype).reshape(lead + (in_features,))
    if need_dA:
        xl = (x if x_lora is None else x_lora).reshape(-1, in_features).float()
        outs[2] = (dh.t() @ xl).to(lora_A.dtype)
    if need_dB:
        outs[3] = (scaling * gz.t() @ h.reshape(-1, lora_A.shape[0]).float()).to(lora_B.dtype)
    if need_dmag:  # sum(dy * z) / norm, or with y saved (z = y / g): sum(dy * y) / magnitude
        col = (gy * z.reshape(-1, out_features).float()).sum(0)
        outs[4] = (col / (magnitude.float() if z_is_y else norm)).to(magnitude.dtype)
    if need_dbias:
        outs[5] = gy.sum(0).to(grad_out.dtype)
    return tuple(outs)


def dora_linear_reference(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora):
    """Pure-torch ``npu_ft::dora_linear``: ``(y, h, z, norm)`` (see the module docstring)."""
    return _forward_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora)


def dora_linear_backward_reference(grad_out, x, weight, lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora,
                                   has_x_lora, z_is_y, output_mask):
    """Pure-torch ``npu_ft::dora_linear_backward``: ``(dx, dx_lora, dA, dB, dmagnitude, dbias)``."""
    return _backward_reference(grad_out, x, weight, lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora,
                               has_x_lora, z_is_y, output_mask)


def dora_nf4_linear_reference(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, magnitude,
                              weight_sq_norm, scaling, x_lora):
    """Pure-torch ``npu_ft::dora_nf4_linear``: W dequantized to x's dtype, then as :func:`dora_linear_reference`."""
    weight = dequantize_weight(packed, absmax, blocksize, weight_shape, x.dtype)
    return _forward_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora)


def dora_nf4_linear_backward_reference(grad_out, x, packed, absmax, blocksize, weight_shape, lora_A, lora_B,
                                       magnitude, h, z, norm, scaling, x_lora, has_x_lora, z_is_y, output_mask):
    """Pure-torch ``npu_ft::dora_nf4_linear_backward``."""
    weight = dequantize_weight(packed, absmax, blocksize, weight_shape, grad_out.dtype)
    return _backward_reference(grad_out, x, weight, lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora,
                               has_x_lora, z_is_y, output_mask)


_registry.register_reference(DORA_WEIGHT_NORM, dora_weight_norm_reference)
_registry.register_reference(DORA_LINEAR, dora_linear_reference)
_registry.register_reference(DORA_LINEAR_BACKWARD, dora_linear_backward_reference)
_registry.register_reference(DORA_NF4_LINEAR, dora_nf4_linear_reference)
_registry.register_reference(DORA_NF4_LINEAR_BACKWARD, dora_nf4_linear_backward_reference)

# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------


def _save(ctx, x, lora_A, lora_B, magnitude, x_lora, output, frozen: tuple) -> None:
    """Save what backward needs: x / x_lora only when lora_A trains (LoRA-FA keeps h, not x); y in
    place of an empty z (no bias, no dropout)."""
    y, h, z, norm = output
    keep_x = lora_A.requires_grad
    ctx.has_x_lora = x_lora is not None
    ctx.z_is_y = z.numel() == 0 and y.numel() > 0
    ctx.save_for_backward(x if keep_x else None, x_lora if keep_x else None, lora_A, lora_B, magnitude, h,
                          y if ctx.z_is_y else z, norm, *frozen)


def _mask(ctx, i_x, i_bias, i_A, i_B, i_mag, i_xl):
    n = ctx.needs_input_grad
    return [bool(n[i_x]), bool(n[i_xl]), bool(n[i_A]), bool(n[i_B]), bool(n[i_mag]), bool(n[i_bias])]


def _dora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora = inputs
    ctx.scaling = scaling
    ctx.bias_dtype = None if bias is None else bias.dtype
    _save(ctx, x, lora_A, lora_B, magnitude, x_lora, output, (weight,))


def _dora_linear_backward(ctx, grad_y, grad_h, grad_z, grad_norm):
    x, x_lora, lora_A, lora_B, magnitude, h, z, norm, weight = ctx.saved_tensors
    mask = _mask(ctx, 0, 2, 3, 4, 5, 8)
    dx, dx_lora, dA, dB, dmag, dbias = torch.ops.npu_ft.dora_linear_backward(
        grad_y.contiguous(), x, weight, lora_A, lora_B, magnitude, h, z, norm, ctx.scaling, x_lora, ctx.has_x_lora,
        ctx.z_is_y, mask)
    return (dx if mask[0] else None, None, dbias.to(ctx.bias_dtype) if mask[5] else None, dA if mask[2] else None,
            dB if mask[3] else None, dmag if mask[4] else None, None, None, dx_lora if mask[1] else None)


def _dora_nf4_linear_setup_context(ctx, inputs, output):
    (x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling,
     x_lora) = inputs
    ctx.blocksize = blocksize
    ctx.weight_shape = list(weight_shape)
    ctx.scaling = scaling
    ctx.bias_dtype = None if bias is None else bias.dtype
    _save(ctx, x, lora_A, lora_B, magnitude, x_lora, output, (packed, absmax))


def _dora_nf4_linear_backward(ctx, grad_y, grad_h, grad_z, grad_norm):
    x, x_lora, lora_A, lora_B, magnitude, h, z, norm, packed, absmax = ctx.saved_tensors
    mask = _mask(ctx, 0, 5, 6, 7, 8, 11)
    dx, dx_lora, dA, dB, dmag, dbias = torch.ops.npu_ft.dora_nf4_linear_backward(
        grad_y.contiguous(), x, packed, absmax, ctx.blocksize, ctx.weight_shape, lora_A, lora_B, magnitude, h, z,
        norm, ctx.scaling, x_lora, ctx.has_x_lora, ctx.z_is_y, mask)
    return (dx if mask[0] else None, None, None, None, None, dbias.to(ctx.bias_dtype) if mask[5] else None,
            dA if mask[2] else None, dB if mask[3] else None, dmag if mask[4] else None, None, None,
            dx_lora if mask[1] else None)


def _no_grad_backward(ctx, grad_norm):
    return None, None, None, None, None  # DoRA's norm is detached: no gradient reaches W, A or B through it


_registry.register_autograd(DORA_WEIGHT_NORM, _no_grad_backward, lambda ctx, inputs, output: None)
_registry.register_autograd(DORA_LINEAR, _dora_linear_backward, _dora_linear_setup_context)
_registry.register_autograd(DORA_NF4_LINEAR, _dora_nf4_linear_backward, _dora_nf4_linear_setup_context)

# --------------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def weight_sq_norm(weight: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """``||W_i||^2`` per row, fp32 ``[out]``, without an fp32 copy of a low-precision ``weight``
    (``rows_per_chunk`` rows at a time). Compute it once for a frozen base weight."""
    _checks.check_tensor("weight", weight, _checks.FLOAT_DTYPES, ndim=2)
    out = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = weight[start:start + rows_per_chunk].float()
        out[start:start + rows.shape[0]] = (rows * rows).sum(1)
    return out


def _check_dora(x, lora_A, magnitude, weight_sq_norm, out_features: int) -> None:
    _checks.check_tensor("magnitude", magnitude, _checks.FLOAT_DTYPES, ndim=1)
    _checks.check_dim("magnitude", magnitude.shape[0], out_features, "length (out_features)")
    _checks.check_tensor("weight_sq_norm", weight_sq_norm, _checks.FLOAT_DTYPES, ndim=1)
    _checks.check_dim("weight_sq_norm", weight_sq_norm.shape[0], out_features, "length (out_features)")
    _checks.check_same_device("x", x, magnitude=magnitude, weight_sq_norm=weight_sq_norm)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_sq_norm: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA: ``y = magnitude / ||W + s*B@A||_row * (x @ W.T + s * (x @ A.T) @ B.T) + bias`` (PEFT's math).

    Args:
        x: ``[..., in]`` float activations. weight: ``[out, in]`` frozen, x's dtype. bias: ``[out]`` or None.
        lora_A: ``[r, in]``; lora_B: ``[out, r]`` (lora_A's dtype).
        magnitude: ``[out]`` (PEFT's ``lora_magnitude_vector``).
        weight_sq_norm: ``[out]`` ``||W_i||^2`` (:func:`weight_sq_norm` of ``weight``, computed once).
        scaling: finite float. x_lora: ``dropout(x.to(lora_A.dtype))`` or None (no dropout).

    Returns:
        ``[..., out]`` in x's dtype. The norm is detached (DoRA paper section 4.3, PEFT).
    """
    out_features, _ = check_dense_lora_args(x, weight, bias, lora_A, lora_B, x_lora, "DoRA")
    _check_dora(x, lora_A, magnitude, weight_sq_norm, out_features)
    scaling = check_scaling(scaling)
    y, _, _, _ = torch.ops.npu_ft.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling,
                                              x_lora)
    return y


def dora_nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_sq_norm: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """QDoRA: :func:`dora_linear` over an NF4 base (``packed`` + ``state`` as in
    :func:`npu_ft.ops.lora.nf4_linear`); W is dequantized to x's dtype inside the op, never kept.
    ``weight_sq_norm`` is ``||W_i||^2`` of the dequantized weight."""
    absmax, blocksize, shape = check_nf4_lora_args(x, packed, state, bias, lora_A, lora_B, x_lora)
    _check_dora(x, lora_A, magnitude, weight_sq_norm, shape[0])
    scaling = check_scaling(scaling)
    y, _, _, _ = torch.ops.npu_ft.dora_nf4_linear(x, packed, absmax, blocksize, shape, bias, lora_A, lora_B, magnitude,
                                                  weight_sq_norm, scaling, x_lora)
    return y


# --------------------------------------------------------------------------------------------------
# npu-ft doctor rows
# --------------------------------------------------------------------------------------------------


def _doctor_reference(x, lora_A, lora_B, magnitude, weight, bias, scaling):
    """DoRA in plain fp32 torch with the norm detached (what autograd of the op must give)."""
    with torch.no_grad():
        norm = dora_weight_norm_reference(weight, None, lora_A, lora_B, scaling)
    z = torch.nn.functional.linear(x, weight) + scaling * torch.nn.functional.linear(
        torch.nn.functional.linear(x, lora_A), lora_B)
    return (magnitude / norm) * z + bias


def _doctor_inputs(seed: int) -> dict:
    from ._doctor_rows import linear_inputs

    t = linear_inputs(seed)
    t["magnitude"] = torch.linalg.vector_norm(t["weight"], dim=1) * 1.25
    return t


_TRAINABLE = ("x", "lora_A", "lora_B", "magnitude")


def _doctor_dense(device, dtype):
    from ._doctor_rows import compare

    t = _doctor_inputs(6)

    def op_fn(x, lora_A, lora_B, magnitude, weight, bias, scaling):
        return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm(weight), scaling)

    return compare(device, dtype, op_fn, _doctor_reference, t, _TRAINABLE,
                   {"weight": t["weight"], "bias": t["bias"], "scaling": 2.0})


def _doctor_nf4(device, dtype):
    from ._doctor_rows import compare, nf4_base

    t = _doctor_inputs(7)
    _, _, dense, packed, state = nf4_base(t["weight"], device)
    wsq = weight_sq_norm(dense).to(device)

    def ref_fn(x, lora_A, lora_B, magnitude, bias, scaling):
        return _doctor_reference(x, lora_A, lora_B, magnitude, dense, bias, scaling)

    def op_fn(x, lora_A, lora_B, magnitude, bias, scaling):
        return dora_nf4_linear(x, packed, state, bias, lora_A, lora_B, magnitude, wsq, scaling)

    return compare(device, dtype, op_fn, ref_fn, t, _TRAINABLE, {"bias": t["bias"], "scaling": 2.0})


def doctor_checks(dtypes=(torch.float32, torch.bfloat16)) -> list:
    """``npu-ft doctor`` rows of the DoRA ops (forward + backward of ``dora_linear`` / ``dora_nf4_linear``
    on the device against fp32 torch on the CPU, norm detached): keyword arguments of ``npu_ft.doctor.Check``."""
    from ._doctor_rows import rows

    return rows(dtypes, ("dora_linear", _doctor_dense, ("dora_linear", "dora_linear_backward", "dora_weight_norm")),
                ("dora_nf4_linear", _doctor_nf4, ("dora_nf4_linear", "dora_nf4_linear_backward", "dora_weight_norm")))
