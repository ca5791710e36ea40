"""npu kernels of the decoder-block ops, calling torch_npu's fused operators where this torch_npu
has them, the pure-torch reference (elementwise aclnn ops) otherwise.

====================  =====================================================  ===========================
op                    torch_npu call                                         when used
====================  =====================================================  ===========================
rms_norm              ``npu_rms_norm(x, weight, epsilon) -> (y, rstd)``      x and weight of one dtype
rms_norm + residual   ``npu_add_rms_norm(x, residual, weight, epsilon)``     the same; else the add, then
                      ``-> (y, rstd, x + residual)``                         ``npu_rms_norm``
rope                  ``npu_rotary_mul(x, cos, sin)`` on the [B, S, N, D]    D a multiple of 64, B and N
                      (or [B, N, S, D]) layout, once for q, once for k;      <= 1000 (the documented
                      backward: ``npu_rotary_mul(g, cos, -swap(sin))``       limits)
swiglu                ``npu_swiglu(cat(gate, up), dim=-1)``                  not on a first-generation
                                                                             Ascend 910 (A2/A3 only)
backward ops          the reference (elementwise aclnn ops): RmsNormGrad
(rms_norm, swiglu)    and SwiGluGrad are reachable only through torch_npu's
                      own autograd, which an op kernel cannot use
====================  =====================================================  ===========================

Versions: ``npu_rms_norm``, ``npu_rotary_mul`` and ``npu_swiglu`` are in torch_npu's API from the
CANN 7.0.0 releases (torch_npu 1.11 / 2.0 / 2.1, i.e. 5.0.0 / 6.0.RC1 and later); ``npu_add_rms_norm``
from CANN 8.0.RC1 (torch_npu 2.1.0.post3 / 6.0.RC1 and later). Each is looked up on the imported
torch_npu module at call time (``sys.modules``: this never imports torch_npu itself), so an older
torch_npu simply runs the reference.

Why ``swap(sin)``: ``rot`` (``cat(-x2, x1)``) is a rotation, so ``rot^T(g * sin) = rot(g) * t`` with
``t = -cat(sin2, sin1)``; the backward pass is therefore ``npu_rotary_mul`` again with ``t`` for
``sin`` (cos/sin are [B, S, D]: building ``t`` costs nothing per head).

Verified: against the reference on the test suite's fake npu device with a stand-in ``torch_npu``
implementing the documented signatures in plain torch, which checks the calls, not the NPU's
arithmetic; real Ascend hardware only where ``npu-ft doctor`` / the ``ascend``-marked tests ran.
"""

from __future__ import annotations

import sys

import torch

from ... import _registry
from ... import rms_norm as _rms_norm
from ... import rope as _rope
from ... import swiglu as _swiglu

__all__ = ["KERNELS"]

#: device names (the npu backend's device_name()) without the SwiGlu kernel (torch_npu documents it for
#: Atlas A2/A3 training products only)
_NO_SWIGLU = ("Ascend910A", "Ascend910ProA", "Ascend910PremiumA", "Ascend910ProB", "Ascend310")


def _torch_npu_op(name: str):
    """torch_npu's ``<name>`` if torch_npu is imported and has it, else None."""
    module = sys.modules.get("torch_npu")
    return getattr(module, name, None) if module is not None else None


def rms_norm_npu(x, weight, eps, residual):
    add_norm, norm = _torch_npu_op("npu_add_rms_norm"), _torch_npu_op("npu_rms_norm")
    if weight.dtype != x.dtype or x.numel() == 0 or (norm is None and add_norm is None):
        return _rms_norm.rms_norm_reference(x, weight, eps, residual)
    if residual is not None and add_norm is not None:
        y, rstd, h = add_norm(x, residual, weight, eps)
    else:
        h = x + residual if residual is not None else x
        if norm is None:
            return _rms_norm.rms_norm_reference(x, weight, eps, residual)
        y, rstd = norm(h, weight, epsilon=eps)
    out_h = h if residual is not None else x.new_empty(0)
    return y, out_h, rstd.reshape(x.shape[:-1]).to(torch.float32)


def _rotary(x, cos, sin, rotary_mul):
    """``rotary_mul`` on x [B, N, S, D] in the layout its memory has ([B, S, N, D] or [B, N, S, D])."""
    batch, heads, _, dim = x.shape
    if rotary_mul is None or dim % 64 or batch > 1000 or heads > 1000 or x.numel() == 0:
        return None
    bsnd = x.transpose(1, 2)
    if bsnd.is_contiguous():
        return rotary_mul(bsnd, cos.unsqueeze(2), sin.unsqueeze(2)).transpose(1, 2)
    out = torch.empty_like(x, memory_format=torch.preserve_format)
    out.copy_(rotary_mul(x.contiguous(), cos.unsqueeze(1), sin.unsqueeze(1)))
    return out


def _rope_pair(q, k, cos, sin, transpose: bool):
    rotary_mul = _torch_npu_op("npu_rotary_mul")
    second = sin
    if transpose:  # g * cos + rot(g) * (-swap(sin)) == g * cos + rot^T(g * sin)
        half = sin.shape[-1] // 2
        second = -torch.cat((sin[..., half:], sin[..., :half]), dim=-1)
    outs = [_rotary(x, cos, second, rotary_mul) for x in (q, k)]
    if outs[0] is None or outs[1] is None:
        reference = _rope.rope_backward_reference if transpose else _rope.rope_reference
        return reference(q, k, cos, sin)
    return outs[0], outs[1]


def rope_npu(q, k, cos, sin):
    return _rope_pair(q, k, cos, sin, transpose=False)


def rope_backward_npu(grad_q, grad_k, cos, sin):
    return _rope_pair(grad_q, grad_k, cos, sin, transpose=True)


def _has_swiglu_kernel() -> bool:
    """Whether this chip has the SwiGlu kernel (a chip whose name is unknown is assumed to have it)."""
    from npu_ft.device import all_backends

    return not all_backends()["npu"].device_name().startswith(_NO_SWIGLU)


def swiglu_npu(gate, up):
    npu_swiglu = _torch_npu_op("npu_swiglu")
    if npu_swiglu is None or gate.numel() == 0 or not _has_swiglu_kernel():
        return _swiglu.swiglu_reference(gate, up)
    return npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)


KERNELS: _registry.KernelTable = {
    "rms_norm": rms_norm_npu,
    "rms_norm_backward": _rms_norm.rms_norm_backward_reference,
    "rope": rope_npu,
    "rope_backward": rope_backward_npu,
    "swiglu": swiglu_npu,
    "swiglu_backward": _swiglu.swiglu_backward_reference,
}
