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

The kernels themselves are the fused-addmm kernels shared with the cpu backend
(:mod:`npu_ft.ops._lora_fused`, also the ops' reference kernels): the same torch calls map onto aclnn on an NPU.

Dtype semantics are exactly the reference's (PEFT): the LoRA branch runs in lora_A's dtype; for
``lora_linear`` it is added in the promoted dtype and the sum rounded to x's dtype, for
``nf4_linear`` (PEFT's Linear4bit) the branch is rounded to x's dtype first.

Verified: on the test suite's fake npu device (CPU memory, CPU kernels) against the reference;
on real Ascend hardware only by ``npu-ft doctor`` / the ``ascend``-marked tests where one ran.
"""

from __future__ import annotations

from ..._lora_fused import KERNELS

__all__ = ["KERNELS"]

