"""cpu kernels of the decoder-block ops (``rms_norm``, ``rope``, ``swiglu`` and their backward ops).

They allocate the outputs and call the native primitives of ``npu_ft/csrc/cpu/block_ops.cpp``
(one pass over the data per op, float32 arithmetic, AVX2 where the CPU has it, rows split over
torch's intra-op threads). Where the native kernels are unavailable (no compiler,
``NPU_FT_CPU_NATIVE=0``) or for a dtype pair they do not cover, the op's pure-torch reference
kernel runs instead.
"""

from __future__ import annotations

import torch

from ... import _checks, _registry
from ... import rms_norm as _rms_norm
from ... import rope as _rope
from ... import swiglu as _swiglu
from . import _native

__all__ = ["KERNELS"]

#: rows per partial sum of the rms_norm weight gradient (kRowsPerChunk in block_ops.cpp)
_ROWS_PER_CHUNK = 64


def _native_norm(x_dtype: torch.dtype, weight_dtype: torch.dtype):
    """The native ops if they cover this (x, weight) dtype pair: equal, or a float32 weight."""
    if x_dtype not in _checks.FLOAT_DTYPES or not (weight_dtype == x_dtype or weight_dtype == torch.float32):
        return None
    return _native.native_ops()


def _native_float(dtype: torch.dtype):
    return _native.native_ops() if dtype in _checks.FLOAT_DTYPES else None


def rms_norm_cpu(x, weight, eps, residual):
    ops = _native_norm(x.dtype, weight.dtype)
    if ops is None or x.numel() == 0:
        return _rms_norm.rms_norm_reference(x, weight, eps, residual)
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=_rms_norm.output_dtype(x.dtype, weight.dtype))
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32)
    ops.rms_norm(x, None if residual is None else residual.contiguous(), weight.contiguous(), eps, y, h, rstd)
    return y, h, rstd


def rms_norm_backward_cpu(grad_y, grad_h, h, weight, rstd, output_mask):
    ops = _native_norm(h.dtype, weight.dtype)
    if ops is None or h.numel() == 0 or grad_y.dtype != _rms_norm.output_dtype(h.dtype, weight.dtype):
        return _rms_norm.rms_norm_backward_reference(grad_y, grad_h, h, weight, rstd, output_mask)
    hidden = h.shape[-1]
    rows = h.numel() // hidden
    dx = torch.empty(h.shape, dtype=h.dtype) if output_mask[0] else h.new_empty(0)
    chunks = -(-rows // _ROWS_PER_CHUNK)
    partials = torch.empty((chunks, hidden), dtype=torch.float32) if output_mask[1] else rstd.new_empty(0)
    ops.rms_norm_backward(grad_y.contiguous(), None if grad_h is None else grad_h.contiguous(), h.contiguous(),
                          weight.contiguous(), rstd.contiguous(), dx, partials)
    dweight = partials.sum(0).to(weight.dtype) if output_mask[1] else weight.new_empty(0)
    return dx, dweight


def _rope_pair(q, k, cos, sin, transpose: bool):
    ops = _native_float(q.dtype)
    if ops is None or q.stride(-1) != 1 or k.stride(-1) != 1:
        reference = _rope.rope_backward_reference if transpose else _rope.rope_reference
        return reference(q, k, cos, sin)
    cos, sin = cos.contiguous(), sin.contiguous()
    outs = []
    for x in (q, k):
        out = torch.empty_like(x, memory_format=torch.preserve_format)
        if x.numel():
            ops.rope(x, cos, sin, transpose, out)
        outs.append(out)
    return outs[0], outs[1]


def rope_cpu(q, k, cos, sin):
    return _rope_pair(q, k, cos, sin, transpose=False)


def rope_backward_cpu(grad_q, grad_k, cos, sin):
    return _rope_pair(grad_q, grad_k, cos, sin, transpose=True)


def swiglu_cpu(gate, up):
    ops = _native_float(gate.dtype)
    if ops is None:
        return _swiglu.swiglu_reference(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype)
    if gate.numel():
        ops.swiglu(gate.contiguous(), up.contiguous(), out)
    return out


def swiglu_backward_cpu(grad, gate, up, output_mask):
    ops = _native_float(gate.dtype)
    if ops is None:
        return _swiglu.swiglu_backward_reference(grad, gate, up, output_mask)
    dgate = torch.empty(gate.shape, dtype=gate.dtype) if output_mask[0] else gate.new_empty(0)
    dup = torch.empty(up.shape, dtype=up.dtype) if output_mask[1] else up.new_empty(0)
    if gate.numel() and (output_mask[0] or output_mask[1]):
        ops.swiglu_backward(grad.contiguous(), gate.contiguous(), up.contiguous(), dgate, dup)
    return dgate, dup


KERNELS: _registry.KernelTable = {
    "rms_norm": rms_norm_cpu,
    "rms_norm_backward": rms_norm_backward_cpu,
    "rope": rope_cpu,
    "rope_backward": rope_backward_cpu,
    "swiglu": swiglu_cpu,
    "swiglu_backward": swiglu_backward_cpu,
}
