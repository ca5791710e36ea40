"""Kernels of the LoRA-family ops (``dora_*``, ``lora_fa_*``) shared by the cpu and npu backends:
plain torch calls that map onto BLAS on a CPU and onto aclnn (Mm / Addmm on the cube unit) on an
Ascend NPU; each backend registers them on its own dispatch key.

* DoRA's weight norm never forms ``W + s*B@A``: ``||W_i||^2`` comes in precomputed, the cross
  term is ``rowsum(B * (W @ A.T))`` (one ``[out, in] x [in, r]`` GEMM) and the quadratic term
  ``rowsum((B @ (A @ A.T)) * B)`` (``[out, r]`` work).
* The base GEMM writes ``z`` once (``mm``), the LoRA product is added in place (``addmm_``), and
  ``y = g * z + bias`` is one ``addcmul``; backward scales dy once (``dz = g * dy``) and then runs
  the LoRA gradients on dz with the scaling applied to ``[tokens, r]`` / ``[out, r]`` tensors only.
* NF4 bases are dequantized with ``torch.ops.npu_ft.nf4_dequantize`` (the device's own kernel),
  used, and dropped; backward rebuilds W only when dx is needed.

Where x and the adapters share one dtype everything runs in place in that dtype; otherwise (bf16
base, fp32 adapters) the DoRA epilogue runs in fp32 and rounds once, as the reference does.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._lora_fused import dequantize_weight
from ..dora import returns_z

__all__ = ["KERNELS", "dora_weight_norm_fused"]


def dora_weight_norm_fused(weight, weight_sq_norm, lora_A, lora_B, scaling):
    """``||W + s*B@A||`` per row (fp32 ``[out]``) from ``||W||^2``, ``B (A W^T)`` and ``B (A A^T) B^T``."""
    a_w = lora_A if lora_A.dtype == weight.dtype else lora_A.to(weight.dtype)
    wa = torch.mm(weight, a_w.t()).float()  # [out, r]
    a, b = lora_A.float(), lora_B.float()
    bg = torch.mm(b, torch.mm(a, a.t()))  # [out, r]
    sq = wa.mul_(2.0 * scaling).add_(bg, alpha=scaling * scaling).mul_(b).sum(1)
    return sq.add_(weight_sq_norm.float()).clamp_min_(0.0).sqrt_()


# --------------------------------------------------------------------------------------------------
# shared pieces: the LoRA product and its gradients on [tokens, *] matrices
# --------------------------------------------------------------------------------------------------


def _lora_z(x2, weight, lora_A, lora_B, scaling, xl2):
    """``z = x2 @ W.T + s * (xl2 @ A.T) @ B.T`` ([T, out], promoted dtype) and ``h`` ([T, r], A's dtype)."""
    z = torch.mm(x2, weight.t())
    h = torch.mm(xl2, lora_A.t())
    if lora_A.dtype == z.dtype:
        z.addmm_(h, lora_B.t(), alpha=scaling)
    else:
        z = torch.mm(h, lora_B.t()).mul_(scaling).add_(z)
    return z, h


def _lora_grads(gz, weight_fn, lora_A, lora_B, h2, scaling, xl2, need_dx, lora_into_dx, need_dx_lora, need_dA,
                need_dB):
    """Gradients of ``z = x @ W.T + s * (xl @ A.T) @ B.T`` given ``dz`` ([T, out]).

    Returns ``(dx, dx_lora, dA, dB)`` (None where not asked): ``dx = dz @ W`` (plus the LoRA part
    ``dh @ A`` when ``lora_into_dx``), ``dx_lora = dh @ A`` in A's dtype, ``dh = s * dz @ B``.
    """
    gl = gz if gz.dtype == lora_A.dtype else gz.to(lora_A.dtype)
    dx = dx_lora = dA = dB = None
    dh = torch.mm(gl, lora_B).mul_(scaling)  # [T, r]: cheap next to the [T, out] x [out, in] GEMM
    if need_dB:
        dB = torch.mm(gl.t(), h2).mul_(scaling)
    if need_dA:
        dA = torch.mm(dh.t(), xl2)
    if need_dx_lora:
        dx_lora = torch.mm(dh, lora_A)
    if need_dx:
        dx = torch.mm(gz, weight_fn())
        if lora_into_dx:
            if dx.dtype == lora_A.dtype:
                dx.addmm_(dh, lora_A)
            else:
                dx.add_(torch.mm(dh, lora_A).to(dx.dtype))
    return dx, dx_lora, dA, dB


def _outputs(*tensors, like):
    return tuple(t if t is not None else like.new_empty(0) for t in tensors)


# --------------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------------


def _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora):
    out_features, in_features = weight.shape
    lead = tuple(x.shape[:-1])
    norm = torch.ops.npu_ft.dora_weight_norm(weight, weight_sq_norm, lora_A, lora_B, scaling)
    g = magnitude.float() / norm
    x2 = x.reshape(-1, in_features)
    if x_lora is None:
        xl2, xd2 = (x2 if x2.dtype == lora_A.dtype else x2.to(lora_A.dtype)), x2
    else:
        xl2 = x_lora.reshape(-1, in_features)
        xd2 = xl2.to(x.dtype)
    z, h = _lora_z(xd2, weight, lora_A, lora_B, scaling, xl2)
    keep_z = returns_z(bias, x_lora)
    if z.dtype == torch.float32:
        if bias is not None:
            y = torch.addcmul(bias, z, g)
        else:  # z is not returned without bias and dropout: scale it in place
            y = z * g if keep_z else z.mul_(g)
    else:
        y = z.float() * g
        if bias is not None:
            y.add_(bias.float())
    if x_lora is not None:  # + x @ W.T - x_d @ W.T  (PEFT: the magnitude applies to the dropped input only)
        y.add_(torch.mm(x2, weight.t()).float()).sub_(torch.mm(xd2, weight.t()).float())
    z_out = z.to(x.dtype).view(lead + (out_features,)) if keep_z else x.new_empty(0)
    return y.to(x.dtype).view(lead + (out_features,)), h.view(lead + (lora_A.shape[0],)), z_out, norm


def _dora_backward(grad_out, x, weight_fn, in_features, lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora,
                   has_x_lora, z_is_y, output_mask):
    need_dx, need_dx_lora, need_dA, need_dB, need_dmag, need_dbias = output_mask
    out_features = grad_out.shape[-1]
    lead = tuple(grad_out.shape[:-1])
    g2 = grad_out.reshape(-1, out_features)
    g = magnitude.float() / norm
    gz = g2 * g if g2.dtype == torch.float32 else (g2.float() * g).to(g2.dtype)
    dmag = dbias = None
    if need_dmag:  # z = y / g when y was saved: sum(dy * y) / magnitude
        col = torch.mul(g2, z.reshape(-1, out_features)).float().sum(0)
        dmag = col.div_(magnitude.float() if z_is_y else norm).to(magnitude.dtype)
    if need_dbias:
        dbias = g2.sum(0)
    xl2 = None
    if need_dA:
        xl2 = (x_lora if x_lora is not None else x).reshape(-1, in_features)
        if xl2.dtype != lora_A.dtype:
            xl2 = xl2.to(lora_A.dtype)
    h2 = h.reshape(-1, lora_A.shape[0])
    if not has_x_lora:
        dx, dx_lora, dA, dB = _lora_grads(gz, weight_fn, lora_A, lora_B, h2, scaling, xl2, need_dx, True, False,
                                          need_dA, need_dB)
    else:  # dx = dy @ W (undropped input); dx_lora = ((g - 1) * dy) @ W + dh @ A (no cancellation)
        _, dx_lora, dA, dB = _lora_grads(gz, weight_fn, lora_A, lora_B, h2, scaling, xl2, False, False,
                                         need_dx_lora, need_dA, need_dB)
        weight = weight_fn()
        dx = torch.mm(g2, weight) if need_dx else None
        if dx_lora is not None:
            g_minus_1 = g - 1.0
            gd = g2 * g_minus_1 if g2.dtype == torch.float32 else (g2.float() * g_minus_1).to(g2.dtype)
            dx_lora.add_(torch.mm(gd, weight).to(dx_lora.dtype))
            dx_lora = dx_lora.view(lead + (in_features,))
    if dx is not None:
        dx = dx.view(lead + (in_features,))
    return _outputs(dx, dx_lora, dA, dB, dmag, dbias, like=grad_out)


def dora_linear_fused(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora):
    return _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora)


def dora_linear_backward_fused(grad_out, x, weight, lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora,
                               has_x_lora, z_is_y, output_mask):
    return _dora_backward(grad_out, x, lambda: weight, weight.shape[1], lora_A, lora_B, magnitude, h, z, norm,
                          scaling, x_lora, has_x_lora, z_is_y, output_mask)


def dora_nf4_linear_fused(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, magnitude,
                          weight_sq_norm, scaling, x_lora):
    weight = dequantize_weight(packed, absmax, blocksize, weight_shape, x.dtype)
    return _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora)


def dora_nf4_linear_backward_fused(grad_out, x, packed, absmax, blocksize, weight_shape, lora_A, lora_B, magnitude,
                                   h, z, norm, scaling, x_lora, has_x_lora, z_is_y, output_mask):
    def weight():
        return dequantize_weight(packed, absmax, blocksize, weight_shape, grad_out.dtype)

    return _dora_backward(grad_out, x, weight,
                          int(weight_shape[1]), lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora, has_x_lora,
                          z_is_y, output_mask)


# --------------------------------------------------------------------------------------------------
# LoRA-FA (frozen A): forward as lora_linear, backward from h
# --------------------------------------------------------------------------------------------------


def _lora_fa_forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first):
    out_features, in_features = weight.shape
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, in_features)
    xl2 = x_lora.reshape(-1, in_features) if x_lora is not None else (
        x2 if x2.dtype == lora_A.dtype else x2.to(lora_A.dtype))
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    h = torch.mm(xl2, lora_A.t())
    if lora_A.dtype == y.dtype:
        y.addmm_(h, lora_B.t(), alpha=scaling)
    else:
        branch = torch.mm(h, lora_B.t()).mul_(scaling)
        y.add_(branch.to(y.dtype) if cast_branch_first else branch)  # PEFT Linear4bit vs Linear rounding
    return y.view(lead + (out_features,)), h.view(lead + (lora_A.shape[0],))


def _lora_fa_backward(grad_out, weight_fn, in_features, lora_A, lora_B, h, scaling, has_x_lora, output_mask):
    need_dx, need_dx_lora, need_dB, need_dbias = output_mask
    lead = tuple(grad_out.shape[:-1])
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    dx, dx_lora, _, dB = _lora_grads(g2, weight_fn, lora_A, lora_B, h.reshape(-1, lora_A.shape[0]), scaling, None,
                                     need_dx, not has_x_lora, has_x_lora and need_dx_lora, False, need_dB)
    dx = dx.view(lead + (in_features,)) if dx is not None else None
    dx_lora = dx_lora.view(lead + (in_features,)) if dx_lora is not None else None
    return _outputs(dx, dx_lora, dB, g2.sum(0) if need_dbias else None, like=grad_out)


def lora_fa_linear_fused(x, weight, bias, lora_A, lora_B, scaling, x_lora):
    return _lora_fa_forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first=False)


def lora_fa_linear_backward_fused(grad_out, weight, lora_A, lora_B, h, scaling, has_x_lora, output_mask):
    return _lora_fa_backward(grad_out, lambda: weight, weight.shape[1], lora_A, lora_B, h, scaling, has_x_lora,
                             output_mask)


def lora_fa_nf4_linear_fused(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, scaling, x_lora):
    weight = dequantize_weight(packed, absmax, blocksize, weight_shape, x.dtype)
    return _lora_fa_forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first=True)


def lora_fa_nf4_linear_backward_fused(grad_out, packed, absmax, blocksize, weight_shape, lora_A, lora_B, h, scaling,
                                      has_x_lora, output_mask):
    def weight():
        return dequantize_weight(packed, absmax, blocksize, weight_shape, grad_out.dtype)

    return _lora_fa_backward(grad_out, weight,
                             int(weight_shape[1]), lora_A, lora_B, h, scaling, has_x_lora, output_mask)


KERNELS: _registry.KernelTable = {
    "dora_weight_norm": dora_weight_norm_fused,
    "dora_linear": dora_linear_fused,
    "dora_linear_backward": dora_linear_backward_fused,
    "dora_nf4_linear": dora_nf4_linear_fused,
    "dora_nf4_linear_backward": dora_nf4_linear_backward_fused,
    "lora_fa_linear": lora_fa_linear_fused,
    "lora_fa_linear_backward": lora_fa_linear_backward_fused,
    "lora_fa_nf4_linear": lora_fa_nf4_linear_fused,
    "lora_fa_nf4_linear_backward": lora_fa_nf4_linear_backward_fused,
}
