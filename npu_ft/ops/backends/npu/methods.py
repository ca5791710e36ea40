"""npu kernels of the LoRA-family ops (``dora_*``, ``lora_fa_*``) on Ascend, through torch_npu:

The kernels of :mod:`npu_ft.ops.backends._fused_methods` are plain torch calls that torch_npu lowers
to aclnn: every GEMM is one ``aclnnMm`` / ``aclnnAddmm`` on 2-D operands (the cube unit), the frozen
weight is passed as the transposed view ``weight.t()`` (no copy), and the DoRA epilogue
(``g * z + bias``, ``g * dy``, the column sum for the magnitude's gradient) is elementwise vector-unit
work on tensors that are written once. DoRA's weight norm costs one ``[out, in] x [in, r]`` GEMM and
never forms ``W + s*B@A``; torch_npu has no fused DoRA or LoRA kernel to call instead.

Verified on the test suite's fake npu device against the reference; on real Ascend hardware only by
``npu-ft doctor`` / the ``ascend``-marked tests where one ran.
"""

from __future__ import annotations

from .._fused_methods import KERNELS

__all__ = ["KERNELS"]
