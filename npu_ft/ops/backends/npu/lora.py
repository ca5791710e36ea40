"""npu kernels of ``lora_linear`` / ``nf4_linear`` and their backward ops (Ascend, via torch_npu).

How the work maps onto an Ascend NPU: every GEMM goes to the cube unit as one ``aclnnAddmm`` /
``aclnnMm`` call on 2-D operands (``[tokens, in]`` by ``[in, out]``); the frozen weight is passed as
the transposed view ``weight.t()`` (aclnn reads the transpose flag from the strides, no copy). The
bias is fused into the base GEMM (``addmm``), and the LoRA product is accumulated into the base
output in place (``addmm_(h, B.t(), alpha=scaling)``), so a full-size ``[tokens, out]`` tensor is
written once and the scaling only ever touches small ``[tokens, r]`` / ``[out, r]`` tensors.

Why no torch_npu-specific fused op: torch_npu has no LoRA GEMM (its fused matmuls -
``npu_weight_quant_batchmatmul``, ``npu_quant_matmul`` - take affine int8/int4 weights with scale
and offset, which cannot express NF4's 16 non-uniform levels), and aclnn's Addmm already fuses
bias and alpha. So these kernels are plain torch ops that torch_npu lowers to aclnn; the NF4 base
weight is rebuilt by the LUT dequantize of :mod:`npu_ft.ops.backends.npu.nf4` in x's dtype, used
for one GEMM and dropped (backward rebuilds it only when dx is needed).

Dtype semantics are exactly the reference's (PEFT): the LoRA branch runs in lora_A's dtype; for
``lora_linear`` it is added in the promoted dtype and the sum rounded to x's dtype, for
``nf4_linear`` (PEFT's Linear4bit) the branch is rounded to x's dtype first.

Verified: on the test suite's fake npu device (CPU memory, CPU kernels) against the reference;
on real Ascend hardware only by ``npu-ft doctor`` / the ``ascend``-marked tests where one ran.
"""

from __future__ import annotations

import torch

from ... import _registry

__all__ = [
    "lora_linear_npu",
    "lora_linear_backward_npu",
    "nf4_linear_npu",
    "nf4_linear_backward_npu",
    "register",
]


def _rows(t: torch.Tensor, features: int) -> torch.Tensor:
    """``t`` as a 2-D ``[tokens, features]`` operand (a view when possible)."""
    return t.reshape(-1, features)


def _forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first):
    out_features, in_features = weight.shape
    lead = tuple(x.shape[:-1])
    x2 = _rows(x, in_features)
    # base GEMM with the bias fused in (cube unit)
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    if lora_A is None:
        return y.view(lead + (out_features,)), x.new_empty(0)
    r = lora_A.shape[0]
    if x_lora is not None:
        xl2 = _rows(x_lora, in_features)
    else:
        xl2 = x2 if x2.dtype == lora_A.dtype else x2.to(lora_A.dtype)
    h = torch.mm(xl2, lora_A.t())  # [tokens, r]
    if lora_A.dtype == y.dtype:
        y.addmm_(h, lora_B.t(), alpha=scaling)  # one fused GEMM-accumulate, no full-size temporaries
    else:
        branch = torch.mm(h, lora_B.t()).mul_(scaling)
        # in place either way: TensorIterator adds in the promoted dtype and rounds once to y's
        y.add_(branch.to(y.dtype) if cast_branch_first else branch)
    return y.view(lead + (out_features,)), h.view(lead + (r,))


def _backward(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask):
    need_dx, need_dx_lora, need_dA, need_dB, need_dbias = (bool(m) for m in output_mask)
    in_features = x.shape[-1]
    g2 = _rows(grad_out, grad_out.shape[-1])
    dx = dx_lora = dA = dB = dbias = None
    dh = None
    if lora_A is not None:
        r = lora_A.shape[0]
        gl = g2 if g2.dtype == lora_A.dtype else g2.to(lora_A.dtype)
        if need_dB:
            # dB = scaling * g^T h: scale the [tokens, r] operand, not the [out, r] result twice
            dB = torch.mm(gl.t(), _rows(h, r)).mul_(scaling)
        if need_dA or need_dx_lora or (need_dx and x_lora is None):
            dh = torch.mm(gl, lora_B).mul_(scaling)  # [tokens, r]
        if need_dA:
            if x_lora is not None:
                xl2 = _rows(x_lora, in_features)
            else:
                xl2 = _rows(x, in_features)
                if xl2.dtype != lora_A.dtype:
                    xl2 = xl2.to(lora_A.dtype)
            dA = torch.mm(dh.t(), xl2)
        if need_dx_lora and x_lora is not None:
            dx_lora = torch.mm(dh, lora_A).view(x_lora.shape)
    if need_dx:
        dx2 = torch.mm(g2, weight)
        if lora_A is not None and x_lora is None:
            if dx2.dtype == lora_A.dtype:
                dx2.addmm_(dh, lora_A)
            else:
                dx2.add_(torch.mm(dh, lora_A).to(dx2.dtype))
        dx = dx2.view(x.shape)
    if need_dbias:
        dbias = g2.sum(0)
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dx_lora, dA, dB, dbias))


def lora_linear_npu(x, weight, bias, lora_A, lora_B, scaling, x_lora):
    return _forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first=False)


def lora_linear_backward_npu(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask):
    return _backward(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask)


def _dequantize(packed, absmax, blocksize, weight_shape, dtype):
    # dispatches to the npu LUT kernel for npu tensors (npu_ft.ops.backends.npu.nf4)
    return torch.ops.npu_ft.nf4_dequantize(packed, absmax, blocksize, list(weight_shape), dtype)


def nf4_linear_npu(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, scaling, x_lora):
    weight = _dequantize(packed, absmax, blocksize, weight_shape, x.dtype)
    return _forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first=True)


def nf4_linear_backward_npu(grad_out, x, packed, absmax, blocksize, weight_shape, lora_A, lora_B, h, scaling,
                            x_lora, output_mask):
    weight = _dequantize(packed, absmax, blocksize, weight_shape, x.dtype) if output_mask[0] else None
    return _backward(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask)


KERNELS = {
    "lora_linear": lora_linear_npu,
    "lora_linear_backward": lora_linear_backward_npu,
    "nf4_linear": nf4_linear_npu,
    "nf4_linear_backward": nf4_linear_backward_npu,
}


def register() -> list[str]:
    """Register the kernels above on the PrivateUse1 ("npu") key for the ops that exist."""
    return _registry.register_kernels("npu", KERNELS)
